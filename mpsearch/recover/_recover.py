"""``recover``: a short quantization-aware fine-tune of a chosen plan, distilled from fp32.

The student is a deep copy of the model in which every Linear / Conv1d / Conv2d / HF ``Conv1D``
the plan quantizes computes as the ``simulate`` backend does (weight fake-quantized, input
fake-quantized, arithmetic in the scheme's compute dtype) with straight-through gradients:
the weight through a ``torch.nn.utils.parametrize`` parametrization, the input through a
forward pre-hook, both removed at the end (the trained float weights stay). A Mixture-of-Experts
bank the ``simulate`` backend runs weight-only (every scheme on a bank outside Hugging Face's
expert interface; schemes without activation quantization on one of it) is trained the same
way: each expert weight fake-quantized by expert output channel, the bank's own forward in
float32 on weights and input rounded to the compute dtype (exact products, as the profiler's
emulation). Layers of the other quantizable kinds run quantized as the ``simulate`` backend
runs them, and stay frozen.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mpsearch._data import (
    Batch,
    as_batches,
    batch_size,
    is_multi_label,
    main_output,
    output_tensor,
    run_model,
)
from mpsearch._validation import check_module, check_positive, invalid
from mpsearch.backends import get_backend
from mpsearch.backends._quantize import PlanLike, as_plan, check_assignment, read_directly
from mpsearch.layers import quantizable_layers, replace_layers
from mpsearch.layers._expert_linears import follows_expert_interface
from mpsearch.layers._experts import expert_rows, expert_weights, from_expert_rows, is_expert_bank
from mpsearch.layers._layers import eval_mode, is_hf_conv1d, make_plain
from mpsearch.plan import PrecisionPlan
from mpsearch.profile._cache import hash_batches, hash_model, hash_text
from mpsearch.profile._metrics import CLASS_DIMS, auto_metric, callable_id, label_pairs
from mpsearch.recover._options import LossFn, RecoverOptions
from mpsearch.rounding import Rounder
from mpsearch.schemes import QuantSpec, Scheme, fake_quantize, get_scheme

CODE_VERSION = "recover-2"
"""Bumped whenever the same arguments would train differently (old checkpoints are refused)."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TRAINABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class RecoveryResult:
    """What :func:`recover` returns.

    ``model``: the float model with the recovered weights (eval mode, the user's module types
    and names; a trained layer that transforms its weight, ``weight_norm`` or weight
    standardization, is the plain base type, holding the weight it computed with), to
    pass to :func:`mpsearch.quantize` with ``plan``: the plan's schemes, rounded to nearest (a
    calibrated rounding the plan asked for was the fine-tune's start; the fine-tuned weights
    are meant for round to nearest). ``history``: one row per step (``step``, ``train_loss``,
    ``val_loss`` where evaluated; step 0 is the model before training). ``loss_before`` /
    ``loss_after``: the held-out distillation loss of the fake-quantized model before training
    and of the returned weights (the best evaluated, so never above ``loss_before``), reached
    at ``best_step`` (0: training did not help). ``trained``: the layers fine-tuned with their
    quantizers; ``frozen``: ``{layer: why}`` for the planned layers left as they were (a layer
    the model never calls, reading its weight directly, stays fp32, in ``plan`` too, as
    :func:`mpsearch.quantize` keeps it). ``resumed_from``: the checkpoint step this call
    started from (``None``: a fresh run).
    """

    model: nn.Module
    plan: PrecisionPlan
    history: pd.DataFrame
    loss_before: float
    loss_after: float
    best_step: int
    steps_done: int
    trained: list[str]
    frozen: dict[str, str] = field(default_factory=dict)
    resumed_from: int | None = None

    def __repr__(self) -> str:
        return (
            f"RecoveryResult(loss_before={self.loss_before:.6g}, loss_after={self.loss_after:.6g}, "
            f"best_step={self.best_step}, steps_done={self.steps_done}, "
            f"trained={len(self.trained)} layers, frozen={len(self.frozen)} layers)"
        )


