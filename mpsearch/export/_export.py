"""``export_plan``: a chosen plan and its quantized model written as files, each one checked."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mpsearch._data import is_multi_label, main_output
from mpsearch._io import atomic_path
from mpsearch._validation import check_module, exception_line, invalid, unknown
from mpsearch.backends import collect_activation_ranges, get_backend
from mpsearch.backends._quantize import PlanLike, as_plan, check_assignment, runnable_plan
from mpsearch.export._artifacts import (
    build_quantized,
    export_program,
    plan_json_check,
    program_model,
    state_payload,
)
from mpsearch.export._inputs import ModelCall, as_call, check_same_shape
from mpsearch.export._qdq import ONNX_ACCEPTED, onnx_refusal
from mpsearch.plan import PrecisionPlan
from mpsearch.profile._metrics import answers_agree, auto_metric
from mpsearch.rounding import Rounder
from mpsearch.rounding._rounder import rounded_layers
from mpsearch.schemes import Observer, get_scheme

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class ExportRecord:
    """One file written by :func:`export_plan` and how it was checked.

    ``check`` is the max abs difference between the file's outputs, run back, and the PyTorch
    model it was written from (0.0 for a plan that reads back equal); ``top1_agreement`` the
    share of equal ``argmax`` over the last output dimension; ``details`` format specifics
    (ONNX node counts, opset, ...).
    """

    format: str
    path: Path
    bytes: int
    check: float
    top1_agreement: float | None
    reference: str
    notes: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportResult:
    """The files :func:`export_plan` wrote: ``paths`` (format -> file) and one record each.

    >>> res.paths["onnx"].name, res.to_frame().columns[:4].tolist()  # doctest: +SKIP
    ('model.onnx', ['format', 'path', 'bytes', 'check'])
    """

    out_dir: Path
    records: list[ExportRecord]

    @property
    def paths(self) -> dict[str, Path]:
        return {r.format: r.path for r in self.records}

    def record(self, fmt: str) -> ExportRecord:
        """The record of format ``fmt``."""
        for r in self.records:
            if r.format == fmt:
                return r
        raise unknown("fmt", fmt, [r.format for r in self.records])

    def to_frame(self) -> pd.DataFrame:
        """One row per file: format, path, bytes, check, top1_agreement, reference, notes."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "format": r.format,
                    "path": str(r.path),
                    "bytes": r.bytes,
                    "check": r.check,
                    "top1_agreement": r.top1_agreement,
                    "reference": r.reference,
                    "notes": r.notes,
                }
                for r in self.records
            ]
        )


@dataclass
class _Job:
    """Everything the format writers share; the quantized models are built once, lazily."""

    model: nn.Module
    plan: PrecisionPlan
    assignment: dict[str, str]
    backend: str
    ranges: dict[str, tuple[float, float]]
    example: ModelCall
    check_inputs: list[ModelCall]
    static: frozenset[str] = frozenset()
    _cache: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def multi_label(self) -> bool:
        """Whether the model is a multi-label classifier (:func:`~mpsearch._data.is_multi_label`)."""
        return is_multi_label(self.model)

    def quantized(self, backend: str) -> nn.Module:
        if backend not in self._cache:
            self._cache[backend] = build_quantized(
                self.model, self.plan, backend=backend, ranges=self.ranges
            )
        return self._cache[backend]


@dataclass(frozen=True)
class ExportFormat:
    """One export format: its file name, a check run before any work (returns problems) and
    the writer (writes to the temporary path it is given, returns check, agreement, reference,
    notes, details)."""

    filename: str
    validate: Callable[[_Job], list[str]]
    write: Callable[[_Job, Path], tuple[float, float | None, str, str, dict[str, Any]]]
    description: str


# ---------------------------------------------------------------- comparing outputs


Output = tuple[torch.Tensor, str | None]
"""A model's main output (float) and its name (:func:`~mpsearch._data.main_output`)."""


def _outputs(fn: Callable[..., Any], inputs: Sequence[ModelCall]) -> list[Output]:
    with torch.inference_mode():
        return [(t.float(), name) for t, name in (main_output(call(fn)) for call in inputs)]


