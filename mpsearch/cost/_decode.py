"""Batch-1 decoding cost of a causal language model: prefill once, then one token at a time
with the model's own KV cache (what a chat or code-completion user waits for)."""

from __future__ import annotations

import copy
import inspect
import os
import statistics
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from unittest import mock

import torch
import torch._dynamo.config as dynamo_config
from torch import Tensor, nn

from mpsearch._data import output_tensor
from mpsearch._validation import check_module, invalid
from mpsearch.backends._compiled import (
    Swaps,
    _check_close,
    _compile_settings,
    _cpp_compiler_missing,
    _race,
    failed,
    lowered_copy,
    slower_reason,
    swapped_note,
)
from mpsearch.backends._kernels import per_call_ranges
from mpsearch.cost._attention import decoding_attention
from mpsearch.cost._timing import clock
from mpsearch.layers._expert_linears import ExpertLinears

MAX_COMPILED_TOKENS = 16
"""A compiled decoder runs passes over at most this many tokens through Inductor (decoding
steps, drafts, verifications) once the cache holds the prompt; the prompt's pass and longer
ones run eagerly on the same cache: a graph per prompt length would cost more to compile than
it saves."""

MIN_STATIC_CAPACITY = 128
"""Fewest positions a static KV cache holds (sizes are powers of two, so graphs are reused)."""

RECOMPILE_LIMIT = 64
"""Dynamo's limit on graphs per function while a decoder compiles (its default is 8): one
decoder compiles a graph per (tokens fed, logits kept, cache size), and tuning a speculative
controller tries several ``k``."""

COMPILE_CHOICES = (False, True, "max-autotune")
"""What a decoder's ``compile`` takes: eager, compiled by Inductor, or compiled with each matrix
product's kernel chosen by measurement (:data:`~mpsearch.backends._compiled.AUTOTUNE_SETTINGS`:
longer to compile, a few seconds per distinct product shape; Inductor keeps the timings across
processes, not the compiled graphs) and one-token steps' attention fused into the graph
(:func:`~mpsearch.cost._attention.decoding_attention`). ``True`` keeps ATen's attention and
Inductor's default kernels, whose logits are the same for a token fed alone or in a block,
which exact speculative verification needs."""


def check_compile(value: Any, *, argument: str = "compile") -> bool | str:
    """``value`` if it is one of :data:`COMPILE_CHOICES`, else a ``ValueError`` naming
    ``argument``.

    >>> check_compile("max-autotune")
    'max-autotune'
    >>> check_compile(1)
    Traceback (most recent call last):
    ...
    ValueError: The 'compile' argument must be False, True or 'max-autotune'. Got 1 instead.
    """
    if isinstance(value, bool) or (isinstance(value, str) and value in COMPILE_CHOICES):
        return value
    raise invalid(argument, value, "False, True or 'max-autotune'")


def compile_label(compile: bool | str) -> str:
    """How a ``compile`` value decodes, in words: ``"eager"``, ``"compiled"`` or
    ``"compiled, max-autotune"``."""
    if compile == "max-autotune":
        return "compiled, max-autotune"
    return "compiled" if compile else "eager"


_EAGER = {"mode": "eager", "reason": "compile=False: dynamic KV cache, eager model"}
_PENDING = {"mode": "pending", "reason": "static KV cache, compiled by Inductor on first use"}


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


ROLLBACK_TOKENS = 64
"""Most tokens a decoder of a model with recurrent layers (Mamba's state-space layers: one
state per layer, not keys and values per position) can roll back: its cache records the states
after each of the last tokens (transformers' past recording), and a pass over more tokens than
this once the cache holds some is split into passes of at most this many (transformers' scan
of a longer pass starts from a zero state, not the cached one)."""


def _dynamic_cache(config: Any = None) -> Any:
    """A ``transformers.DynamicCache``: full-attention layers that grow (the model's masks
    apply any window), or, for a ``config`` with recurrent layers, the config's own layers."""
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - transformers is the target of decoding
        raise ImportError(
            "decoding keeps a transformers.DynamicCache: pip install transformers"
        ) from None
    return DynamicCache() if config is None else DynamicCache(config=config)