# --- straight-through fake quantization ---------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """``fn(x)`` in the forward, the identity in the backward (exact forward values)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.dtype = x.dtype
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.to(ctx.dtype), None


def _weight_q(w: Tensor, spec: QuantSpec, dtype: torch.dtype, transposed: bool) -> Tensor:
    if transposed:  # HF Conv1D: quantized as the Linear on its transposed weight
        return fake_quantize(w.t().float(), spec).to(dtype).t()
    return fake_quantize(w.float(), spec).to(dtype)


def _input_q(x: Tensor, spec: QuantSpec | None, dtype: torch.dtype) -> Tensor:
    if spec is not None and not spec.is_identity:
        x = fake_quantize(x.float(), spec)
    return x.to(dtype)


class _QuantizedWeight(nn.Module):
    """Parametrization: the weight as the ``simulate`` backend stores it, straight-through."""

    def __init__(self, scheme: Scheme, transposed: bool) -> None:
        super().__init__()
        self.fn = partial(
            _weight_q,
            spec=scheme.weight,
            dtype=_DTYPES[scheme.compute_dtype],
            transposed=transposed,
        )

    def forward(self, w: Tensor) -> Tensor:
        return _StraightThrough.apply(w, self.fn)


class _QuantizedExpertWeight(nn.Module):
    """Parametrization: a bank's 3-D expert weight fake-quantized by expert output channel (as
    the ``simulate`` backend stores it) and rounded to the compute dtype, kept in float32,
    straight-through; ``is_transposed`` is its bank's layout."""

    def __init__(self, scheme: Scheme, is_transposed: bool) -> None:
        super().__init__()
        self.spec, self.dtype, self.is_transposed = (
            scheme.weight,
            _DTYPES[scheme.compute_dtype],
            is_transposed,
        )

    def _fake(self, w: Tensor) -> Tensor:
        rows = fake_quantize(expert_rows(self, w.float()), self.spec)
        return from_expert_rows(self, rows, w.shape).to(self.dtype).to(w.dtype)

    def forward(self, w: Tensor) -> Tensor:
        return _StraightThrough.apply(w, self._fake)


def _rounded(x: Tensor, spec: QuantSpec | None, dtype: torch.dtype) -> Tensor:
    return _input_q(x, spec, dtype).to(x.dtype)