def _compare(
    got: list[Output], want: list[Output], *, multi_label: bool = False
) -> tuple[float, float]:
    """The largest absolute difference and the top-1 agreement of ``got`` with ``want``'s
    outputs of a multi-label classifier or not (the answers
    :func:`~mpsearch.profile._metrics.answers_agree` compares); ``ValueError`` where a check
    input's outputs differ in shape (a length the model predicts changed with the precision)."""
    diff = 0.0
    agree = total = 0
    for i, ((g, _), (w, name)) in enumerate(zip(got, want, strict=True)):
        check_same_shape(i, g, w)
        agreeing = answers_agree(g, w, auto_metric(w, name, multi_label=multi_label))
        diff = max(diff, float((g - w).abs().max()))
        agree += int(agreeing.sum())
        total += agreeing.numel()
    return diff, agree / max(total, 1)


# ---------------------------------------------------------------- the formats


def _no_problems(job: _Job) -> list[str]:
    return []


def _write_plan(job: _Job, path: Path):
    path.write_text(job.plan.to_json())
    same = plan_json_check(path, job.plan)
    if not same:
        raise RuntimeError(f"The plan written to {path} does not read back equal to the plan.")
    notes = f"{len(job.assignment)} layers: " + ", ".join(
        f"{n}={s}" for n, s in job.assignment.items()
    )
    return 0.0, None, "PrecisionPlan.from_json", notes, {}


def _real_problems(job: _Job) -> list[str]:
    try:
        check_assignment(job.model, job.assignment, get_backend(job.backend))
    except ValueError as exc:
        return [str(exc)]
    return []


def _write_state(job: _Job, path: Path):
    from mpsearch.export._artifacts import load_quantized

    qm = job.quantized(job.backend)
    payload = state_payload(qm, job.plan, backend=job.backend, ranges=job.ranges)
    torch.save(payload, path)
    reloaded = load_quantized(copy.deepcopy(job.model), path)
    diff, agree = _compare(
        _outputs(reloaded, job.check_inputs),
        _outputs(qm, job.check_inputs),
        multi_label=job.multi_label,
    )
    notes = (
        f"state dict of the {job.backend!r} model ({len(payload['state_dict'])} tensors) + plan + "
        f"{len(job.ranges)} static ranges; run it with mpsearch.export.load_quantized(model, path)"
    )
    return diff, agree, f"quantize(backend={job.backend!r})", notes, {}


def _write_program(job: _Job, path: Path):
    qm = job.quantized(job.backend)
    target, swapped = program_model(qm, job.model, job.plan, ranges=job.ranges)
    program = export_program(target, job.example)
    torch.export.save(program, str(path))
    reloaded = torch.export.load(str(path))
    keywords = reloaded.call_spec.in_spec.child(1).context  # the program's kwargs
    loaded = reloaded.module()
    got = _outputs(loaded, [call.keeping(keywords) for call in job.check_inputs])
    diff, agree = _compare(got, _outputs(target, job.check_inputs), multi_label=job.multi_label)
    real_diff, real_agree = _compare(
        got, _outputs(qm, job.check_inputs), multi_label=job.multi_label
    )
    notes = f"torch.export program of the {job.backend!r} model; loads with torch.export.load"
    if swapped:
        notes += (
            f"; {', '.join(swapped)} (w8a8: opaque oneDNN weights) run as int8 codes + "
            "fake-quantized activations (simulate arithmetic), "
            f"max abs diff {real_diff:.3g} / top-1 {real_agree:.3f} vs the real kernels"
        )
    details = {"simulated_layers": swapped, "diff_vs_real": real_diff, "agree_vs_real": real_agree}
    return diff, agree, "the same model in PyTorch", notes, details


def _onnx_problems(job: _Job) -> list[str]:
    from mpsearch.export._onnx import onnx_static_refusal

    problems = []
    for name, scheme_name in job.assignment.items():
        scheme = get_scheme(scheme_name)
        why = onnx_refusal(scheme)
        if why is None and name in job.static:
            why = onnx_static_refusal(scheme)
        if why:
            problems.append(f"  {name} in {scheme_name!r}: {why}")
    if problems:
        return [
            "The plan cannot be written as ONNX Q/DQ:\n"
            + "\n".join(problems)
            + f"\nONNX export accepts: {ONNX_ACCEPTED}."
        ]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return [f"ONNX export needs onnx, onnxscript and onnxruntime ({exc}); pip install them."]
    return []