def _recurrent_config(module: nn.Module) -> Any:
    """The config of ``module`` (itself or the first module inside with one: a wrapper's) where
    its cache has recurrent (linear-attention, state-space) layers, whose states cannot be
    cropped like keys and values; else ``None``."""
    config = next((m.config for m in module.modules() if hasattr(m, "config")), None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin
    except ImportError:  # older transformers: no recurrent cache layers
        return None
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config the cache cannot read: the plain cache, as before
        return None
    recurrent = any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers)
    return config if recurrent else None


WINDOWED = ("sliding_attention", "chunked_attention")
"""Cache layer types that keep only a window of positions: a decoder's static cache holds every
position in them instead (:func:`_static_cache`)."""


def _static_cache(config: Any, size: int) -> Any:
    """A ``transformers.StaticCache`` of ``size`` positions for a model of ``config``, its
    sliding-window and chunked layers (:data:`WINDOWED`) holding every position as the full
    ones do, the model's own masks applying the window: a windowed layer overwrites the oldest
    positions in place, so cropping it cannot bring back what a rejected draft overwrote (a
    Mistral with a window of 8: logits 8.0 off after a rollback, and the compiled step 0.87
    off the eager one)."""
    from transformers import StaticCache
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True)
    types, _ = get_layer_types_and_kwargs(text)
    full = ["full_attention" if t in WINDOWED else t for t in types]
    if full != list(types):
        text = copy.copy(text)
        text.layer_types = full
    return StaticCache(config=text, max_cache_len=size)


def _is_plain(layer: Any) -> bool:
    """Whether a cache layer is a plain full-attention one, dynamic or static, holding
    ``keys`` / ``values`` as ``[batch, heads, positions, head_dim]`` (not a sliding window,
    linear attention or a quantized cache)."""
    from transformers.cache_utils import DynamicLayer, StaticLayer

    return type(layer) in (DynamicLayer, StaticLayer)


def _plain_layers(cache: Any) -> list[Any] | None:
    """``cache``'s layers where each is plain (:func:`_is_plain`) and holds values, else
    ``None``."""
    layers = list(getattr(cache, "layers", ()))
    plain = all(_is_plain(x) and x.is_initialized for x in layers)
    return layers if layers and plain else None


def _layout(module: nn.Module) -> dict[str, Any] | None:
    """What shapes ``module``'s KV cache: its config without the dtype (``None``: no config)."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    return {k: v for k, v in config.to_dict().items() if k not in ("dtype", "torch_dtype")}


def _own_step(module: nn.Module) -> Any:
    """``module``'s call in a function with a code object of its own. Dynamo files compiled
    graphs under the code object they start from; compiling ``module`` itself would file every
    decoder of a model class (they share ``forward``) under one code object: a graph compiled
    for one decoder's cache could serve another's (two decoders of one model wrote into one
    cache), and each call would check the guards of every other decoder's graphs first."""

    def step(**kwargs: Any) -> Any:
        return module(**kwargs)

    step.__code__ = step.__code__.replace()  # a copy: a code object no other decoder has
    return step


def _static_cache_missing(module: nn.Module) -> str | None:
    """Why ``module`` cannot decode on a ``transformers.StaticCache`` (``None``: it can)."""
    try:
        _static_cache(module.config, MIN_STATIC_CAPACITY)
    except Exception as error:
        return f"no static KV cache for {type(module).__name__} ({type(error).__name__}: {error})"
    return None


def _native_gqa() -> AbstractContextManager[Any]:
    """While Dynamo traces a step, Hugging Face attention hands grouped key/value heads to
    ``scaled_dot_product_attention(enable_gqa=True)`` (transformers' own switch,
    ``TRANSFORMERS_SDPA_FORCE_GQA``), which reads each cached head once per query group: on
    CPU transformers otherwise copies the whole static cache to repeat its heads at every step
    (2.4 MB a token, 78 us of 0.37 ms a step without matrix products, 12.6 M-parameter Llama).
    The traced graph keeps the choice; the eager model is untouched."""
    return mock.patch.dict(os.environ, {"TRANSFORMERS_SDPA_FORCE_GQA": "1"})


