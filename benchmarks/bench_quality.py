"""Quality at 4 and 2 bits: round to nearest vs GPTQ vs AdaRound vs a recovery fine-tune.

For each workload, side by side in one run:

1. **Uniform plans** (every quantizable layer in one scheme): ``w4a16_pc`` (int4, one scale
   per output channel), ``w4a16`` (int4, groups of 32; layers whose fan-in 32 does not divide
   fall back to ``w4a16_pc``), ``w2a16`` (int2, groups of 32) and ``w2a16_pc``, each rounded
   by: round to nearest (``rtn``), ``rtn`` with bias correction, GPTQ (with and without bias
   correction), AdaRound, and the recovery fine-tune ``mps.recover`` (QAT distilled from the
   fp32 model on the calibration batches only) started from ``rtn`` and from GPTQ. Each row:
   task quality, the wall seconds to round or fine-tune (including ``quantize``), the bytes
   the quantized model stores as a fraction of fp32 (exact plan bits, scales and biases
   included: the cost model's memory), and the backend that ran it (``cpu``: real kernels for
   the 4-bit schemes; ``simulate`` for 2-bit, which the cpu backend does not run).
2. **Search** (:func:`search_part`): the Pareto front (quality x memory) of ``mps.search`` over
   a profile whose choices include calibrated rounding (``w4a16+gptq``, ``w2a16+gptq``) vs the
   same search with round-to-nearest choices only: hypervolume ratio, and the best plan at
   <= 12.5 % of fp32 bytes (true quality, simulate backend).

Workloads and quality measures:

- ``digits_cnn``: a CNN trained on sklearn digits; test accuracy (%).
- ``text_transformer``: a trained character-level causal LM; held-out perplexity
  (cross-entropy of the logits on the held-out test windows).
- a zoo conv net (``flag_net``, or ``--zoo-conv audio_cnn``) and ``hf_llama``: random-initialised
  from configs, so they have no task: KL divergence of the quantized model's softmax from the
  fp32 one (nats per sample / per unpadded token) and top-1 agreement with fp32.
- ``--workloads hf_mixtral --no-search --out benchmarks/results/quality_moe.md``: the zoo's
  sparse Mixture-of-Experts causal LM (70 % of its parameters in its expert banks, which
  calibrated rounding takes expert by expert), quality as for ``hf_llama``.

Goals checked in the table: at <= 12.5 % of fp32 bytes, the digits CNN within 0.4 accuracy
points of fp32; the causal LM's perplexity rise at 4 bits with GPTQ (or the best method) at
most half of round-to-nearest's; the front's hypervolume with rounding choices >= 1.1 x the
round-to-nearest-only front on at least two workloads.

    python benchmarks/bench_quality.py [--quick] [--workloads digits_cnn,text_transformer]

Writes ``benchmarks/results/quality.md`` and ``quality.csv`` beside it (``--out`` to change).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
import torch.nn.functional as F
from _tables import md_table  # benchmarks/ is the script's folder
from torch import nn

import mpsearch as mps
from mpsearch._data import output_tensor, run_model
from mpsearch.cost import cpu_model, held_bytes
from mpsearch.search import hypervolume
from mpsearch.workloads import ZOO, load_workload
from mpsearch.workloads._zoo import zoo_available

UNIFORM_SCHEMES = ["w4a16_pc", "w4a16", "w2a16", "w2a16_pc"]
# method -> (start rounding, bias correction, recovery fine-tune)
METHODS: dict[str, tuple[str, bool, bool]] = {
    "rtn": ("rtn", False, False),
    "rtn+bc": ("rtn", True, False),
    "gptq": ("gptq", False, False),
    "gptq+bc": ("gptq", True, False),
    "adaround": ("adaround", False, False),
    "recover(rtn)": ("rtn", False, True),
    "recover(gptq)": ("gptq", False, True),
}
# The search: base (round-to-nearest) choices, and the calibrated-rounding choices added to them.
SEARCH_BASE = ["w8a16", "w4a16", "w4a16_pc", "w2a16", "w2a16_pc"]
SEARCH_ROUNDED = [
    "w4a16+gptq",
    "w4a16_pc+gptq",
    "w2a16+gptq",
    "w2a16_pc+gptq",
    "w2a16+adaround",
    "w2a16_pc+adaround",
]
MEMORY_GOAL = 0.125
DIGITS_GOAL_POINTS = 0.4
PPL_GOAL_RATIO = 0.5
HV_GOAL = 1.1
LOW_REGION_SCHEME = "w8a16"  # the second hypervolume view: plans smaller than uniform w8a16
RESULTS = Path(__file__).parent / "results" / "quality.md"


@dataclass(frozen=True)
class Settings:
    """How hard the benchmark works (``--quick`` shrinks every knob)."""

    workloads: tuple[str, ...]
    schemes: tuple[str, ...]
    methods: tuple[str, ...]
    adaround_iters: int
    recover_steps: int
    recover_lr: float
    n_trials: int
    profile_batches: int


FULL = Settings(
    workloads=("digits_cnn", "text_transformer", "flag_net", "hf_llama"),
    schemes=tuple(UNIFORM_SCHEMES),
    methods=tuple(METHODS),
    adaround_iters=400,
    recover_steps=200,
    recover_lr=1e-4,
    n_trials=60,
    profile_batches=4,
)
QUICK = Settings(
    workloads=("digits_cnn", "text_transformer"),
    schemes=("w4a16_pc", "w2a16"),
    methods=tuple(METHODS),
    adaround_iters=100,
    recover_steps=40,
    recover_lr=1e-4,
    n_trials=12,
    profile_batches=2,
)


# ------------------------------------------------------------------ quality measures


@dataclass
class Measure:
    """A workload's quality: ``primary(model)`` (``higher_better`` says which way), an optional
    ``secondary`` figure, and ``search_score`` (higher is better) for ``mps.search``."""

    label: str
    higher_better: bool
    primary: Callable[[nn.Module], float]
    secondary_label: str = ""
    secondary: Callable[[nn.Module], float] | None = None
    note: str = ""

    def search_score(self, model: nn.Module) -> float:
        value = self.primary(model)
        return value if self.higher_better else -value


def _logits(model: nn.Module, batch: Any) -> torch.Tensor:
    return output_tensor(run_model(model, batch)).float()


def perplexity(model: nn.Module, batches: list[Any], targets: list[torch.Tensor]) -> float:
    """``exp`` of the mean next-token cross-entropy of ``model``'s logits on ``batches``.

    >>> round(perplexity(nn.Identity(), [torch.zeros(1, 2, 4)], [torch.tensor([[0, 3]])]), 3)
    4.0
    """
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch, target in zip(batches, targets, strict=True):
            logits = _logits(model, batch)
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
                )
            )
            count += target.numel()
    return math.exp(total / count)


class KLToReference:
    """Mean KL(fp32 softmax || quantized softmax) over samples (classifiers, sequence
    classifiers included) or unpadded tokens (language models, by the batch's
    ``attention_mask``), in nats.

    >>> net = nn.Linear(4, 3)
    >>> KLToReference(net, [torch.randn(5, 4)])(net)
    0.0
    """

    def __init__(self, model: nn.Module, batches: list[Any]) -> None:
        self.batches = batches
        with torch.inference_mode():
            self.reference = [F.log_softmax(_logits(model, b), dim=-1) for b in batches]

    def __call__(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        with torch.inference_mode():
            for batch, ref in zip(self.batches, self.reference, strict=True):
                log_q = F.log_softmax(_logits(model, batch), dim=-1)
                kl = (ref.exp() * (ref - log_q)).sum(-1)
                mask = batch.get("attention_mask") if isinstance(batch, dict) else None
                if mask is not None and mask.shape == kl.shape:  # per token, padding left out
                    kl = kl[mask.bool()]
                total += float(kl.sum())
                count += kl.numel()
        return max(total / count, 0.0)


def measure_for(wl: Any) -> Measure:
    """The quality measure of workload ``wl`` (see the module docstring)."""
    if wl.name == "text_transformer":
        return Measure(
            "perplexity",
            False,
            lambda m: perplexity(m, wl.test, wl.test_labels),
            "next-char acc %",
            lambda m: 100 * wl.evaluate(m),
            note=f"{sum(y.numel() for y in wl.test_labels)} held-out next-character targets.",
        )
    if wl.test_labels is not None:
        n = sum(len(y) for y in wl.test_labels)
        note = f"{n} test samples: one sample is {100 / n:.2f} accuracy points."
        return Measure("accuracy %", True, lambda m: 100 * wl.evaluate(m), note=note)
    unit = "token" if wl.task == "language_model" else "sample"
    return Measure(
        f"KL to fp32 (nats/{unit})",
        False,
        KLToReference(wl.model, wl.test),
        "top-1 agreement %",
        lambda m: 100 * wl.evaluate(m),
    )


# ------------------------------------------------------------------ uniform plans


def bytes_fraction(model: nn.Module, plan: Any, *, backend: str = "simulate") -> float:
    """Bytes the model quantized by ``plan`` on ``backend`` stores / bytes of the fp32 model
    (``simulate``: the plan's exact bits, scales, zero points and biases included)."""
    return held_bytes(mps.quantize(model, plan, backend=backend)) / held_bytes(model)


def real_backend(model: nn.Module, scheme: str) -> str:
    """``cpu`` where the cpu backend runs ``scheme`` on every layer, else ``simulate``."""
    try:
        mps.quantize(model, scheme, backend="cpu")
    except ValueError:
        return "simulate"
    return "cpu"


def uniform_rows(wl: Any, measure: Measure, s: Settings) -> list[dict[str, Any]]:
    """One row per (scheme, method) of :data:`METHODS` on ``wl``, plus the fp32 row."""
    model = wl.model
    rows = [
        {
            "workload": wl.name,
            "scheme": "fp32",
            "method": "-",
            "backend": "-",
            "quality": measure.primary(model),
            "secondary": measure.secondary(model) if measure.secondary else float("nan"),
            "seconds": 0.0,
            "bytes_pct": 100.0,
        }
    ]
    for scheme in s.schemes:
        backend = real_backend(model, scheme)
        frac = 100 * bytes_fraction(model, scheme)
        for method in s.methods:
            rounding, bc, fine_tune = METHODS[method]
            choice = scheme if rounding == "rtn" else f"{scheme}+{rounding}"
            start = time.perf_counter()
            extra: dict[str, Any] = {}
            if fine_tune:
                res = mps.recover(
                    model,
                    choice,
                    wl.calib,
                    steps=s.recover_steps,
                    lr=s.recover_lr,
                    progress=False,
                )
                qm = mps.quantize(res.model, res.plan, backend=backend)
                extra = {"note": f"loss {res.loss_before:.3g} -> {res.loss_after:.3g}"}
            else:
                rounder = None
                if rounding != "rtn" or bc:
                    options = mps.RoundingOptions(
                        bias_correction=bc, adaround_iters=s.adaround_iters
                    )
                    rounder = mps.Rounder(model, wl.calib, options=options)
                qm = mps.quantize(model, choice, backend=backend, rounder=rounder)
            seconds = time.perf_counter() - start
            row = {
                "workload": wl.name,
                "scheme": scheme,
                "method": method,
                "backend": backend,
                "quality": measure.primary(qm),
                "secondary": measure.secondary(qm) if measure.secondary else float("nan"),
                "seconds": seconds,
                "bytes_pct": frac,
                **extra,
            }
            print(
                f"  [{wl.name}] {scheme:9s} {method:14s} {backend:8s} "
                f"{measure.label} {row['quality']:.5g}  {seconds:6.1f} s  {frac:.2f} % bytes",
                flush=True,
            )
            rows.append(row)
    return rows


# ------------------------------------------------------------------ search


@dataclass
class SearchOutcome:
    """One workload's search comparison (``status`` says why it did not run, if it did not)."""

    status: str = "ok"
    hv: dict[str, float] = field(default_factory=dict)
    hv_low: dict[str, float] = field(default_factory=dict)
    points: dict[str, int] = field(default_factory=dict)
    best: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    reference: tuple[float, float] = (0.0, 0.0)
    low_mb: float = 0.0


def search_part(wl: Any, measure: Measure, s: Settings) -> SearchOutcome:
    """Search with rounding choices vs round-to-nearest only, on the same cost model.

    Every layer may take any of ``fp32`` and :data:`SEARCH_BASE` (an explicit space: the
    bundled ones keep convolutions and the first / last layers at 8 bits); with rounding
    choices, the profile also has :data:`SEARCH_ROUNDED` (rounded with bias correction) and the
    search offers them wherever their scheme is offered. The cost model is measured on ``simulate`` (2-bit runs only there).
    Per choice set, two searches (seed 0, ``s.n_trials`` trials each): quality x memory without
    a budget, whose true evaluations give the hypervolume over (quality up, MB down) with one
    reference point for both sets (the lowest quality either saw minus 1 % of |fp32 quality|,
    fp32 MB), and again with the memory reference at the uniform ``LOW_REGION_SCHEME`` plan's
    MB (the region of 4- and 2-bit plans, where the two choice sets differ); and quality alone
    under ``Budget(memory_fraction=MEMORY_GOAL)``, whose best plan
    is quantized on ``simulate`` (rounded by the profile's rounder, as the search evaluated
    it) and measured with ``measure``.
    """
    model = wl.model
    out = SearchOutcome()
    calib = wl.calib[: s.profile_batches]
    space = {"name": "bench_quality", "schemes": ["fp32", *SEARCH_BASE]}
    budget = mps.Budget(memory_fraction=MEMORY_GOAL)
    cost = mps.measure_cost(
        model, wl.example_input, schemes=["fp32", *SEARCH_BASE], backend="simulate"
    )
    evaluated: dict[str, np.ndarray] = {}
    for label, schemes in (
        ("rounding", [*SEARCH_BASE, *SEARCH_ROUNDED]),
        ("rtn only", list(SEARCH_BASE)),
    ):
        start = time.perf_counter()
        try:
            rounding = mps.RoundingOptions(bias_correction=True, adaround_iters=s.adaround_iters)
            prof = mps.profile(
                model,
                calib,
                schemes=schemes,
                progress=False,
                rounding=rounding if label == "rounding" else None,
            )
            common = {"profile": prof, "cost": cost, "evaluate": measure.search_score}
            front = mps.search(
                model,
                **common,
                n_trials=s.n_trials,
                options=mps.SearchOptions(objectives=("quality", "memory"), seed=0, space=space),
            )
            budgeted = mps.search(
                model,
                **common,
                budget=budget,
                n_trials=s.n_trials,
                options=mps.SearchOptions(objectives=("quality",), seed=0, space=space),
            )
            plan = budgeted.best(budget)
        except (ValueError, TypeError, KeyError) as err:
            out.status = f"search with {label} choices failed: {str(err).splitlines()[0]}"
            return out
        rounder = getattr(prof, "rounder", None) if plan.rounds else None
        qm = mps.quantize(model, plan, backend="simulate", rounder=rounder)
        out.seconds[label] = time.perf_counter() - start
        trials = front.trials
        ok = trials[
            trials["quality_source"].isin(["true", "memo"])
            & (trials["state"] == "COMPLETE")
            & trials["feasible"]
        ]
        evaluated[label] = ok[["quality", "memory_mb"]].to_numpy(dtype=float)
        mix: dict[str, int] = {}
        for choice in plan.resolve_choices(model).values():
            mix[choice] = mix.get(choice, 0) + 1
        out.best[label] = {
            "quality": measure.primary(qm),
            "bytes_pct": 100 * cost.memory_bytes(plan) / cost.fp32_memory_bytes,
            "mix": ", ".join(f"{c} x{n}" for c, n in sorted(mix.items())),
        }

    lowest = min(float(v[:, 0].min()) for v in evaluated.values() if len(v))
    out.reference = (
        lowest - 0.01 * abs(measure.search_score(model)),
        cost.fp32_memory_bytes / 1e6,
    )
    out.low_mb = cost.memory_bytes(LOW_REGION_SCHEME) / 1e6
    for label, pts in evaluated.items():
        out.hv[label] = hypervolume(pts, out.reference, [True, False])
        out.hv_low[label] = hypervolume(pts, (out.reference[0], out.low_mb), [True, False])
        out.points[label] = len(pts)
    return out


# ------------------------------------------------------------------ goals and report


def best_row(rows: list[dict[str, Any]], measure: Measure, **where: Any) -> dict[str, Any] | None:
    """The best-quality row among ``rows`` matching ``where`` (``bytes_max``: bytes_pct bound)."""
    limit = where.pop("bytes_max", None)
    pool = [
        r
        for r in rows
        if r["scheme"] != "fp32"
        and all(r.get(k) == v for k, v in where.items())
        and (limit is None or r["bytes_pct"] <= limit)
    ]
    if not pool:
        return None
    sign = 1 if measure.higher_better else -1
    return max(pool, key=lambda r: sign * r["quality"])


def goals(
    rows: dict[str, list[dict[str, Any]]],
    measures: dict[str, Measure],
    searches: dict[str, SearchOutcome],
) -> list[str]:
    """One line per goal: met / not met, with the figures."""
    lines = []
    if "digits_cnn" in rows:
        r, m = rows["digits_cnn"], measures["digits_cnn"]
        fp32 = r[0]["quality"]
        cands = []
        best = best_row(r, m, bytes_max=100 * MEMORY_GOAL)
        if best is not None:
            cands.append(
                (best["quality"], f"uniform {best['scheme']} {best['method']}", best["bytes_pct"])
            )
        sr = searches.get("digits_cnn")
        if sr is not None and sr.status == "ok":
            for label, b in sr.best.items():
                if "quality" in b:
                    cands.append((b["quality"], f"search ({label}) best plan", b["bytes_pct"]))
        if cands:
            q, how, pct = max(cands)
            drop = fp32 - q
            verdict = "met" if drop <= DIGITS_GOAL_POINTS + 1e-9 else "not met"
            lines.append(
                f"- Digits CNN at <= {100 * MEMORY_GOAL:g} % of fp32 bytes within "
                f"{DIGITS_GOAL_POINTS} accuracy points of fp32: **{verdict}** — {how}: "
                f"{q:.2f} % at {pct:.2f} % bytes vs fp32 {fp32:.2f} % (drop {drop:.2f} points)."
            )
        else:
            lines.append("- Digits CNN at <= 12.5 % bytes: **not met** — no plan that small ran.")
    if "text_transformer" in rows:
        r = rows["text_transformer"]
        m = measures["text_transformer"]
        fp32 = r[0]["quality"]
        parts, verdicts = [], []
        for scheme in ("w4a16_pc", "w4a16"):
            rtn = best_row(r, m, scheme=scheme, method="rtn")
            gptq = best_row(r, m, scheme=scheme, method="gptq")
            best = best_row(r, m, scheme=scheme)
            if rtn is None or best is None:
                continue
            rise_rtn = rtn["quality"] - fp32
            rise_best = best["quality"] - fp32
            ok = rise_best <= PPL_GOAL_RATIO * rise_rtn
            verdicts.append(ok)
            gptq_part = (
                ""
                if gptq is None
                else f"GPTQ +{gptq['quality'] - fp32:.3f} ({(gptq['quality'] - fp32) / rise_rtn:.2f} x RTN), "
            )
            parts.append(
                f"{scheme}: RTN +{rise_rtn:.3f}, {gptq_part}best ({best['method']}) "
                f"+{rise_best:.3f} ({rise_best / rise_rtn:.2f} x RTN)"
            )
        if verdicts:
            verdict = "met" if verdicts[0] else "not met"
            lines.append(
                f"- Causal LM (text_transformer) perplexity rise at 4 bits with the best method "
                f"<= {PPL_GOAL_RATIO} x RTN's: **{verdict}** (fp32 perplexity {fp32:.3f}; "
                + "; ".join(parts)
                + "; the verdict is on w4a16_pc)."
            )
    ratios = {
        n: o.hv["rounding"] / o.hv["rtn only"]
        for n, o in searches.items()
        if o.status == "ok" and o.hv.get("rtn only", 0) > 0
    }
    pending = {n: o.status for n, o in searches.items() if o.status != "ok"}
    if ratios:
        n_ok = sum(v >= HV_GOAL for v in ratios.values())
        verdict = "met" if n_ok >= 2 else "not met"
        shown = ", ".join(f"{n} {v:.3f}" for n, v in ratios.items())
        low = ", ".join(f"{n} {_ratio(searches[n].hv_low):.3f}" for n in ratios)
        lines.append(
            f"- Front hypervolume with rounding choices >= {HV_GOAL} x RTN-only on at least two "
            f"workloads: **{verdict}** ({n_ok} of {len(ratios)}: {shown}; over the plans "
            f"smaller than uniform {LOW_REGION_SCHEME} only: {low})."
        )
        for n in ratios:
            best = searches[n].best
            if all("quality" in best.get(k, {}) for k in ("rounding", "rtn only")):
                m = measures[n]
                lines.append(
                    f"  - {n}, best searched plan at <= {100 * MEMORY_GOAL:g} % bytes "
                    f"({m.label}): with rounding choices {best['rounding']['quality']:.5g}, "
                    f"RTN only {best['rtn only']['quality']:.5g}."
                )
    elif pending:
        lines.append(
            "- Front hypervolume with rounding choices vs RTN-only: **not measured** — "
            + "; ".join(f"{n}: {why}" for n, why in pending.items())
            + "."
        )
    return lines


def workload_section(
    name: str, rows: list[dict[str, Any]], measure: Measure, search: SearchOutcome | None
) -> str:
    fp32 = rows[0]["quality"]
    quality, delta = measure.label, "vs fp32"
    shown = [
        {
            "scheme": r["scheme"],
            "method": r["method"],
            "backend": r["backend"],
            quality: float(r["quality"]),
            delta: float(r["quality"] - fp32),
            measure.secondary_label: float(r["secondary"]),
            "seconds": float(r["seconds"]),
            "bytes % fp32": float(r["bytes_pct"]),
        }
        for r in rows
    ]
    columns = ["scheme", "method", "backend", quality, delta]
    if measure.secondary is not None:
        columns.append(measure.secondary_label)
    columns += ["seconds", "bytes % fp32"]
    better = "higher" if measure.higher_better else "lower"
    parts = [
        f"### {name}\n",
        f"Quality: {measure.label} ({better} is better). {measure.note}\n",
        md_table(shown, columns, digits=4),
        "",
    ]
    if search is not None:
        parts.append(search_section(search, measure))
    return "\n".join(parts)


def _ratio(hv: dict[str, float]) -> float:
    return hv["rounding"] / hv["rtn only"] if hv.get("rtn only") else float("nan")


def search_section(o: SearchOutcome, measure: Measure) -> str:
    if o.status != "ok":
        return f"Search with rounding choices: **not run** — {o.status}.\n"
    ratio = _ratio(o.hv)
    low = f"< {LOW_REGION_SCHEME}"
    rows = []
    for label in ("rounding", "rtn only"):
        b = o.best.get(label, {})
        rows.append(
            {
                "choices": label,
                "hypervolume": float(o.hv[label]),
                f"hypervolume {low}": float(o.hv_low[label]),
                "evaluated plans": o.points[label],
                "seconds": float(o.seconds[label]),
                f"best <= {100 * MEMORY_GOAL:g} % bytes: {measure.label}": (
                    float(b["quality"]) if "quality" in b else b.get("note", "")
                ),
                "bytes %": float(b["bytes_pct"]) if "bytes_pct" in b else float("nan"),
                "plan": b.get("mix", ""),
            }
        )
    cols = list(rows[0])
    return (
        f"Search (quality x memory, simulate backend): hypervolume ratio rounding / RTN-only "
        f"**{ratio:.3f}** ({_ratio(o.hv_low):.3f} over the plans {low}); reference point "
        f"quality {o.reference[0]:.4g} (search score, higher is better), {o.reference[1]:.4g} MB "
        f"({o.low_mb:.4g} MB, uniform {LOW_REGION_SCHEME}, for the plans {low}).\n\n"
        + md_table(rows, cols, digits=4)
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="digits_cnn and text_transformer, w4a16_pc and w2a16, short rounding / fine-tune",
    )
    parser.add_argument("--workloads", default="", help="comma-separated workload names")
    parser.add_argument("--zoo-conv", default="flag_net", help="the zoo conv net (or audio_cnn)")
    parser.add_argument("--no-search", action="store_true", help="uniform plans only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    names = [n for n in args.workloads.split(",") if n] or [
        args.zoo_conv if n == "flag_net" else n for n in s.workloads
    ]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    all_rows: dict[str, list[dict[str, Any]]] = {}
    measures: dict[str, Measure] = {}
    searches: dict[str, SearchOutcome] = {}
    sections = []
    skipped = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name in ZOO and not zoo_available(name):
                skipped.append(f"{name} (needs {ZOO[name].needs})")
                continue
            t0 = time.perf_counter()
            wl = load_workload(name, seed=0)
            measure = measure_for(wl)
            measures[name] = measure
            print(f"[{name}] {len(wl.calib)} calibration batches", flush=True)
            all_rows[name] = uniform_rows(wl, measure, s)
            if not args.no_search:
                searches[name] = search_part(wl, measure, s)
                print(f"[{name}] search: {searches[name].status}", flush=True)
            sections.append(
                workload_section(name, all_rows[name], measure, searches.get(name))
                + f"\nWorkload wall time {time.perf_counter() - t0:.0f} s.\n"
            )
    total = time.perf_counter() - started
    goal_lines = goals(all_rows, measures, searches)
    intro = "\n".join(
        [
            "# Quality at 4 and 2 bits: RTN vs GPTQ vs AdaRound vs recovery fine-tune",
            "",
            f"CPU: {cpu_model()}; torch {torch.__version__}, 1 thread. Generated by "
            f"`{' '.join(['python', 'benchmarks/bench_quality.py', *sys.argv[1:]])}` "
            f"in {total:.0f} s.",
            "",
            "Uniform plans (every quantizable layer in one scheme; `w4a16` / `w2a16` fall back "
            "to their `_pc` variant on layers whose fan-in 32 does not divide). Methods: `rtn` "
            "round to nearest; `+bc` bias correction (each output channel's mean shift on the "
            "calibration inputs added to its bias); `gptq`; `adaround` "
            f"({s.adaround_iters} iterations per layer); `recover(x)`: `mps.recover` "
            f"({s.recover_steps} steps, lr {s.recover_lr:g}, distillation from fp32 on the "
            "calibration batches only) started from `x`, then quantized round-to-nearest. "
            "`backend`: the backend that ran the row (`cpu`: real int4 kernels; `simulate` "
            "for 2-bit, which only simulate runs). `seconds`: wall time to round or fine-tune "
            "plus `quantize` (RTN rows: `quantize` alone). `bytes % fp32`: bytes the "
            "quantized model stores (exact plan bits: codes, scales, zero points, biases, "
            "unquantized tensors) over the fp32 model's, as the cost model counts them. "
            "The zoo models are random-initialised (no task): their quality is the KL "
            "divergence from the fp32 model's softmax (and top-1 agreement), not accuracy or "
            "perplexity. `hf_llama` ties `lm_head` to its embedding: a calibrated rounding of "
            "`lm_head` is written into the shared tensor, so the embedding takes it too.",
            "",
            "## Goals",
            "",
            *(goal_lines or ["- None set for these workloads."]),
            *([f"- Skipped: {', '.join(skipped)}."] if skipped else []),
            "",
        ]
    )
    text = intro + "\n" + "\n".join(sections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    flat = [r for rows in all_rows.values() for r in rows]
    pd.DataFrame(flat).to_csv(args.out.with_suffix(".csv"), index=False)
    print("\n" + text)
    print(f"wrote {args.out} ({total:.0f} s)")


if __name__ == "__main__":
    main()