def _write_onnx(job: _Job, path: Path):
    from mpsearch.export._onnx import QDQ_OPS, check_onnx, write_onnx

    sim = job.quantized("simulate")
    schemes = [get_scheme(s) for s in job.assignment.values()]
    info = write_onnx(sim, job.example, path, schemes=schemes)
    checked = check_onnx(path, sim, job.check_inputs)
    basic = check_onnx(path, sim, job.check_inputs, optimization="basic")
    checked["max_abs_diff_basic"] = basic["max_abs_diff"]
    checked["top1_agreement_basic"] = basic["top1_agreement"]
    counts = info["node_counts"]
    qdq = {op: counts.get(op, 0) for op in QDQ_OPS}
    notes = (
        f"opset {info['opset']}; simulate plan as Q/DQ: "
        + ", ".join(f"{op} {n}" for op, n in qdq.items())
        + f", Cast {counts.get('Cast', 0)}; ONNX Runtime CPU, default optimizations (basic "
        f"level only: max abs diff {basic['max_abs_diff']:.3g}, top-1 "
        f"{basic['top1_agreement']:.4f})"
    )
    details = {**info, **checked, "qdq_nodes": qdq}
    return (
        checked["max_abs_diff"],
        checked["top1_agreement"],
        "quantize(backend='simulate')",
        notes,
        details,
    )


EXPORT_FORMATS: dict[str, ExportFormat] = {
    "plan": ExportFormat("plan.json", _no_problems, _write_plan, "the plan's JSON"),
    "state_dict": ExportFormat(
        "model.qstate.pt", _real_problems, _write_state, "quantized state dict + plan"
    ),
    "program": ExportFormat(
        "model.pt2", _real_problems, _write_program, "torch.export program (.pt2)"
    ),
    "onnx": ExportFormat("model.onnx", _onnx_problems, _write_onnx, "simulate plan as ONNX Q/DQ"),
}


# ---------------------------------------------------------------- helpers


def _formats(formats: str | Iterable[str]) -> list[str]:
    chosen = [formats] if isinstance(formats, str) else list(formats)
    if not chosen:
        raise invalid("formats", formats, f"a non-empty list of {sorted(EXPORT_FORMATS)}")
    for f in chosen:
        if f not in EXPORT_FORMATS:
            raise unknown("formats", f, EXPORT_FORMATS)
    return list(dict.fromkeys(chosen))


def _out_dir(out_dir: Any) -> Path:
    if not isinstance(out_dir, (str, os.PathLike)):
        raise invalid("out_dir", out_dir, "a directory path")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise invalid("out_dir", str(out), "a directory (or a path to create); it is a file")
    return out


def _check_inputs(
    model: nn.Module, example_input: Any, check_inputs: Sequence[Any] | None
) -> tuple[ModelCall, list[ModelCall]]:
    """``example_input`` as a model call, and the calls the checks run on."""
    example = as_call(example_input, "example_input", model=model)
    if check_inputs is None:
        return example, [example]
    inputs = [as_call(b, "check_inputs", model=model) for b in check_inputs]
    if not inputs:
        raise invalid("check_inputs", check_inputs, "a non-empty list of inputs or None")
    return example, inputs


class ExportError(RuntimeError):
    """Some formats could not be written: ``failures`` (format -> why, one line each) and
    ``result``, the files of the other formats, written and checked. The first failure is the
    exception's ``__cause__``."""

    def __init__(self, failures: dict[str, str], result: ExportResult) -> None:
        written = ", ".join(f"{r.format} ({r.path})" for r in result.records) or "none"
        why = "; ".join(f"{fmt}: {reason}" for fmt, reason in failures.items())
        super().__init__(
            f"export_plan could not write {sorted(failures)} ({why}). Written and checked: "
            f"{written}."
        )
        self.failures = failures
        self.result = result