class KVDecoder:
    """One causal LM decoding one sequence with its own KV cache: :meth:`feed` appends tokens
    and answers the logits of the last positions, :meth:`rollback` forgets a suffix.

    ``compile=False``: a ``transformers.DynamicCache`` and the eager model. ``compile=True``:
    a ``StaticCache`` (fixed shapes, :meth:`reset` sizes it) and the model compiled by Inductor
    with static shapes, one graph per number of tokens fed (``compile="max-autotune"``: each
    matrix product's kernel chosen by measurement, see :data:`COMPILE_CHOICES`); a sequence's
    first pass (the prompt) and passes over more than :data:`MAX_COMPILED_TOKENS` run eagerly
    on the same cache. Each graph's first output is checked against the eager model's, and the
    first graph is raced against the eager step (:data:`~mpsearch.backends._compiled.RACE_CALLS`
    calls each, on the same cache). A checked graph then runs with only the guards that tell
    this decoder's graphs apart (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``:
    its inputs are fed by this class alone, same cache and module, so only the shapes can
    differ); Dynamo's full guard check took 85-300 us a token on a 12.6 M-parameter Llama, a
    sixth of an int8 step. Where the static cache or compiling fails, the outputs differ or
    the compiled step is not faster, decoding goes on eagerly, with a warning, and
    ``compile_info`` says why (``{"mode": "inductor" | "pending" | "eager", "reason": ...}``).
    fbgemm int8 Linear layers (the autotuner's eager pick at one token on some CPUs), which
    break Inductor's graph at each layer, are traced as their oneDNN twins, in a copy of the
    module tree (:func:`~mpsearch.backends._compiled.lowered_copy`); the eager passes (the
    prompt, the race, the check, a fallback) run the model passed in, which keeps them.

    A model with recurrent cache layers (Mamba, Mamba-2 and the hybrids: Jamba, Bamba,
    Granite 4 hybrid, LFM2, Qwen3-Next) holds a state per layer, not keys and values per
    position: after the prompt its dynamic cache records the states after each token
    (transformers' past recording) and :meth:`rollback` restores one, for the tokens fed since
    the last rollback (:data:`ROLLBACK_TOKENS`); it decodes eagerly.

    >>> dec = KVDecoder(llama, compile=True)  # doctest: +SKIP
    >>> dec.reset(capacity=80)  # doctest: +SKIP
    >>> logits = dec.feed([1, 2, 3], keep=1)  # doctest: +SKIP
    """

    def __init__(
        self, module: nn.Module, *, compile: bool | str = False, argument: str = "model"
    ) -> None:
        self.compile = check_compile(compile)
        self.module = module
        self.spec = call_spec(module, argument)
        param = next(module.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.cache: Any = None
        self.seen = 0
        self.capacity = 0
        self._recurrent = _recurrent_config(module)
        self._rollable = 0  # tokens a recurrent cache can roll back (its recorded states)
        # False: not probed yet; a recurrent cache holds states, not keys and values
        self._kv_dtype: torch.dtype | bool | None = None if self.recurrent else False
        self._layout = _layout(module)  # what can_adopt compares, found once
        self.compile_info = dict(_PENDING if compile else _EAGER)
        self._compiled: Any = None
        self._checked: set[tuple[int, int, int]] = set()
        self._raced = ""
        self._lowered = module  # what the compiled step traces
        self._swaps: Swaps = []
        if compile:
            reason = _cpp_compiler_missing() or (
                f"{type(module).__name__} has recurrent (state-space) layers: their rollback "
                "records states in a cache that grows, which a compiled step cannot hold"
                if self.recurrent
                else _static_cache_missing(module)
            )
            if reason is not None:
                self._fall_back(reason)
            else:  # a copy of the module tree where it swaps layers: eagerly, the model as it is
                self._lowered, self._swaps = lowered_copy(module)
            banks = [n for n, m in module.named_modules() if isinstance(m, ExpertLinears)]
            dynamic = [  # an expert no calibration token reached keeps one: no advice for it
                n for n in per_call_ranges(module) if not any(n.startswith(f"{b}.") for b in banks)
            ]
            if dynamic and self.static:
                warnings.warn(
                    f"{argument}: {len(dynamic)} int8 layer(s) measure their activation range "
                    f"on each call (first: {dynamic[0]!r}), which compiled decoding runs on "
                    "oneDNN's int8 kernel, not Inductor's int8 micro-kernels (3.7x slower a "
                    "token on stdlib_lm): quantize with calib= batches for static ranges",
                    RuntimeWarning,
                    stacklevel=2,
                )

    @property
    def recurrent(self) -> bool:
        """Whether the model's cache has recurrent layers (see :data:`ROLLBACK_TOKENS`)."""
        return self._recurrent is not None

    @property
    def static(self) -> bool:
        """Whether the cache is a ``StaticCache`` (the compiled path)."""
        return self.compile_info["mode"] != "eager"

    def reset(self, capacity: int = 0) -> None:
        """Start a new sequence of at most ``capacity`` tokens (a static cache holds the next
        power of two, at least :data:`MIN_STATIC_CAPACITY`, and is reused while it fits)."""
        self.seen = 0
        self._rollable = 0
        if not self.static:
            self.cache = _dynamic_cache(self._recurrent)
            self.capacity = 0  # 0: the cache is dynamic
            return
        size = max(MIN_STATIC_CAPACITY, 1 << max(capacity - 1, 0).bit_length())
        if size > self.capacity:  # also when the cache is not a static one yet (capacity 0)
            self.cache = _static_cache(self.module.config, size)
            self.capacity = size
        else:
            with torch.inference_mode():  # the cache's tensors were made in inference mode
                self.cache.reset()

    def feed(self, tokens: Sequence[int], keep: int) -> Tensor:
        """Run ``tokens`` (appended to what the cache holds); the float32 logits ``[keep, V]``
        of the last ``keep`` positions."""
        n = len(tokens)
        if self.capacity and self.seen + n > self.capacity:
            raise invalid(
                "tokens",
                f"{self.seen + n} tokens in all",
                f"at most the {self.capacity} the static cache holds (reset(capacity) with the "
                "sequence's full length)",
            )
        if self.recurrent:
            return self._feed_recurrent(list(tokens), keep)
        return self._forward(tokens, keep)

    def _feed_recurrent(self, tokens: list[int], keep: int) -> Tensor:
        """:meth:`feed` on a recurrent cache. The first pass (the prompt: never rolled back)
        runs as the model's own generation runs it; later passes record each token's state
        (transformers' past recording, as its assisted generation does after the prompt), at
        most :data:`ROLLBACK_TOKENS` tokens each; the recorded states are dropped first once
        they could cover :data:`ROLLBACK_TOKENS` (memory stays bounded when nothing is
        rolled back)."""
        if not self.seen:  # from the zero state, transformers' scan is exact at any length
            logits = self._forward(tokens, keep)
            self.cache.activate_past_recording(recurrent_states_to_keep=ROLLBACK_TOKENS)
            return logits
        if self._rollable >= ROLLBACK_TOKENS:
            self.cache.crop(0)  # keeps the states, forgets the recorded ones
            self._rollable = 0
        n = len(tokens)
        parts = []
        for start in range(0, n, ROLLBACK_TOKENS):
            part = tokens[start : start + ROLLBACK_TOKENS]
            wanted = keep - (n - start - len(part))  # of the last ``keep``, those in this part
            got = self._forward(part, min(max(wanted, 1), len(part)))
            if wanted > 0:
                parts.append(got)
        self._rollable += n
        return torch.cat(parts)

    def _forward(self, tokens: Sequence[int], keep: int) -> Tensor:
        """One pass over ``tokens``: the float32 logits of the last ``keep`` positions."""
        n = len(tokens)
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {self.spec.cache: self.cache}
        if self.spec.use_cache:
            kwargs["use_cache"] = True
        if self.spec.logits_to_keep:
            kwargs["logits_to_keep"] = keep
        if self.static and 0 < self.seen and n <= MAX_COMPILED_TOKENS:
            out = self._run_compiled((n, keep, self.capacity), ids, kwargs)
        else:
            try:
                out = self.module(input_ids=ids, **kwargs)
            except RuntimeError as error:
                if self.static and not self.seen:  # the model's cache is not the static one
                    self._fall_back(f"the model did not run on a static KV cache ({error})")
                    self.reset()
                    return self._forward(tokens, keep)
                if n > 1 and self.seen:
                    raise RuntimeError(
                        f"{type(self.module).__name__} failed on {n} tokens fed after the "
                        f"{self.seen} its cache holds ({error}). Speculative verification "
                        "feeds such blocks; one token a call is what plain decoding needs"
                    ) from error
                raise
        self.seen += n
        return output_tensor(out)[0, -keep:].float()

    @property
    def kv_dtype(self) -> torch.dtype | None:
        """The dtype of the keys and values the model caches (found once, by a one-token pass
        on a cache of its own), or ``None`` where its cache is not plain full attention."""
        if self._kv_dtype is False:
            cache, kwargs = _dynamic_cache(), {}
            if self.spec.logits_to_keep:
                kwargs["logits_to_keep"] = 1
            if self.spec.use_cache:
                kwargs["use_cache"] = True
            ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            try:
                with torch.inference_mode():
                    self.module(input_ids=ids, **{self.spec.cache: cache}, **kwargs)
            except Exception:  # no dtype: the caller keeps its own path
                cache = None
            layers = _plain_layers(cache)
            self._kv_dtype = layers[0].keys.dtype if layers is not None else None
        return self._kv_dtype  # type: ignore[return-value]

    def can_adopt(self, other: KVDecoder) -> bool:
        """Whether :meth:`adopt` may take ``other``'s keys and values: the same config (the
        same cache shapes) and this model's keys in a plain cache (:attr:`kv_dtype`); the
        caches' kinds are checked by :meth:`adopt` itself."""
        mine = self._layout
        return mine is not None and mine == other._layout and self.kv_dtype is not None

    def adopt(self, other: KVDecoder, length: int) -> bool:
        """Start this decoder's sequence (nothing fed since :meth:`reset`) with the keys and
        values ``other`` holds for its first ``length`` positions, cast to this decoder's
        dtype, as if it had been fed those tokens: ``other`` decodes another variant of the
        same model (the same config: the same cache shapes). ``False``, nothing changed, where
        it cannot: another config, a cache that is not plain full attention, or this
        model's keys not in a plain cache (:attr:`kv_dtype`).

        The keys and values are ``other``'s, not the ones this decoder would have computed:
        a speculative draft that adopts its reference's prompt skips its own prompt pass
        (:class:`~mpsearch.runtime.SpeculativeController`); what it drafts is then verified,
        so the output does not depend on it.
        """
        if self.seen or other.seen < length or length < 1 or not self.can_adopt(other):
            return False
        if self.capacity and length > self.capacity:
            return False
        theirs = _plain_layers(other.cache)
        if theirs is None:
            return False
        from transformers.cache_utils import DynamicLayer

        mine = list(self.cache.layers)
        grows = not mine and getattr(self.cache, "layer_class_to_replicate", None) is DynamicLayer
        if not grows and (len(mine) != len(theirs) or not all(map(_is_plain, mine))):
            return False
        dtype = self.kv_dtype
        for i, source in enumerate(theirs):  # copies: the tensors stay other's
            keys, values = source.keys[:, :, :length], source.values[:, :, :length]
            self.cache.update(keys.to(dtype), values.to(dtype), i)
        self.seen = length
        return True

    def rollback(self, length: int) -> None:
        """Forget every token past the first ``length`` (crop the cache). A recurrent cache
        restores a recorded state: it can roll back the tokens fed since the last rollback
        (at most :data:`ROLLBACK_TOKENS`), not into the first pass."""
        if self.recurrent:
            self._rollback_recurrent(length)
            return
        if self.seen <= length:
            return
        held = int(self.cache.get_seq_length())
        if held > length:
            self.cache.crop(length - held)  # a negative count: remove that many tokens
        self.seen = length

    def _rollback_recurrent(self, length: int) -> None:
        removed = max(self.seen - length, 0)
        if removed > self._rollable:
            raise invalid(
                "length",
                length,
                f"at least {self.seen - self._rollable}: a recurrent cache rolls back only the "
                f"tokens fed since the last rollback, at most {ROLLBACK_TOKENS}",
            )
        if self.seen:
            self.cache.crop(-removed)  # also 0: the recorded states are then dropped
        self.seen -= removed
        self._rollable = 0

    def _run_compiled(self, key: tuple[int, int, int], ids: Tensor, kwargs: dict[str, Any]) -> Any:
        if key in self._checked:  # this decoder's graphs differ only by the key's shapes
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self._compiled(input_ids=ids, **kwargs)
            except RuntimeError as error:  # a graph that depends on more than the shapes
                if "Recompilation" not in str(error):
                    raise
                self._crop()  # the step runs again eagerly, over what its first graphs wrote
                self._fall_back(
                    "the compiled step needed a new graph for inputs of the same shapes (its "
                    "control flow depends on values, as a Mixture-of-Experts routing loop's)"
                )
                return self.module(input_ids=ids, **kwargs)
        attention = decoding_attention() if self.compile == "max-autotune" else nullcontext()
        with _native_gqa(), attention:  # the race calls the graph: it must find what it traced
            return self._compile_and_check(key, ids, kwargs)

    def _compile_and_check(
        self, key: tuple[int, int, int], ids: Tensor, kwargs: dict[str, Any]
    ) -> Any:
        if self._compiled is None:
            step = _own_step(self._lowered)
            self._compiled = torch.compile(step, backend="inductor", dynamic=False)
        reason, raced = None, ""
        try:  # compiled first, then the eager pass writes the cache entries that stay
            with (
                _compile_settings(autotune=self.compile == "max-autotune"),
                dynamo_config.patch(recompile_limit=RECOMPILE_LIMIT),
            ):
                got = self._compiled(input_ids=ids, **kwargs)
        except Exception as error:
            reason = failed("compilation", error)
        self._crop()
        if reason is None and not self._checked:  # the first graph decides
            compiled_ms, eager_ms = _race(
                self._compiled, self.module, (), {"input_ids": ids, **kwargs}, after=self._crop
            )
            reason = slower_reason(compiled_ms, eager_ms)
            raced = f"; a step {compiled_ms:.3g} ms vs {eager_ms:.3g} ms eager on the first"
        expected = self.module(input_ids=ids, **kwargs)
        if reason is None:
            reason = _check_close(got, expected)
        if reason is not None:
            self._fall_back(reason)
            return expected
        self._checked.add(key)
        self._raced = self._raced or raced
        self.compile_info = {
            "mode": "inductor",
            "reason": f"static KV cache, compiled by Inductor"
            f"{' (max-autotune)' if self.compile == 'max-autotune' else ''} for "
            f"{len(self._checked)} shape(s){self._raced}{swapped_note(self._swaps)}",
        }
        return got

    def _crop(self) -> None:
        """Forget what the cache holds past the tokens seen, layer by layer."""
        for layer in self.cache.layers:
            held = int(layer.get_seq_length())
            if held > self.seen:
                layer.crop(self.seen - held)

    def _fall_back(self, reason: str) -> None:
        self._swaps = []
        self.compile_info = {"mode": "eager", "reason": reason}
        warnings.warn(f"decoding eagerly: {reason}", RuntimeWarning, stacklevel=4)


@dataclass(frozen=True)
class DecodeTiming:
    """``prefill_ms``: median time of the prompt's forward; ``decode_ms``: median time of one
    decoding step (one new token, KV cache of the prompt and the tokens so far);
    ``tokens``: greedy tokens generated in the last repeat (identical across repeats);
    ``compile_info``: how the steps ran (:attr:`KVDecoder.compile_info`)."""

    prefill_ms: float
    decode_ms: float
    tokens: list[int]
    compile_info: dict[str, str] = field(default_factory=lambda: dict(_EAGER))

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms


def measure_decode(
    model: nn.Module | KVDecoder,
    input_ids: Tensor,
    *,
    new_tokens: int = 32,
    repeats: int = 3,
    timer: str = "wall",
    compile: bool | str = False,
) -> DecodeTiming:
    """Time greedy batch-1 decoding of ``model`` (a Hugging Face-style causal LM taking
    ``input_ids``, its KV cache (``cache``, or ``past_key_values`` before transformers 5) and
    ``use_cache``) after the prompt ``input_ids`` (``[1, T]``): the prefill and each of
    ``new_tokens`` steps, ``repeats`` times (a first untimed run warms the kernels and, with
    ``compile`` ``True`` or ``"max-autotune"``, compiles the step: :class:`KVDecoder`).
    Medians over every step of every repeat. ``model`` may be a :class:`KVDecoder` (its
    ``compile`` setting is used): timing the same model again then reuses its cache and
    compiled graphs.

    >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
    >>> t = measure_decode(llama, torch.tensor([[1, 2, 3]]), new_tokens=8)  # doctest: +SKIP
    >>> t.tokens_per_s  # doctest: +SKIP
    """
    if not isinstance(model, KVDecoder):
        check_module(model)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise invalid("input_ids", input_ids, "a LongTensor of shape [1, T] (batch-1 decoding)")
    for name, value in (("new_tokens", new_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise invalid(name, value, "a positive integer")
    read = clock(timer)
    decoder = model if isinstance(model, KVDecoder) else KVDecoder(model, compile=compile)
    prompt = input_ids[0].tolist()
    prefill: list[float] = []
    steps: list[float] = []
    tokens: list[int] = []
    with torch.inference_mode():
        for rep in range(repeats + 1):
            decoder.reset(len(prompt) + new_tokens)
            t0 = read()
            token = int(decoder.feed(prompt, keep=1)[-1].argmax())
            t1 = read()
            tokens = [token]
            times = []
            for _ in range(new_tokens - 1):
                s0 = read()
                token = int(decoder.feed([token], keep=1)[-1].argmax())
                times.append(read() - s0)
                tokens.append(token)
            if rep:  # the first run warms up
                prefill.append(t1 - t0)
                steps += times
    return DecodeTiming(
        prefill_ms=1000 * statistics.median(prefill),
        decode_ms=1000 * statistics.median(steps) if steps else float("nan"),
        tokens=tokens,
        compile_info=dict(decoder.compile_info),
    )


class DecodeTimer:
    """Milliseconds per decoded token of a module, as a ``time_module`` for whole-model checks
    (:func:`~mpsearch.search._realcheck.measure_plans`): greedy batch-1 decoding of
    ``new_tokens`` after ``input_ids`` (:func:`measure_decode`, one repeat per call), each
    module on a :class:`KVDecoder` of its own that later calls reuse (its cache and, with
    ``compile=True``, its compiled graphs). ``fallbacks``: why modules it was asked to
    compile decoded eagerly (each reason once).

    >>> timer = DecodeTimer(prompt, new_tokens=16, compile=True)  # doctest: +SKIP
    >>> timer(model)  # ms per token  # doctest: +SKIP
    """

    def __init__(
        self,
        input_ids: Tensor,
        *,
        new_tokens: int = 32,
        timer: str = "wall",
        compile: bool | str = False,
    ) -> None:
        self.input_ids = input_ids
        self.new_tokens = new_tokens
        self.timer = timer
        self.compile = check_compile(compile)
        self._decoders: dict[int, KVDecoder] = {}

    def __call__(self, module: nn.Module) -> float:
        decoder = self._decoders.get(id(module))
        if decoder is None or decoder.module is not module:
            decoder = self._decoders[id(module)] = KVDecoder(module, compile=self.compile)
        timing = measure_decode(
            decoder, self.input_ids, new_tokens=self.new_tokens, repeats=1, timer=self.timer
        )
        return timing.decode_ms

    @property
    def how(self) -> str:
        """:func:`compile_label` of what was asked (see :attr:`fallbacks`)."""
        return compile_label(self.compile)

    @property
    def fallbacks(self) -> list[str]:
        return sorted(
            {
                d.compile_info["reason"]
                for d in self._decoders.values()
                if self.compile and not d.static
            }
        )
