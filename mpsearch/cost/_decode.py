"""Batch-1 decoding cost of a causal language model: prefill once, then one token at a time
with the model's own KV cache (what a chat or code-completion user waits for)."""

from __future__ import annotations

import inspect
import statistics
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mpsearch._data import output_tensor
from mpsearch._validation import check_module, invalid
from mpsearch.cost._timing import clock


class CallSpec(NamedTuple):
    """How a module is called: its cache keyword and whether it takes ``use_cache`` and
    ``logits_to_keep``."""

    cache: str
    use_cache: bool
    logits_to_keep: bool


def call_spec(module: nn.Module, argument: str) -> CallSpec:
    """The keywords ``module`` takes (read on the first module, itself or inside, whose
    ``forward`` names a cache: a wrapper's ``**kwargs`` pass them on)."""
    for sub in module.modules():
        params = inspect.signature(sub.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in params:
                return CallSpec(name, "use_cache" in params, "logits_to_keep" in params)
    raise invalid(
        argument,
        type(module).__name__,
        "a causal language model whose forward takes a KV cache (a Hugging Face "
        "...ForCausalLM: forward(input_ids, cache=..., use_cache=True) -> .logits)",
    )


@dataclass(frozen=True)
class DecodeTiming:
    """``prefill_ms``: median time of the prompt's forward; ``decode_ms``: median time of one
    decoding step (one new token, KV cache of the prompt and the tokens so far);
    ``tokens``: greedy tokens generated in the last repeat (identical across repeats)."""

    prefill_ms: float
    decode_ms: float
    tokens: list[int]

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms


def measure_decode(
    model: nn.Module,
    input_ids: Tensor,
    *,
    new_tokens: int = 32,
    repeats: int = 3,
    timer: str = "wall",
) -> DecodeTiming:
    """Time greedy batch-1 decoding of ``model`` (a Hugging Face-style causal LM taking
    ``input_ids``, its KV cache (``cache``, or ``past_key_values`` before transformers 5) and
    ``use_cache``) after the prompt ``input_ids``
    (``[1, T]``): the prefill and each of ``new_tokens`` steps, ``repeats`` times (a first
    untimed run warms the kernels). Medians over every step of every repeat.

    >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
    >>> t = measure_decode(llama, torch.tensor([[1, 2, 3]]), new_tokens=8)  # doctest: +SKIP
    >>> t.tokens_per_s  # doctest: +SKIP
    """
    check_module(model)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise invalid("input_ids", input_ids, "a LongTensor of shape [1, T] (batch-1 decoding)")
    for name, value in (("new_tokens", new_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise invalid(name, value, "a positive integer")
    read = clock(timer)
    key = call_spec(model, "model").cache  # "cache" in transformers >= 5, "past_key_values" before
    prefill: list[float] = []
    steps: list[float] = []
    tokens: list[int] = []
    with torch.inference_mode():
        for rep in range(repeats + 1):
            t0 = read()
            out = model(input_ids=input_ids, use_cache=True)
            t1 = read()
            past = getattr(out, key, None)
            if past is None:
                raise ValueError(
                    f"The model returned no {key!r} (KV cache) for use_cache=True "
                    f"({type(out).__name__}); batch-1 decoding needs a KV cache."
                )
            token = output_tensor(out)[:, -1].argmax(-1, keepdim=True)
            tokens = [int(token)]
            times = []
            for _ in range(new_tokens - 1):
                s0 = read()
                out = model(input_ids=token, use_cache=True, **{key: getattr(out, key)})
                token = output_tensor(out)[:, -1].argmax(-1, keepdim=True)
                times.append(read() - s0)
                tokens.append(int(token))
            if rep:  # the first run warms up
                prefill.append(t1 - t0)
                steps += times
    return DecodeTiming(
        prefill_ms=1000 * statistics.median(prefill),
        decode_ms=1000 * statistics.median(steps) if steps else float("nan"),
        tokens=tokens,
    )