class _Cast(nn.Module):
    """Parametrization: the bias in the compute dtype (a differentiable cast)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, b: Tensor) -> Tensor:
        return b.to(self.dtype)


def _input_hook(fn: Callable[[Tensor], Tensor], _module: nn.Module, args: tuple) -> tuple:
    return (_StraightThrough.apply(args[0], fn), *args[1:])


def _output_hook(dtype: torch.dtype, _module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
    return out.to(dtype)


@contextmanager
def _fake_quantized(
    student: nn.Module, trained: Mapping[str, Scheme], simulated: Mapping[str, nn.Module]
) -> Iterator[nn.Module]:
    """Within, ``student`` computes as the plan's ``simulate`` model with straight-through
    gradients for the ``trained`` layers and ``simulated`` modules in place of the frozen ones;
    afterwards it is the plain float model again (same module types, trained weights kept)."""
    handles = []
    done: list[tuple[nn.Module, str]] = []
    orders: dict[nn.Module, list[str]] = {}
    previous = replace_layers(student, simulated)
    try:
        for name, scheme in trained.items():
            layer = student.get_submodule(name)
            orders[layer] = list(layer._parameters)
            if is_expert_bank(layer):
                transposed = bool(getattr(layer, "is_transposed", False))
                for weight in expert_weights(layer):
                    parametrize.register_parametrization(
                        layer, weight, _QuantizedExpertWeight(scheme, transposed), unsafe=True
                    )
                    done.append((layer, weight))
                # the hidden states as each expert Linear takes them (a cast at most: schemes
                # with scaled activations are not trained), kept in float32 as the weights
                act = scheme.activation if follows_expert_interface(layer) else None
                fn = partial(_rounded, spec=act, dtype=_DTYPES[scheme.compute_dtype])
                handles.append(layer.register_forward_pre_hook(partial(_input_hook, fn)))
                continue
            dtype = _DTYPES[scheme.compute_dtype]
            out_dtype = layer.weight.dtype
            parametrize.register_parametrization(
                layer, "weight", _QuantizedWeight(scheme, is_hf_conv1d(layer)), unsafe=True
            )
            done.append((layer, "weight"))
            if getattr(layer, "bias", None) is not None and dtype != out_dtype:
                parametrize.register_parametrization(layer, "bias", _Cast(dtype), unsafe=True)
                done.append((layer, "bias"))
            act = scheme.activation
            if dtype != out_dtype or (act is not None and not act.is_identity):
                fn = partial(_input_q, spec=act, dtype=dtype)
                handles.append(layer.register_forward_pre_hook(partial(_input_hook, fn)))
            if dtype != out_dtype:
                handles.append(layer.register_forward_hook(partial(_output_hook, out_dtype)))
        yield student
    finally:
        for handle in handles:
            handle.remove()
        for layer, tensor_name in reversed(done):
            parametrize.remove_parametrizations(layer, tensor_name, leave_parametrized=False)
        for layer, names in orders.items():  # removal re-registers weight after bias
            layer._parameters = {n: layer._parameters[n] for n in names}
        replace_layers(student, previous)


def _roles(
    model: nn.Module, assignment: Mapping[str, str]
) -> tuple[dict[str, Scheme], dict[str, str]]:
    """``({layer: scheme} trained with its quantizer, {layer: why} left frozen)`` among the
    layers the plan puts in a scheme other than fp32."""
    layers = quantizable_layers(model)
    trained: dict[str, Scheme] = {}
    frozen: dict[str, str] = {}
    for name, scheme_name in assignment.items():
        if scheme_name == "fp32":
            continue
        layer = layers[name]
        parent_name, _, attr = name.rpartition(".")
        kind = type(layer).__name__
        if (
            isinstance(model.get_submodule(parent_name), nn.MultiheadAttention)
            and attr == "out_proj"
        ):
            frozen[name] = (
                "nn.MultiheadAttention reads out_proj's weight directly (the layer is never "
                "called), so its input cannot be fake-quantized in training; it runs quantized "
                "but is not trained"
            )
        elif isinstance(layer, _TRAINABLE_TYPES) or is_hf_conv1d(layer):
            trained[name] = get_scheme(scheme_name)
        elif is_expert_bank(layer):
            scheme = get_scheme(scheme_name)
            if not scheme.quantizes_activations or not follows_expert_interface(layer):
                trained[name] = scheme
            else:
                frozen[name] = (
                    f"{scheme.name} quantizes the activations of each of the bank's expert Linear "
                    "layers on their own ranges, which quantization-aware training does not "
                    "reach; it runs quantized but is not trained (weight-only schemes train it)"
                )
        else:
            frozen[name] = (
                "quantization-aware training covers Linear, Conv1d, Conv2d, HF Conv1D and "
                f"Mixture-of-Experts banks, not {kind}; it runs quantized during training but "
                "its weights are not trained"
            )
    return trained, frozen


# --- losses ---------------------------------------------------------------------------------


def _kl(student: Tensor, teacher: Tensor, *, temperature: float, dim: int) -> Tensor:
    log_q = F.log_softmax(student.float() / temperature, dim=dim)
    log_p = F.log_softmax(teacher.float() / temperature, dim=dim)
    return (log_p.exp() * (log_p - log_q)).sum(dim=dim).mean() * temperature**2


def _mse(student: Tensor, teacher: Tensor) -> Tensor:
    return F.mse_loss(student.float(), teacher.float())


def _bernoulli_kl(student: Tensor, teacher: Tensor, *, temperature: float) -> Tensor:
    return _kl(label_pairs(student), label_pairs(teacher), temperature=temperature, dim=-1)


def _loss_fn(
    options: RecoverOptions, reference: Tensor, name: str | None, *, multi_label: bool
) -> LossFn:
    """The loss ``options.loss`` names for the teacher's output ``reference`` (named ``name``
    in the model's output, a multi-label classifier's or not)."""
    loss = options.loss
    if callable(loss):
        return loss
    if loss == "auto":
        loss = auto_metric(reference, name, multi_label=multi_label)
    if loss in CLASS_DIMS:
        return partial(_kl, temperature=options.temperature, dim=CLASS_DIMS[loss])
    if loss == "bernoulli_kl":
        return partial(_bernoulli_kl, temperature=options.temperature)
    return _mse


def _scalar(value: Any, where: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise TypeError(
            f"The 'loss' option must return a scalar tensor (student, teacher) -> loss; "
            f"{where} it returned {type(value).__name__}"
            + (f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else "")
            + "."
        )
    return value.reshape(())


# --- checkpoints ----------------------------------------------------------------------------


def _fingerprint_parts(
    model: nn.Module,
    plan_json: str,
    batches: list[Batch],
    steps: int,
    lr: float,
    opts: RecoverOptions,
) -> dict[str, str]:
    options = {
        name: callable_id(value) if callable(value) else value
        for name, value in ((n, getattr(opts, n)) for n in opts.names())
    }
    return {
        "model weights": hash_model(model),
        "plan": hash_text(plan_json),
        "calibration data": hash_batches(batches),
        "steps": str(steps),
        "lr": repr(float(lr)),
        "options": hash_text(json.dumps(options, sort_keys=True, default=repr)),
        "code version": CODE_VERSION,
    }


def _save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file in the same folder, then
    ``os.replace``): a run killed while saving leaves the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, parts: Mapping[str, str]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (``None`` when there is none), refused when it was written
    for another run."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"The checkpoint {str(path)!r} cannot be read as a recover checkpoint ({exc}). "
            "Delete it or pass another 'checkpoint' path."
        ) from exc
    saved = state.get("fingerprint") if isinstance(state, dict) else None
    if saved != dict(parts):
        changed = (
            sorted(k for k in parts if saved.get(k) != parts[k])
            if isinstance(saved, dict)
            else ["everything (not a recover checkpoint)"]
        )
        raise ValueError(
            f"The checkpoint {str(path)!r} was written by another recovery run (different "
            f"{', '.join(changed)}); it cannot be resumed with these arguments. Delete it or "
            "pass another 'checkpoint' path."
        )
    return state


# --- the run --------------------------------------------------------------------------------


class _Stopped(Exception):
    """Raised by the private ``stop_after`` hook (tests interrupt a run with it)."""


def _check_arguments(steps: Any, lr: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise invalid("steps", steps, "a positive integer")
    check_positive("lr", lr)


def _split(batches: list[Batch], opts: RecoverOptions) -> tuple[list[Batch], list[Batch]]:
    """(training batches, held-out batches: the last ``val_batches``), refusing too little data."""
    n = sum(batch_size(b) for b in batches)
    if n < opts.min_samples:
        raise ValueError(
            f"The 'calib' argument holds {n} samples in {len(batches)} batches; recover needs "
            f"at least {opts.min_samples} samples (the 'min_samples' option). Pass more "
            "calibration data."
        )
    needed = opts.val_batches + 1
    if len(batches) < needed:
        raise ValueError(
            f"The 'calib' argument holds {len(batches)} batch(es); recover needs at least "
            f"{needed}: {opts.val_batches} held out for validation (the 'val_batches' option) "
            "and at least one to train on. Split the data into more batches."
        )
    return batches[: -opts.val_batches], batches[-opts.val_batches :]


def _order(step: int, n: int, seed: int) -> int:
    """The training batch of ``step``: epochs of a seeded permutation (stateless, so a resumed
    run sees the same order)."""
    epoch, i = divmod(step, n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=g)[i])


def recover(
    model: nn.Module,
    plan: PlanLike,
    calib: Iterable[Any],
    *,
    steps: int = 200,
    lr: float = 1e-4,
    options: RecoverOptions | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    rounder: Rounder | None = None,
) -> RecoveryResult:
    """Fine-tune ``model``'s weights for ``plan`` by distillation from ``model`` itself.

    A deep copy of ``model`` (which is never modified) is trained with the plan's fake
    quantization in its forward and straight-through gradients, to match the fp32 model's
    outputs on the calibration batches (no labels): KL of the softmax for logits, else MSE (see
    :class:`RecoverOptions`). The model stays in eval mode (BatchNorm statistics frozen, dropout
    off); AdamW with a cosine schedule to 0, seeded. The last calibration batch(es) are held out:
    their loss is measured before training, every ``eval_every`` steps and at the end, and the
    best weights are returned, so the result is never worse on them than the plan's
    round-to-nearest quantization. A calibrated rounding in the plan (``"w4a16+gptq"``) is
    applied first, by ``rounder`` (e.g. the profile's, with its options) or one built on the
    training batches: the fine-tune starts from its latent weights (the float weights nearest
    to the model's own that round to it, :meth:`~mpsearch.rounding.Rounder.latent`).

    Activation ranges are dynamic during training (as ``quantize`` without ``calib``).
    With ``checkpoint`` (a file path) the run is saved every ``checkpoint_every`` steps and at
    the end; a later call with the same arguments resumes from it (bit-identical to an
    uninterrupted run) or, when it is finished, returns at once.

    >>> import mpsearch as mps
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    >>> batches = [torch.randn(16, 32) for _ in range(4)]
    >>> res = recover(net, "w4a16", batches, steps=20, lr=1e-3, progress=False)
    >>> res.loss_after <= res.loss_before, res.trained
    (True, ['0', '2'])
    >>> qnet = mps.quantize(res.model, "w4a16", backend="simulate")
    """
    return _recover(
        model,
        plan,
        calib,
        steps=steps,
        lr=lr,
        options=options,
        checkpoint=checkpoint,
        progress=progress,
        rounder=rounder,
    )


def _recover(
    model: nn.Module,
    plan: PlanLike,
    calib: Iterable[Any],
    *,
    steps: int,
    lr: float,
    options: RecoverOptions | None,
    checkpoint: str | os.PathLike[str] | None,
    progress: bool,
    rounder: Rounder | None = None,
    stop_after: int | None = None,
) -> RecoveryResult:
    """:func:`recover`, with ``stop_after``: raise :class:`_Stopped` once that many steps ran
    in this call (an interruption, for the tests)."""
    check_module(model)
    opts = RecoverOptions.resolve(options, {}, verb="recover")
    _check_arguments(steps, lr)
    plan = as_plan(plan)
    assignment = plan.resolve(model)
    simulate = get_backend("simulate")
    check_assignment(model, assignment, simulate)
    batches = as_batches(calib, argument="calib")
    train_batches, val_batches = _split(batches, opts)
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise invalid("checkpoint", checkpoint, "None or a file path")
    path = None if checkpoint is None else Path(checkpoint)
    choices = plan.resolve_choices(model)
    read = read_directly(model, batches, [n for n, s in assignment.items() if s != "fp32"])
    for name in read:  # as quantize keeps them: their weights are read directly
        assignment[name] = choices[name] = "fp32"
    trained, frozen = _roles(model, assignment)
    if not trained and opts.train == "layers":
        why = "; ".join(f"{n!r}: {r}" for n, r in frozen.items()) or "every layer stays fp32"
        raise ValueError(
            f"The 'plan' argument leaves recover no layer to train ({why}). Quantize it as it "
            "is (mpsearch.quantize), or plan a Linear, Conv1d, Conv2d, HF Conv1D or "
            "Mixture-of-Experts bank (in a weight-only scheme) that it can train."
        )

    student = copy.deepcopy(model).eval()
    for name in trained:  # weight_norm, weight standardization: the weight computed with trains
        make_plain(student.get_submodule(name))
    if plan.rounds:  # the fine-tune starts from the plan's calibrated rounding
        rounder = rounder if rounder is not None else Rounder(model, train_batches)
        rounder.apply(student, choices, inplace=True, latent=True)
    params = _trainable(student, trained, frozen, opts.train)
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    layers = quantizable_layers(student)
    simulated = {
        name: simulate.quantize_layer(layers[name], get_scheme(assignment[name])) for name in frozen
    }
    parts: dict[str, str] = {}
    state = None
    if path is not None:
        parts = _fingerprint_parts(model, plan.to_json(), batches, steps, lr, opts)
        state = _load(path, parts)

    run = _Run(
        model, student, params, val_batches, opts, steps=steps, lr=lr, path=path, parts=parts
    )
    with torch.random.fork_rng(devices=[]), eval_mode(model):
        torch.manual_seed(opts.seed)
        if state is not None:
            run.restore(state)
        if not run.done:
            with _fake_quantized(student, trained, simulated):
                run.train(train_batches, progress=progress, stop_after=stop_after)

    with torch.no_grad():
        for name, value in run.best.items():
            student.get_parameter(name).copy_(value)
    for name, p in student.named_parameters():
        p.requires_grad_(flags[name])
    return RecoveryResult(
        model=student.eval(),
        plan=PrecisionPlan.from_assignment(
            assignment, metadata={**plan.metadata, "recovered": True}
        ),
        history=pd.DataFrame(run.history, columns=["step", "train_loss", "val_loss"]).astype(
            {"step": int}
        ),
        loss_before=float(run.loss_before),
        loss_after=float(run.best_loss),
        best_step=int(run.best_step),
        steps_done=int(run.history[-1]["step"]) if run.history else 0,
        trained=list(trained),
        frozen=frozen | dict.fromkeys(read, "stays fp32: the model reads its weights directly"),
        resumed_from=run.resumed_from,
    )


def _trainable(
    student: nn.Module, trained: Mapping[str, Scheme], frozen: Mapping[str, str], train: str
) -> dict[str, nn.Parameter]:
    """The parameters the fine-tune updates: the trained layers' weights and biases
    (``train="layers"``) or every parameter outside the frozen layers (``"all"``)."""
    if train == "all":
        frozen_params = {
            f"{layer}.{p}"
            for layer in frozen
            for p, _ in student.get_submodule(layer).named_parameters()
        }
        names = [n for n, _ in student.named_parameters() if n not in frozen_params]
    else:
        names = [
            f"{layer}.{p}"
            for layer in trained
            for p in _layer_parameters(student.get_submodule(layer))
        ]
    return {name: student.get_parameter(name) for name in names}


def _layer_parameters(layer: nn.Module) -> list[str]:
    """The parameters a trained layer updates: its weight and bias (a bank: all its own)."""
    if is_expert_bank(layer):
        return [n for n, p in layer._parameters.items() if p is not None]
    return [p for p in ("weight", "bias") if getattr(layer, p, None) is not None]


class _Run:
    """One fine-tune's state: optimizer and schedule, history, the best weights so far and
    their held-out loss; it trains, evaluates, checkpoints and resumes."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        params: dict[str, nn.Parameter],
        val_batches: list[Batch],
        opts: RecoverOptions,
        *,
        steps: int,
        lr: float,
        path: Path | None,
        parts: dict[str, str],
    ) -> None:
        self.teacher, self.student, self.params, self.opts = teacher, student, params, opts
        self.steps, self.path, self.parts = steps, path, parts
        self.val_batches = val_batches
        with eval_mode(teacher), torch.no_grad():
            outs = [main_output(run_model(teacher, b)) for b in val_batches]
        self.val_refs = [out.detach() for out, _ in outs]
        self.loss_fn = _loss_fn(opts, *outs[0], multi_label=is_multi_label(teacher))
        self.val_sizes = [batch_size(b) for b in val_batches]
        self.optimizer = torch.optim.AdamW(
            list(params.values()), lr=lr, weight_decay=opts.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(_cosine, steps=steps)
        )
        self.history: list[dict[str, float]] = []
        self.start = 0
        self.done = False
        self.resumed_from: int | None = None
        self.best: dict[str, Tensor] = {n: p.detach().clone() for n, p in params.items()}
        self.best_step, self.best_loss, self.loss_before = 0, math.inf, math.nan

    def teacher_out(self, batch: Batch) -> Tensor:
        with torch.no_grad():
            return output_tensor(run_model(self.teacher, batch)).detach()

    def student_out(self, batch: Batch) -> Tensor:
        """The student's output on ``batch``, each parametrized weight computed once (a bank's
        forward reads its expert weights once per expert)."""
        with parametrize.cached():
            return output_tensor(run_model(self.student, batch))

    def evaluate(self) -> float:
        """The student's held-out distillation loss (mean over samples)."""
        total = 0.0
        with torch.no_grad():
            for batch, ref, n in zip(self.val_batches, self.val_refs, self.val_sizes, strict=True):
                out = self.student_out(batch)
                total += float(_scalar(self.loss_fn(out, ref), "on held-out data")) * n
        return total / sum(self.val_sizes)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["student"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.best_step, self.best_loss = state["best_step"], state["best_loss"]
        self.loss_before, self.start, self.done = state["loss_before"], state["step"], state["done"]
        torch.set_rng_state(state["rng"])
        self.resumed_from = self.start

    def save(self, step: int, finished: bool) -> None:
        if self.path is None:
            return
        _save(
            self.path,
            {
                "fingerprint": self.parts,
                "step": step,
                "done": finished,
                "student": {n: p.detach().clone() for n, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "history": self.history,
                "best": self.best,
                "best_step": self.best_step,
                "best_loss": self.best_loss,
                "loss_before": self.loss_before,
                "rng": torch.get_rng_state(),
            },
        )

    def train(self, batches: list[Batch], *, progress: bool, stop_after: int | None) -> None:
        """The steps left (the held-out loss first on a fresh run), with a progress bar."""
        if self.resumed_from is None:
            self.loss_before = self.best_loss = self.evaluate()
            self.history.append({"step": 0, "train_loss": math.nan, "val_loss": self.loss_before})
        bar = _progress_bar(self.steps, self.start, progress)
        try:
            step = self.start
            while step < self.steps:
                if stop_after is not None and step - self.start >= stop_after:
                    raise _Stopped(step)
                step += 1
                if not self.step(batches[_order(step - 1, len(batches), self.opts.seed)], step):
                    break
                bar.update(1)
                bar.set_postfix(
                    loss=f"{self.history[-1]['train_loss']:.4g}", best=f"{self.best_loss:.4g}"
                )
                if step % self.opts.checkpoint_every == 0 or step == self.steps:
                    self.save(step, step == self.steps)
        finally:
            bar.close()

    def step(self, batch: Batch, step: int) -> bool:
        """One optimisation step (number ``step``); ``False`` when the loss is not finite (the
        run stops, keeping the best weights)."""
        loss = _scalar(
            self.loss_fn(self.student_out(batch), self.teacher_out(batch)), "in training"
        )
        row = {"step": step, "train_loss": float(loss.detach()), "val_loss": math.nan}
        if not torch.isfinite(loss):
            warnings.warn(
                f"recover: the training loss became {float(loss.detach())} at step {step}; "
                f"stopping and returning the best weights (step {self.best_step}). Lower 'lr'.",
                RuntimeWarning,
                stacklevel=5,
            )
            self.history.append(row)
            self.done = True
            self.save(step, True)
            return False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if step % self.opts.eval_every == 0 or step == self.steps:
            row["val_loss"] = val = self.evaluate()
            if val < self.best_loss:
                self.best_loss, self.best_step = val, step
                self.best = {n: p.detach().clone() for n, p in self.params.items()}
        self.history.append(row)
        return True


def _cosine(step: int, *, steps: int) -> float:
    """The learning-rate factor at ``step``: a cosine from 1 to 0 over ``steps``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="recover", unit="step", disable=not enabled)