def _write_formats(job: _Job, chosen: list[str], out: Path) -> ExportResult:
    """Write and check each format's file (under a temporary name, then renamed); a format
    that fails leaves no file and the others are still written (:class:`ExportError`)."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    failures: dict[str, str] = {}
    first: Exception | None = None
    for fmt_name in chosen:
        fmt = EXPORT_FORMATS[fmt_name]
        path = out / fmt.filename
        try:
            with atomic_path(path) as tmp:
                check, agree, reference, notes, details = fmt.write(job, tmp)
        except Exception as exc:
            failures[fmt_name] = exception_line(exc)
            first = first or exc
            continue
        records.append(
            ExportRecord(
                fmt_name, path, path.stat().st_size, check, agree, reference, notes, details
            )
        )
    result = ExportResult(out, records)
    if failures:
        raise ExportError(failures, result) from first
    return result


def export_plan(
    model: nn.Module,
    plan: PlanLike,
    out_dir: str | os.PathLike[str],
    *,
    example_input: Any,
    backend: str = "cpu",
    formats: str | Iterable[str] = ("plan", "state_dict", "program", "onnx"),
    calib: Iterable[Any] | None = None,
    observer: str | Observer = "minmax",
    check_inputs: Sequence[Any] | None = None,
) -> ExportResult:
    """Write ``plan`` and ``model`` quantized by it to ``out_dir``, one file per format, and
    check each file by running it back against the PyTorch model it came from.

    Formats (:data:`EXPORT_FORMATS`): ``plan`` (``plan.json``), ``state_dict``
    (``model.qstate.pt``: the ``backend`` model's tensors, for
    :func:`~mpsearch.export.load_quantized` into the same architecture), ``program``
    (``model.pt2``: ``torch.export``, loads without mpsearch), ``onnx`` (``model.onnx``: the
    ``simulate`` plan with QuantizeLinear/DequantizeLinear, run in ONNX Runtime). Activation
    ranges are dynamic unless ``calib`` batches are given (static, from ``observer``); a plan
    with calibrated roundings (``"w4a16+gptq"``) needs them, and its weights are rounded from
    them. The
    checks run on ``check_inputs`` (default: ``example_input``). Every argument, every layer's
    scheme on ``backend`` and, for ``onnx``, every scheme's ONNX form are checked before any
    work; each file is written to a temporary name and renamed, so no half file is left. A
    format that fails while it is written (an operation ``torch.onnx`` cannot export) does not
    stop the others: :class:`ExportError` then names each failure and holds the result of the
    formats that were written.

    >>> res = export_plan(model, {"fc1": "w8a8"}, "out", example_input=x)  # doctest: +SKIP
    >>> res.to_frame()[["format", "bytes", "check"]]  # doctest: +SKIP
    """
    check_module(model)
    plan = as_plan(plan)
    out = _out_dir(out_dir)
    chosen = _formats(formats)
    get_backend(backend)
    if not isinstance(backend, str):
        raise invalid("backend", backend, "a backend name")
    example, inputs = _check_inputs(model, example_input, check_inputs)
    plan = runnable_plan(model, plan, get_backend(backend), warn=True)  # what the files hold
    assignment = plan.resolve(model)
    choices = plan.resolve_choices(model)
    done = rounded_layers(model)
    if any(get_scheme(c).rounding != "rtn" and done.get(n) != c for n, c in choices.items()):
        if calib is None:  # calibrated rounding: the files hold the rounded weights
            raise invalid(
                "calib", calib, "calibration batches: the plan has calibrated roundings (+gptq...)"
            )
        model = Rounder(model, calib).apply(model, choices)
    was_training = model.training
    model.eval()
    try:
        static = frozenset(
            n
            for n, s in assignment.items()
            if calib is not None and s != "fp32" and get_scheme(s).quantizes_activations
        )
        job = _Job(model, plan, assignment, backend, {}, example, inputs, static)
        problems = [p for f in chosen for p in EXPORT_FORMATS[f].validate(job)]
        if problems:
            raise ValueError("\n".join(dict.fromkeys(problems)))
        with torch.inference_mode():  # the example input must run before any file is written
            example(model)
        if static:
            job.ranges = collect_activation_ranges(model, calib, sorted(static), observer=observer)
        return _write_formats(job, chosen, out)
    finally:
        model.train(was_training)


__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportFormat",
    "ExportRecord",
    "ExportResult",
    "export_plan",
]
