"""``SpeculativeController``: lossless per-token precision switching for causal language models.

A cheap variant (the *draft*, e.g. a ``w4a16`` plan) proposes ``k`` tokens one at a time; the
*reference* variant (by default the full-precision model) scores all of them in one forward
pass; the longest prefix the reference agrees with is kept, plus one token of the reference's
own. Greedy decoding therefore returns exactly the reference's greedy tokens, and sampling
(``temperature > 0``) uses the speculative rejection rule (Leviathan et al., 2023; Chen et al.,
2023), so each token is distributed exactly as the reference's:

- a drafted token ``x ~ q`` is accepted with probability ``min(1, p(x) / q(x))``;
- on the first rejection the token is drawn from ``normalize(max(0, p - q))`` and the step ends;
- when all ``k`` are accepted one more token is drawn from the reference's next ``p``.

Each variant keeps its own KV cache (a :class:`~mpsearch.cost.KVDecoder`: a
``transformers.DynamicCache``, or with ``compile=True`` a ``StaticCache`` and the variant
compiled by Inductor for each number of tokens fed); after a rejection both are cropped back to
the accepted prefix, so neither ever holds a token that was not emitted.
The caches may lag the sequence (the draft has not seen its own last drafted token, nor the
reference's extra one): whatever a variant has not seen is fed in its next forward pass, the
prompt included (the first verification pass is also the reference's prefill).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from mpsearch._validation import check_module, invalid, wrong_type
from mpsearch.backends import get_backend, quantize
from mpsearch.backends._kernels import per_call_ranges
from mpsearch.backends._quantize import as_plan
from mpsearch.backends._registry import Backend
from mpsearch.cost._decode import ROLLBACK_TOKENS, KVDecoder, check_compile
from mpsearch.cost._timing import clock
from mpsearch.plan import PrecisionPlan
from mpsearch.rounding import Rounder
from mpsearch.runtime._audit import AuditLog
from mpsearch.runtime._controller import plan_label

VariantLike = PrecisionPlan | Mapping[str, str] | str | nn.Module

AUDIT_COLUMNS = (
    "call_id",
    "step",
    "k",
    "drafted",
    "accepted",
    "emitted",
    "draft_ms",
    "verify_ms",
    "step_ms",
)
DEFAULT_KS = (1, 2, 3, 4, 6, 8, 12, 15)
"""The drafted tokens per step :meth:`SpeculativeController.tune` tries by default, up to a
verification of :data:`~mpsearch.cost._decode.MAX_COMPILED_TOKENS` tokens (the most a compiled
decoder runs through Inductor). A long draft pays where the draft agrees: on stdlib_lm (machine
A, 1 thread) the fp32 reference's pass over 16 tokens took 3x one token's, as long as over 7,
and a w8a8 draft agreeing on every token decoded 1.2x the reference's tokens/s at k = 6 and
1.4-1.6x at k = 15."""


@dataclass(frozen=True)
class StepCosts:
    """What one speculative step costs (ms): ``draft_ms`` per drafted token (one draft forward
    pass), ``verify_ms[k]`` for the reference's pass over ``k + 1`` tokens, ``overhead_ms``
    for the rest of the step (sampling, bookkeeping).

    >>> StepCosts(draft_ms=0.5, verify_ms={0: 1.0, 4: 1.4}, overhead_ms=0.1).step_ms(4)
    3.5
    """

    draft_ms: float
    verify_ms: Mapping[int, float]
    overhead_ms: float = 0.0

    def step_ms(self, k: int) -> float:
        """The time of one step that drafts ``k`` tokens."""
        if k not in self.verify_ms:
            raise invalid(
                "costs", f"verify_ms without k={k}", f"verify_ms for every k tried ({k} missing)"
            )
        return k * self.draft_ms + float(self.verify_ms[k]) + self.overhead_ms


@dataclass(frozen=True)
class SpeculativeOptions:
    """Settings of :meth:`SpeculativeController.tune`: the ``ks`` tried (0 = plain reference
    decoding, one token per step, as a baseline row), ``max_new_tokens`` generated per
    calibration prompt, the ``temperature`` the acceptance is measured at (0: greedy),
    ``repeats`` of each timed forward pass and the sampling ``seed``. ``min_gain``: with a
    ``k = 0`` row, a ``k > 0`` is chosen only where its predicted tokens/s beat plain decoding's
    by at least this share (timings are noisy: on the tiny stdlib LM a predicted 8 % gain ran
    0.76x).

    >>> SpeculativeOptions(ks=(2, 4)).ks
    (2, 4)
    """

    ks: tuple[int, ...] = DEFAULT_KS
    max_new_tokens: int = 32
    temperature: float = 0.0
    repeats: int = 5
    seed: int = 0
    min_gain: float = 0.1

    def __post_init__(self) -> None:
        ks = tuple(self.ks) if isinstance(self.ks, Iterable) else self.ks
        if (
            not isinstance(ks, tuple)
            or not ks
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in ks)
        ):
            raise invalid("ks", self.ks, "a non-empty list of integers >= 0", kind="option")
        object.__setattr__(self, "ks", tuple(sorted(set(ks))))
        _check_count("max_new_tokens", self.max_new_tokens, kind="option")
        _check_count("repeats", self.repeats, kind="option")
        _check_temperature(self.temperature, kind="option")
        gain = self.min_gain
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 <= gain < 1:
            raise invalid("min_gain", gain, "a number in [0, 1)", kind="option")


MAX_RECURRENT_K = ROLLBACK_TOKENS - 2
"""Most tokens drafted a step for a model with recurrent layers: a draft feeds up to k + 1
tokens between rollbacks, and its cache records the states of at most
:data:`~mpsearch.cost._decode.ROLLBACK_TOKENS`."""


def _check_count(argument: str, value: Any, *, kind: str = "argument", low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        accepted = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise invalid(argument, value, accepted, kind=kind)


def _check_temperature(value: Any, *, kind: str = "argument") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise invalid("temperature", value, "a finite number >= 0 (0: greedy)", kind=kind)


def expected_tokens_per_step(acceptance: float, k: int) -> float:
    """Tokens emitted per step when each drafted token is accepted independently with
    probability ``acceptance``: ``(1 - a^(k+1)) / (1 - a)`` (``k + 1`` at ``a = 1``).

    >>> expected_tokens_per_step(0.5, 2)
    1.75
    """
    if acceptance >= 1:
        return float(k + 1)
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


class _StepRecord(NamedTuple):
    k: int
    drafted: int
    accepted: int
    emitted: int
    draft_s: float
    verify_s: float
    step_s: float


@dataclass(slots=True)
class _Totals:
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    seconds: float = 0.0
    steps: int = 0


class _Candidate(NamedTuple):
    name: str
    decoder: KVDecoder
    plan: PrecisionPlan | None


def _as_prompt(input_ids: Any, argument: str = "input_ids") -> list[int]:
    """The prompt's token ids; refuses a batch of more than one sequence."""
    if isinstance(input_ids, Tensor):
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise invalid(argument, input_ids.dtype, "a LongTensor of token ids")
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise invalid(
                    argument,
                    f"a batch of {input_ids.shape[0]} sequences",
                    "one sequence (shape [1, T] or [T]): the speculative controller decodes "
                    "batch 1; call generate once per sequence",
                )
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise invalid(argument, tuple(input_ids.shape), "a tensor of shape [1, T] or [T]")
        ids = input_ids.tolist()
    elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
        ids = list(input_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise invalid(argument, input_ids, "a list of integer token ids")
    else:
        raise wrong_type(argument, input_ids, "a LongTensor [1, T] (or a list of token ids)")
    if not ids:
        raise invalid(argument, input_ids, "a prompt of at least one token")
    return ids


def _eos_set(eos_token_id: Any) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if (
        isinstance(eos_token_id, bool)
        or not isinstance(ids, Iterable)
        or any(isinstance(t, bool) or not isinstance(t, int) for t in ids)
    ):
        raise invalid("eos_token_id", eos_token_id, "a token id, a list of token ids or None")
    return frozenset(ids)


def _sample(probs: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_sampled(
    p: Tensor,
    q: Sequence[Tensor],
    drafted: Sequence[int],
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """The speculative rejection rule: ``(accepted, next_token)`` for ``drafted`` tokens drawn
    from the draft distributions ``q[i]``, given the reference's distributions ``p``
    (``[len(drafted) + 1, V]``: one per drafted position and one after the last).

    Token ``i`` is accepted with probability ``min(1, p_i(x) / q_i(x))``; at the first
    rejection the next token is drawn from ``normalize(max(0, p_i - q_i))``; when every token
    is accepted it is drawn from the last row of ``p``. The emitted tokens are then distributed
    exactly as samples from ``p``.

    >>> p = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    >>> verify_sampled(p, [torch.tensor([1.0, 0.0])], [0])  # p(0) = 0: always rejected
    (0, 1)
    """
    for i, token in enumerate(drafted):
        p_x, q_x = float(p[i, token]), float(q[i][token])
        if float(torch.rand((), generator=generator)) * q_x < p_x:
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = float(residual.sum())
        return i, _sample(residual / total if total > 0 else p[i], generator)
    return len(drafted), _sample(p[len(drafted)], generator)


def _accepted_greedy(logits: Tensor, drafted: Sequence[int]) -> tuple[int, int]:
    targets = logits.argmax(-1).tolist()
    n = 0
    while n < len(drafted) and drafted[n] == targets[n]:
        n += 1
    return n, targets[n]


def _refuse_per_call_ranges(reference: nn.Module) -> None:
    """Refuse a reference whose int8 layers measure their activation range on each call: a
    verification pass puts k + 1 tokens under one range, so its tokens could differ from the
    reference decoding one token at a time."""
    dynamic = per_call_ranges(reference)
    if dynamic:
        raise invalid(
            "reference",
            f"{len(dynamic)} int8 layer(s) with activation ranges measured per call (first: "
            f"{dynamic[0]!r})",
            "a reference whose outputs do not depend on how many tokens run at once: pass "
            "calib= batches (static activation ranges: to the controller for a plan, to "
            "quantize for a module) or use weight-only schemes there; a range measured per "
            "call spans all k + 1 verified tokens",
        )


class SpeculativeController:
    """Lossless per-token precision switching: a cheap ``draft`` plan proposes ``k`` tokens,
    the ``reference`` verifies them in one pass; the output is the reference's.

    ``draft`` and ``reference`` are plans (a :class:`~mpsearch.plan.PrecisionPlan`, a
    ``{layer: scheme}`` mapping or one scheme name such as ``"w4a16"``) quantized from
    ``model`` on ``backend``, or modules already quantized. The reference defaults to the
    full-precision ``model`` itself. Both must be causal LMs taking a KV cache (Hugging Face
    ``...ForCausalLM``). Plans with calibrated roundings take their weights from ``rounder``
    or from one built on ``calib``. ``compile=True`` decodes each variant on a static KV cache
    through Inductor (falling back to eager, with the reason in ``compile_info``);
    ``compile="max-autotune"`` also picks each of the draft's matrix products' kernels by
    measurement (the reference keeps Inductor's default kernels: autotuned ones give a block
    of verified tokens other logits than one token at a time, which would break exactness).

    :meth:`generate` decodes one sequence (batch 1): greedily (``temperature=0``: exactly the
    reference's greedy tokens) or by sampling (each token distributed as the reference's).
    The reference reads the prompt alone (the first token is its own) and the draft adopts the
    reference's keys and values of the prompt instead of reading it
    (:meth:`~mpsearch.cost.KVDecoder.adopt`; where the two caches differ, the draft reads the
    prompt itself): on stdlib_lm (machine A, 1 thread, 64-token prompts, 48 new tokens) a
    w4a16 draft at k = 15 ran 1.26x the reference's tokens/s that way against 1.04x reading
    the prompt itself, a w8a8 draft at k = 15 1.42x against 1.34x.
    :meth:`tune` measures acceptance and step costs on calibration prompts and sets ``k`` (and
    the draft among candidates) for the most tokens per second. Every step is audited.

    >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32,  # doctest: +SKIP
    ...     intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)).eval()
    >>> spec = SpeculativeController(lm, "w8a16", backend="cpu", k=3)  # doctest: +SKIP
    >>> out = spec.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8)  # doctest: +SKIP
    >>> out.shape, spec.acceptance_rate  # doctest: +SKIP
    (torch.Size([1, 11]), 0.92)
    """

    def __init__(
        self,
        model: nn.Module,
        draft: VariantLike,
        *,
        reference: VariantLike = "fp32",
        backend: str | Backend = "cpu",
        k: int = 4,
        calib: Sequence[Any] | None = None,
        rounder: Rounder | None = None,
        audit_size: int = 100_000,
        audit_sink: str | Path | None = None,
        compile: bool | str = False,
    ) -> None:
        check_module(model)
        self.compile = check_compile(compile)
        _check_count("k", k, low=0)
        model.eval()
        self.model = model
        self.backend = get_backend(backend).name
        self._calib = calib
        self._rounder = rounder
        self._built: dict[tuple[tuple[str, str], ...], nn.Module] = {}
        ref_module, ref_name, ref_plan = self._variant(reference, "reference")
        _refuse_per_call_ranges(ref_module)
        self.reference_name = ref_name
        self.reference_plan = ref_plan
        # max-autotune's kernels block a product by its number of rows: a block of k + 1 tokens
        # verified at once gets logits other than one token at a time (int8 weights: up to
        # 7e-3 apart on stdlib_lm), so the reference keeps Inductor's default kernels (row
        # by row the same for any k there: exact greedy tokens); only the draft is autotuned
        ref_compile = True if self.compile == "max-autotune" else self.compile
        self._reference = KVDecoder(ref_module, compile=ref_compile, argument="reference")
        self._draft = self._candidate(draft, "draft")
        self.k = k
        self.tuning: pd.DataFrame | None = None
        self._audit = AuditLog(AUDIT_COLUMNS, max_rows=audit_size, sink=audit_sink)
        self._totals = _Totals()
        self._next_call = 0
        self._clock = clock("wall")  # waits for an accelerator's queued work before each read

    # -- set-up ---------------------------------------------------------------------------------
    def _variant(
        self, spec: VariantLike, argument: str
    ) -> tuple[nn.Module, str, PrecisionPlan | None]:
        """The module, its name and its plan (``None`` for a given module)."""
        if isinstance(spec, nn.Module):
            spec.eval()
            assignment = getattr(spec, "mpsearch_assignment", None)
            name = plan_label(assignment) if assignment else type(spec).__name__
            return spec, name, None
        if not isinstance(spec, (PrecisionPlan, Mapping, str)):
            raise invalid(
                argument,
                spec,
                "a PrecisionPlan, a {layer: scheme} mapping, a scheme name or a module",
            )
        plan = as_plan(spec, argument=argument)
        assignment = plan.resolve_choices(self.model)
        key = tuple(sorted(assignment.items()))
        name = str(plan.metadata.get("name") or plan_label(assignment))
        if key not in self._built:
            if all(s == "fp32" for s in assignment.values()):
                module = self.model
            else:
                rounder = self._rounder
                if rounder is None and self._calib is not None and plan.rounds:
                    rounder = self._rounder = Rounder(self.model, self._calib)  # shared
                try:
                    module = quantize(
                        self.model, plan, backend=self.backend, calib=self._calib, rounder=rounder
                    )
                except ValueError as exc:
                    raise ValueError(f"{argument}: {exc}") from None
            module.eval()
            self._built[key] = module
        return self._built[key], name, plan

    def _candidate(self, spec: VariantLike, argument: str) -> _Candidate:
        module, name, plan = self._variant(spec, argument)
        return _Candidate(name, KVDecoder(module, compile=self.compile, argument=argument), plan)

    @property
    def compile_info(self) -> dict[str, dict[str, str]]:
        """How the reference and the draft decode (``{"mode": ..., "reason": ...}`` each)."""
        return {
            "reference": dict(self._reference.compile_info),
            "draft": dict(self._draft.decoder.compile_info),
        }

    @property
    def draft_name(self) -> str:
        """The draft variant's name (its scheme, or scheme counts for a mixed plan)."""
        return self._draft.name

    @property
    def draft_module(self) -> nn.Module:
        """The module that drafts."""
        return self._draft.decoder.module

    @property
    def reference_module(self) -> nn.Module:
        """The module that verifies (whose output the controller reproduces)."""
        return self._reference.module

    # -- decoding -------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: Tensor | Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        k: int | None = None,
    ) -> Tensor:
        """The prompt followed by up to ``max_new_tokens`` tokens of the reference's decoding.

        Greedy (``temperature=0``) returns exactly the reference's greedy continuation;
        with ``temperature > 0`` each token is distributed as a sample from the reference's
        ``softmax(logits / temperature)`` (``seed`` fixes the draws). Decoding stops after
        an ``eos_token_id`` (included) or ``max_new_tokens`` tokens. ``k`` overrides the
        controller's number of drafted tokens per step for this call. The input is one
        sequence: ``[1, T]`` or a list of ids (answered ``[1, T + n]``), or ``[T]`` (answered
        ``[T + n]``).

        >>> spec.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4).shape  # doctest: +SKIP
        torch.Size([1, 7])
        """
        prompt = _as_prompt(input_ids)
        _check_count("max_new_tokens", max_new_tokens, low=0)
        _check_temperature(temperature)
        if k is not None:
            _check_count("k", k, low=0)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise invalid("seed", seed, "an integer or None")
        eos = _eos_set(eos_token_id)
        generator = None
        if temperature > 0:
            generator = torch.Generator()
            if seed is None:
                generator.seed()  # a fresh seed, leaving torch's global generator alone
            else:
                generator.manual_seed(seed)
        records: list[_StepRecord] = []
        tokens = self._decode(
            prompt,
            self._draft.decoder,
            self.k if k is None else k,
            max_new_tokens,
            float(temperature),
            eos,
            generator,
            records,
        )
        self._record(records)
        out = torch.tensor(tokens, dtype=torch.long)
        if isinstance(input_ids, Tensor):
            out = out.to(input_ids.device)
            return out.unsqueeze(0) if input_ids.dim() == 2 else out
        return out.unsqueeze(0)

    def _decode(
        self,
        prompt: list[int],
        draft: KVDecoder,
        k: int,
        max_new_tokens: int,
        temperature: float,
        eos: frozenset[int],
        generator: torch.Generator | None,
        records: list[_StepRecord],
    ) -> list[int]:
        """The decoding loop; appends one record per step to ``records``."""
        ref, now = self._reference, self._clock
        recurrent = ref.recurrent or draft.recurrent
        if k > MAX_RECURRENT_K and recurrent:
            raise invalid(
                "k",
                k,
                f"at most {MAX_RECURRENT_K} for a model with recurrent layers (its cache rolls "
                f"back at most {ROLLBACK_TOKENS} tokens)",
            )
        capacity = len(prompt) + max_new_tokens + k + 1
        ref.reset(capacity)
        draft.reset(capacity)
        seq = list(prompt)
        emitted = 0
        # the reference reads the prompt alone; the draft then adopts its keys and values
        # rather than running the prompt itself (where the caches allow: KVDecoder.adopt).
        # A recurrent cache cannot roll back into its first pass: the reference reads the
        # prompt alone there too, and the draft reads it with the reference's first token
        shared = k > 0 and draft.can_adopt(ref)
        with torch.inference_mode():
            while emitted < max_new_tokens:
                t0 = now()
                first = (shared and not draft.seen) or (recurrent and not ref.seen)
                k_step = 0 if first else min(k, max_new_tokens - emitted - 1)
                drafted, q = self._draft_tokens(draft, seq, k_step, temperature, eos, generator)
                t1 = now()
                unseen, keep = seq[ref.seen :] + drafted, len(drafted) + 1
                # compiled: pad a short verification (end of budget, EOS) to the step's usual
                # k + 1 tokens, the graph already built; the padding is cropped like a rejection
                pad = max(0, k + 1 - len(unseen)) if ref.static and ref.seen else 0
                logits = ref.feed(unseen + unseen[-1:] * pad, keep=keep + pad)[:keep]
                t2 = now()
                if temperature > 0:
                    p = torch.softmax(logits.cpu() / temperature, dim=-1)
                    accepted, extra = verify_sampled(p, q, drafted, generator)
                else:
                    accepted, extra = _accepted_greedy(logits, drafted)
                new = [*drafted[:accepted], extra]
                stop = False
                for j, token in enumerate(new):
                    if token in eos:
                        new, stop = new[: j + 1], True
                        break
                valid = len(seq) + accepted  # the prefix both caches may keep
                seq.extend(new)
                emitted += len(new)
                ref.rollback(valid)
                draft.rollback(valid)
                if shared and not draft.seen:
                    shared = draft.adopt(ref, valid)
                t3 = now()
                records.append(
                    _StepRecord(k_step, len(drafted), accepted, len(new), t1 - t0, t2 - t1, t3 - t0)
                )
                if stop:
                    break
        return seq

    @staticmethod
    def _draft_tokens(
        draft: KVDecoder,
        seq: list[int],
        k: int,
        temperature: float,
        eos: frozenset[int],
        generator: torch.Generator | None,
    ) -> tuple[list[int], list[Tensor]]:
        """Up to ``k`` drafted tokens (fewer when one is an EOS) and, when sampling, the
        distributions they were drawn from."""
        drafted: list[int] = []
        dists: list[Tensor] = []
        if k == 0:
            return drafted, dists
        logits = draft.feed(seq[draft.seen :], keep=1)[0]
        while True:
            if temperature > 0:
                q = torch.softmax(logits.cpu() / temperature, dim=-1)
                token = _sample(q, generator)
                dists.append(q)
            else:
                token = int(logits.argmax())
            drafted.append(token)
            if len(drafted) == k or token in eos:
                return drafted, dists
            logits = draft.feed([token], keep=1)[0]

    def _record(self, records: list[_StepRecord]) -> None:
        call_id = self._next_call
        self._next_call += 1
        rows = [
            (
                call_id,
                i,
                r.k,
                r.drafted,
                r.accepted,
                r.emitted,
                r.draft_s * 1e3,
                r.verify_s * 1e3,
                r.step_s * 1e3,
            )
            for i, r in enumerate(records)
        ]
        self._audit.extend(rows)
        t = self._totals
        t.steps += len(records)
        t.drafted += sum(r.drafted for r in records)
        t.accepted += sum(r.accepted for r in records)
        t.emitted += sum(r.emitted for r in records)
        t.seconds += sum(r.step_s for r in records)

    # -- audit ----------------------------------------------------------------------------------
    @property
    def audit(self) -> pd.DataFrame:
        """One row per decoding step (oldest first): ``call_id`` (the :meth:`generate` call),
        ``step`` (0: the step that also ran the prompt), ``k`` (tokens the step could draft),
        ``drafted`` (fewer at an EOS), ``accepted``, ``emitted`` (accepted + the reference's
        token, cut after an EOS), ``draft_ms``, ``verify_ms`` and ``step_ms`` (all of it)."""
        return self._audit.frame()

    @property
    def audit_log(self) -> AuditLog:
        """The underlying ring buffer (``clear()``, ``close()``, ``total``)."""
        return self._audit

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens over every step since construction (NaN before any)."""
        t = self._totals
        return t.accepted / t.drafted if t.drafted else math.nan

    @property
    def tokens_per_step(self) -> float:
        """Emitted tokens per step since construction (NaN before any)."""
        t = self._totals
        return t.emitted / t.steps if t.steps else math.nan

    @property
    def tokens_per_s(self) -> float:
        """Emitted tokens per second of decoding (prompt passes included) since construction."""
        t = self._totals
        return t.emitted / t.seconds if t.seconds else math.nan

    # -- tuning ---------------------------------------------------------------------------------
    def tune(
        self,
        prompts: Sequence[Tensor | Sequence[int]],
        *,
        ks: Sequence[int] | None = None,
        drafts: Sequence[VariantLike] | None = None,
        max_new_tokens: int | None = None,
        costs: StepCosts | Mapping[str, StepCosts] | None = None,
        options: SpeculativeOptions | None = None,
    ) -> pd.DataFrame:
        """Choose ``k`` (and the draft among ``drafts``) for the most tokens per second.

        Each candidate draft decodes every prompt with the largest ``k``; the accepted count
        of each full step gives, for every smaller ``k``, the tokens that step would have
        emitted (``min(accepted, k) + 1``: the first ``k`` drafted tokens are the same), so
        the expected tokens per step are measured, not modelled (``tokens_per_step_geometric``
        shows the i.i.d. model ``(1 - a^(k+1)) / (1 - a)`` for the measured rate ``a``). The
        costs are timed on this machine (one draft pass, the reference's pass over ``k + 1``
        tokens, the step's overhead) unless ``costs`` gives them (one :class:`StepCosts` for
        every draft, or one per draft name). The best row sets :attr:`k` and the draft; the
        table of every candidate is returned and kept as :attr:`tuning`. ``k = 0`` in ``ks``
        adds plain reference decoding as a baseline row.

        >>> spec.tune(prompts, ks=(1, 2, 4), drafts=["w8a16", "w4a16"])  # doctest: +SKIP
        """
        given = {"ks": None if ks is None else tuple(ks), "max_new_tokens": max_new_tokens}
        opts = options or SpeculativeOptions()
        if not isinstance(opts, SpeculativeOptions):
            raise wrong_type("options", opts, "a SpeculativeOptions or None")
        if any(v is not None for v in given.values()):
            opts = dataclasses.replace(opts, **{k: v for k, v in given.items() if v is not None})
        parsed = [_as_prompt(p, argument=f"prompts[{i}]") for i, p in enumerate(_listed(prompts))]
        if isinstance(drafts, (str, nn.Module, Mapping, PrecisionPlan)):
            drafts = [drafts]
        candidates = (
            [self._draft]
            if drafts is None
            else [self._candidate(d, f"drafts[{i}]") for i, d in enumerate(drafts)]
        )
        if not candidates:
            raise invalid("drafts", drafts, "a non-empty list of plans (or None: the draft)")
        rows = []
        for index, candidate in enumerate(candidates):
            step_costs = self._costs_for(candidate, costs, parsed[0], opts)
            accepted, overhead = self._acceptance(candidate, parsed, opts)
            if costs is None:
                step_costs = StepCosts(step_costs.draft_ms, step_costs.verify_ms, overhead)
            for row in _tuning_rows(candidate.name, accepted, step_costs, opts.ks):
                rows.append({**row, "candidate": index})
        frame = pd.DataFrame(rows)
        score = frame["tokens_per_s"].to_numpy(dtype=float)
        ks = frame["k"].to_numpy()
        if (ks == 0).any():  # speculate only for a gain beyond the timings' noise
            score = np.where(ks > 0, score / (1 + opts.min_gain), score)
        best = int(score.argmax())
        frame["chosen"] = frame.index == best
        self.k = int(frame.loc[best, "k"])
        self._draft = candidates[int(frame.loc[best, "candidate"])]
        self.tuning = frame.drop(columns="candidate")
        return self.tuning

    def _acceptance(
        self, candidate: _Candidate, prompts: list[list[int]], opts: SpeculativeOptions
    ) -> tuple[np.ndarray, float]:
        """Accepted counts of the full steps at the largest ``k`` and the mean step overhead
        (ms) beyond the timed passes."""
        k = max(opts.ks)
        generator = torch.Generator()
        generator.manual_seed(opts.seed)
        records: list[_StepRecord] = []
        later: list[_StepRecord] = []  # the steps that did not run a prompt
        for prompt in prompts:
            steps: list[_StepRecord] = []
            self._decode(
                prompt,
                candidate.decoder,
                k,
                opts.max_new_tokens,
                opts.temperature,
                frozenset(),
                generator if opts.temperature > 0 else None,
                steps,
            )
            records += steps
            later += steps[1:]
        full = [r.accepted for r in records if r.drafted == k and k > 0]
        rest = [(r.step_s - r.draft_s - r.verify_s) * 1e3 for r in later or records]
        overhead = float(np.median(rest))
        return np.asarray(full, dtype=np.int64), max(overhead, 0.0)

    def _costs_for(
        self,
        candidate: _Candidate,
        costs: StepCosts | Mapping[str, StepCosts] | None,
        prompt: list[int],
        opts: SpeculativeOptions,
    ) -> StepCosts:
        if isinstance(costs, StepCosts):
            return costs
        if isinstance(costs, Mapping):
            if candidate.name not in costs or not isinstance(costs[candidate.name], StepCosts):
                raise invalid("costs", dict(costs), f"a StepCosts for the draft {candidate.name!r}")
            return costs[candidate.name]
        if costs is not None:
            raise wrong_type("costs", costs, "a StepCosts, a {draft name: StepCosts} or None")
        return self._measure_costs(candidate.decoder, prompt, opts.ks, opts.repeats)

    def measure_costs(
        self,
        prompt: Tensor | Sequence[int],
        *,
        ks: Sequence[int] = DEFAULT_KS,
        repeats: int = 5,
    ) -> StepCosts:
        """Time, after ``prompt``, one pass of the draft and the reference's pass over ``k + 1``
        tokens for each ``k`` (medians of ``repeats``), as in a step (``k`` draft passes, then
        the verification), each cropped back after it.

        >>> spec.measure_costs([1, 2, 3], ks=(1, 4)).verify_ms  # doctest: +SKIP
        {1: 0.61, 4: 0.66}
        """
        _check_count("repeats", repeats)
        ks = SpeculativeOptions(ks=tuple(ks)).ks
        return self._measure_costs(self._draft.decoder, _as_prompt(prompt, "prompt"), ks, repeats)

    def _measure_costs(
        self, decoder: KVDecoder, ids: list[int], ks: Sequence[int], repeats: int
    ) -> StepCosts:
        """Costs timed as ``generate`` runs a step: ``k`` draft passes then the reference's
        pass over ``k + 1`` tokens, in turn, so each finds its weights where the other's pass
        left the CPU caches (timed apart, a draft pass of stdlib_lm read 1.18 ms where a step
        took 1.44 ms per drafted token, and the tuner chose k = 3 for a 0.68x slowdown);
        ``k = 0``: the reference alone, one token at a time."""
        ref, read = self._reference, self._clock
        with torch.inference_mode():
            for d in (decoder, ref):
                d.reset(len(ids) + max(*ks, 1) + 1)
                d.feed(ids, keep=1)
            n = len(ids)
            token = ids[-1]

            def step(k: int) -> tuple[float, float]:
                start = read()
                for _ in range(k):
                    decoder.feed([token], keep=1)
                drafted = read()
                ref.feed([token] * (k + 1), keep=k + 1)
                verified = read()
                decoder.rollback(n)
                ref.rollback(n)
                return (drafted - start) / max(k, 1), verified - drafted

            draft: list[float] = []
            verify: dict[int, float] = {}
            for k in ks:
                step(k)  # warm-up (the first step of a k compiles its graphs)
                samples = [step(k) for _ in range(repeats)]
                verify[k] = 1e3 * statistics.median(v for _, v in samples)
                draft += [d for d, _ in samples] if k else []
            if not draft:  # k = 0 only: a draft pass is never part of a step
                draft = [step(1)[0] for _ in range(repeats)]
        return StepCosts(draft_ms=1e3 * statistics.median(draft), verify_ms=verify)

    def __repr__(self) -> str:
        return (
            f"SpeculativeController(draft={self.draft_name!r}, "
            f"reference={self.reference_name!r}, k={self.k}, backend={self.backend!r})"
        )


def _listed(prompts: Any) -> list[Any]:
    if isinstance(prompts, Tensor) and prompts.dim() == 2:
        return list(prompts)  # a batch of prompts, one row each
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise invalid("prompts", prompts, "a non-empty list of prompts (token id tensors)")
    return list(prompts)


def _tuning_rows(
    name: str, accepted: np.ndarray, costs: StepCosts, ks: Sequence[int]
) -> list[dict[str, Any]]:
    """One row per ``k``: measured and modelled tokens per step, step cost, tokens per second."""
    k_max = max(ks)
    n_acc = int(accepted.sum())
    rejected = int((accepted < k_max).sum())
    rate = n_acc / (n_acc + rejected) if n_acc + rejected else math.nan
    rows = []
    for k in ks:
        per_step = 1.0 + (float(np.minimum(accepted, k).mean()) if len(accepted) else 0.0)
        step_ms = costs.step_ms(k)
        rows.append(
            {
                "draft": name,
                "k": k,
                "acceptance_rate": rate,
                "tokens_per_step": per_step,
                "tokens_per_step_geometric": (
                    expected_tokens_per_step(rate, k) if rate == rate else math.nan
                ),
                "draft_ms": costs.draft_ms,
                "verify_ms": float(costs.verify_ms[k]) if k in costs.verify_ms else math.nan,
                "step_ms": step_ms,
                "tokens_per_s": per_step / step_ms * 1e3 if step_ms > 0 else math.inf,
            }
        )
    return rows


__all__ = [
    "SpeculativeController",
    "SpeculativeOptions",
    "StepCosts",
    "expected_tokens_per_step",
    "verify_sampled",
]
