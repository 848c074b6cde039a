"""Runtime controller benchmark: per-input precision switching vs static plans.

For each workload (default: the digits CNN, the wide char-level MLP language model and the
small char transformer), on the workload's own train / calibration / test splits:

* static plans (uniform and mixed), each served alone: accuracy, disagreement with fp32 (on
  the whole test split) and latency per input at batch 1 and batch 32; the static plans on the
  latency/disagreement Pareto front are marked;
* the controller: a two-variant cascade per serving regime (batch 1 and batch 32: the
  (plan -> fp32) cascade whose cost, predicted from the calibration inputs and the plans'
  measured costs at that batch size, is lowest at ``GOAL_EPS``; fp32 is the reference), with the
  scorers ``ratio`` and ``margin`` calibrated by Learn-then-Test for a sweep of ``eps`` at
  ``delta = 0.1``, and ``max_softmax`` / ``entropy`` / ``gate`` at the smallest ``eps``;
* the selection: ``rank_cascades``' choice at ``GOAL_EPS`` among those cascades *and* each plan
  served alone (a cascade of one, fp32 alone included), checked on the test split against the
  best static plan meeting ``GOAL_EPS`` (never slower, within ``COST_TOLERANCE``), with the CPU
  named;
* baselines: random routing with the controller's variant frequencies (routed directly, one
  pass), and the oracle (the cheapest variant whose answer equals fp32's, one pass);
* decision overhead per scorer: inside the controller (scoring + routing time over inference
  time) and from outside (a controller that never escalates vs the cheap static plan alone,
  timed interleaved input by input);
* the guarantee: over ``N_SPLITS`` random draws, (a) calibration sets drawn i.i.d. from the
  calib + test pool, violation = the chosen threshold's risk *on the whole pool* (the
  population the draws come from) above ``eps`` — the quantity Learn-then-Test bounds by
  ``delta``; (b) disjoint calibration / test splits of the pool, violation = the test split's
  empirical disagreement above ``eps`` — which adds the test split's own binomial noise, shown
  next to the rate that noise alone would produce — for thresholds calibrated for the
  population and for thresholds calibrated for that test split's size (``test_size``: the
  finite-test-set guarantee, which bounds exactly this rate by ``delta``).

Batch-1 latency: per input, the minimum over ``REPEATS`` runs, all methods interleaved input by
input so that machine noise hits them alike. Batch-32 latency: each test batch's time / 32,
methods interleaved batch by batch.

Run: ``python benchmarks/bench_controller.py`` (writes benchmarks/results/controller.md).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from _tables import md_table  # benchmarks/ is the script's folder
from scipy import stats

from mpsearch.backends import BACKENDS, quantize
from mpsearch.cost import cpu_model
from mpsearch.plan import PrecisionPlan
from mpsearch.runtime import (
    Controller,
    learn_then_test,
    make_scorer,
    min_calibration_size,
    rank_cascades,
)
from mpsearch.runtime._calibration import default_grid, losses, served_stage
from mpsearch.runtime._controller import time_module
from mpsearch.runtime._scorers import answer_logits, score_stages
from mpsearch.workloads import load_workload

EPSILONS = (0.005, 0.01, 0.02, 0.05)
GOAL_EPS = 0.005
GOAL_SAVING = 0.25
GOAL_OVERHEAD = 0.02
COST_TOLERANCE = 0.05
"""Predicted cascade costs this close (relative) tie in ``rank_cascades``: a plan's median
batch-1 time moved by 5-20% between runs of this benchmark on a shared host."""
DELTA = 0.1
N_SPLITS = 200
REPEATS = 2
SWEEP_SCORERS = ("ratio", "margin")
ALL_SCORERS = ("max_softmax", "margin", "ratio", "entropy", "gate")
GUARANTEE_SCORERS = ("ratio", "margin")
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Setup:
    """Sizes per workload: calibration / test inputs, and test inputs timed at batch 1."""

    n_calib: int
    n_test: int | None
    n_b1: int


SETUPS = {
    "digits_cnn": Setup(n_calib=359, n_test=None, n_b1=200),
    "char_mlp": Setup(n_calib=8000, n_test=3000, n_b1=300),
    "text_transformer": Setup(n_calib=735, n_test=735, n_b1=150),
}


def static_plans(name: str) -> dict[str, PrecisionPlan]:
    """Uniform fp32 / bf16 / w8a8 (+ weight-only where the layers allow) and mixed plans."""
    plans = {
        "fp32": PrecisionPlan.uniform("fp32"),
        "bf16": PrecisionPlan.uniform("bf16"),
        "w8a8": PrecisionPlan.uniform("w8a8"),
    }
    if name == "digits_cnn":
        plans["ends_bf16"] = PrecisionPlan({"conv1": "bf16", "fc2": "bf16"}, default="w8a8")
        plans["fc1_w4a16"] = PrecisionPlan({"fc1": "w4a16"}, default="w8a8")
    elif name == "char_mlp":
        plans["w8a16"] = PrecisionPlan.uniform("w8a16")
        plans["w4a16"] = PrecisionPlan.uniform("w4a16")
        plans["w8a16_head_fp32"] = PrecisionPlan({"head": "fp32"}, default="w8a16")
        plans["w8a16_ends_fp32"] = PrecisionPlan(
            {"layers.0": "fp32", "head": "fp32"}, default="w8a16"
        )
        plans["w8a16_mid_fp32"] = PrecisionPlan(
            {"layers.1": "fp32", "layers.2": "fp32"}, default="w8a16"
        )
        plans["w8a8_ends_fp32"] = PrecisionPlan(
            {"layers.0": "fp32", "head": "fp32"}, default="w8a8"
        )
        plans["w8a8_head_fp32"] = PrecisionPlan({"head": "fp32"}, default="w8a8")
    else:
        plans["ends_bf16"] = PrecisionPlan(
            {"re:blocks\\.0\\..*": "bf16", "head": "bf16"}, default="w8a8"
        )
        plans["mlp_w4a16"] = PrecisionPlan({"re:.*mlp\\.fc.": "w4a16"}, default="w8a8")
    for key, plan in plans.items():
        plan.metadata["name"] = key
    return plans


def timed(fn: Any, x: torch.Tensor) -> tuple[Any, float]:
    start = time.perf_counter()
    with torch.inference_mode():
        y = fn(x)
    return y, (time.perf_counter() - start) * 1e3


def frame_table(frame: pd.DataFrame) -> str:
    """``frame`` as a Markdown table, floats to 4 decimals (NaN left empty)."""
    return md_table(frame.to_dict("records"), [str(c) for c in frame.columns], decimals=4)


def plan_table(r: dict[str, Any]) -> str:
    """Each static plan's measured costs and, for the others than fp32, its cascade's
    prediction and rank (ranks stay integers: a DataFrame would make them floats)."""
    rows = [
        {
            "plan": k,
            "b1_ms": r["measured"][1][k],
            "b4_ms": r["measured"][4][k],
            "b32_ms": r["measured"][32][k],
            **r["candidates"].get(k, {}),
        }
        for k in r["measured"][1]
    ]
    columns = list(dict.fromkeys(c for row in rows for c in row))
    return md_table(rows, columns, decimals=4)


def pctl(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def last_labels(labels: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([y[:, -1] if y.dim() == 2 else y for y in labels]).numpy()


def pareto_mask(latency: np.ndarray, disagreement: np.ndarray) -> np.ndarray:
    """Points no other point beats on both latency and disagreement (ties kept)."""
    keep = np.ones(len(latency), dtype=bool)
    for i in range(len(latency)):
        better = (latency <= latency[i]) & (disagreement <= disagreement[i])
        strictly = (latency < latency[i]) | (disagreement < disagreement[i])
        keep[i] = not np.any(better & strictly)
    return keep


@dataclass
class Regime:
    """One serving regime: a cascade chosen for a batch size, its controllers and thresholds."""

    name: str
    batch: int
    cascade: tuple[str, str]
    ctrls: dict[str, Controller] = field(default_factory=dict)
    thresholds: dict[tuple[str, float], float] = field(default_factory=dict)
    reports: dict[tuple[str, float], Any] = field(default_factory=dict)

    def settings(self) -> list[tuple[str, float]]:
        out = [(s, e) for s in SWEEP_SCORERS for e in EPSILONS]
        return out + [(s, EPSILONS[0]) for s in ALL_SCORERS if s not in SWEEP_SCORERS]


def guarantee(
    stage_scores: np.ndarray, stage_answers: np.ndarray, n_calib: int, rng: np.random.Generator
) -> pd.DataFrame:
    """Violation rates of the Learn-then-Test choice over random draws (see module docstring)."""
    grid = default_grid()
    n_pool = stage_answers.shape[1]
    # disagreement of every grid threshold on the whole pool (the population of the draws)
    pool_risk = np.array(
        [
            losses(stage_answers, served_stage(stage_scores, t), None, "disagreement").mean()
            for t in grid
        ]
    )
    rows = []
    n_test = n_pool - n_calib
    for eps in EPSILONS:
        pop_viol, pop_risk, certified = 0, [], 0
        for _ in range(N_SPLITS):
            idx = rng.integers(0, n_pool, size=n_calib)
            res = learn_then_test(
                stage_scores[:, idx],
                stage_answers[:, idx],
                targets={"disagreement": eps},
                delta=DELTA,
            )
            risk = pool_risk[res.index]
            pop_risk.append(risk)
            pop_viol += risk > eps
            certified += res.certified
        split_viol, noise_rate, test_dis = 0, [], []
        fin_viol, fin_dis, fin_certified = 0, [], 0
        for _ in range(N_SPLITS):
            perm = rng.permutation(n_pool)
            cal, tst = perm[:n_calib], perm[n_calib:]
            for test_size in (None, n_test):
                res = learn_then_test(
                    stage_scores[:, cal],
                    stage_answers[:, cal],
                    targets={"disagreement": eps},
                    delta=DELTA,
                    test_size=test_size,
                )
                served = served_stage(stage_scores[:, tst], res.threshold)
                d = float(losses(stage_answers[:, tst], served, None, "disagreement").mean())
                if test_size is None:
                    test_dis.append(d)
                    split_viol += d > eps
                    # how often a test split of this size exceeds eps by binomial noise alone
                    # when the true risk is the threshold's pool risk
                    noise_rate.append(
                        float(stats.binom.sf(np.floor(eps * n_test), n_test, pool_risk[res.index]))
                    )
                else:
                    fin_dis.append(d)
                    fin_viol += d > eps
                    fin_certified += res.certified
        rows.append(
            {
                "eps": eps,
                "draws": N_SPLITS,
                "n_calib": n_calib,
                "certified_share": certified / N_SPLITS,
                "mean_true_risk": mean(pop_risk),
                "max_true_risk": float(max(pop_risk)),
                "violation_true_risk": pop_viol / N_SPLITS,
                "n_test": n_test,
                "mean_test_disagreement": mean(test_dis),
                "violation_test_split": split_viol / N_SPLITS,
                "noise_only_rate": mean(noise_rate),
                "finite_certified_share": fin_certified / N_SPLITS,
                "finite_mean_test_disagreement": mean(fin_dis),
                "finite_violation_test_split": fin_viol / N_SPLITS,
            }
        )
    return pd.DataFrame(rows)


def steady_overhead(
    regime: Regime, batches: list[torch.Tensor], *, block: int = 25
) -> dict[str, dict[str, float]]:
    """Decision overhead in steady serving: per scorer, a never-escalating controller serves
    ``batches`` one after another in blocks of ``block``, alternating with its own cheap
    variant's module called directly on the same block (the same weights in memory: a
    separately quantized copy can run a few percent faster or slower; two rounds, each
    batch's minimum)."""
    out = {}
    n = len(batches)
    for scorer, ctrl in regime.ctrls.items():
        ctrl.set_threshold(math.inf)
        ctrl.audit_log.clear()
        cheap = ctrl.variants[0].module
        t_ctrl, t_static = [math.inf] * n, [math.inf] * n
        with torch.inference_mode():
            for _ in range(2):
                for lo in range(0, n, block):
                    for i in range(lo, min(lo + block, n)):
                        t_ctrl[i] = min(t_ctrl[i], timed(ctrl, batches[i])[1])
                    for i in range(lo, min(lo + block, n)):
                        t_static[i] = min(t_static[i], timed(cheap, batches[i])[1])
        audit = ctrl.audit.drop_duplicates("call_id")
        out[scorer] = {
            "decision_ms": float(audit["decision_ms"].median()),
            "decision_share": float((audit["decision_ms"] / audit["inference_ms"]).median()),
            "external_overhead": float(np.median(np.asarray(t_ctrl) / t_static) - 1.0),
        }
        ctrl.audit_log.clear()
    return out


def choose_cascades(
    calib_logits: dict[str, torch.Tensor], measured: dict[int, dict[str, float]]
) -> tuple[dict[str, dict[str, float]], dict[int, dict[str, Any]]]:
    """Predicted cost per input of each way to serve at ``GOAL_EPS`` from the calibration
    inputs alone (``rank_cascades``, ratio scorer): each (plan -> fp32) cascade at batch 1 costs
    ``plan + p * fp32``, at batch 32 ``plan + p * fp32 at batch 4`` (escalated rows are re-run
    together, a few per batch); each plan alone (a cascade of one) costs its own time and counts
    only when Learn-then-Test certifies it meets ``GOAL_EPS`` by itself; fp32 alone always does.
    Returns per plan its cascade's prediction and rank among the cascades (``rank_b1`` /
    ``rank_b32``: 0 is the regime's cascade; costs within ``COST_TOLERANCE`` tie and fewer
    escalations win) and whether it meets the target alone; and per batch size the selection
    (the first row: a cascade or a plan alone)."""
    others = {k: v for k, v in calib_logits.items() if k != "fp32"}
    out: dict[str, dict[str, float]] = {k: {} for k in others}
    selection: dict[int, dict[str, Any]] = {}
    for bs, esc in ((1, 1), (32, 4)):
        table = rank_cascades(
            others,
            calib_logits["fp32"],
            costs={k: measured[bs][k] for k in others},
            reference_cost=measured[bs]["fp32"],
            escalation_cost=measured[esc]["fp32"],
            max_disagreement=GOAL_EPS,
            delta=DELTA,
            scorer="ratio",
            tolerance=COST_TOLERANCE,
            reference_name="fp32",
        )
        first = table.iloc[0]
        selection[bs] = {k: first[k] for k in ("stages", "kind", "candidate", "predicted_ms")}
        cascades = table[table["kind"] == "cascade"]
        for rank, row in enumerate(cascades.itertuples()):
            out[row.candidate].update(
                calib_disagreement=row.disagreement_alone,
                share_escalated=row.share_escalated,
                **{f"predicted_b{bs}_ms": row.predicted_ms, f"rank_b{bs}": rank},
            )
        alone = table[table["kind"] == "alone"].set_index("candidate")
        for k in others:
            out[k]["meets_alone"] = bool(alone.loc[k, "meets_target"])
    return out, selection


def run_workload(name: str, backend: str) -> dict[str, Any]:
    setup = SETUPS[name]
    wl = load_workload(name, seed=0, n_calib=setup.n_calib, n_test=setup.n_test)
    model = wl.model
    plans = static_plans(name)
    statics: dict[str, torch.nn.Module] = {}
    skipped: dict[str, str] = {}
    for key, plan in plans.items():
        try:
            statics[key] = model if key == "fp32" else quantize(model, plan, backend=backend)
        except ValueError as exc:
            skipped[key] = str(exc).splitlines()[0]
    test_batches = wl.test
    test_x = torch.cat(test_batches)
    labels = last_labels(wl.test_labels)
    n = len(test_x)
    # ---- cascades: per batch size, the (plan -> fp32) cascade predicted cheapest at GOAL_EPS --
    # measured per-input cost of every static plan (batch 4: what escalated rows of a batch of
    # 32 cost when re-run together), and each plan's logits on the calibration inputs only
    measured: dict[int, dict[str, float]] = {}
    for bs in (1, 4, 32):
        x = test_x[:bs]
        measured[bs] = {k: time_module(m, x, repeats=15) / bs for k, m in statics.items()}
    calib_logits: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for key, module in statics.items():
            calib_logits[key] = torch.cat([answer_logits(module(b)).float() for b in wl.calib])
    candidates, selection = choose_cascades(calib_logits, measured)
    regimes: list[Regime] = []
    for bs in (1, 32):
        cheap = min(candidates, key=lambda k: candidates[k][f"rank_b{bs}"])
        if regimes and regimes[-1].cascade[0] == cheap:
            regimes[-1].name += "+b32"
            continue
        regimes.append(Regime(f"b{bs}", bs, (cheap, "fp32")))
    calib_n = sum(len(b) for b in wl.calib)
    for reg in regimes:
        for scorer in ALL_SCORERS:
            reg.ctrls[scorer] = Controller(
                model,
                [plans[c] for c in reg.cascade],
                backend=backend,
                scorer=scorer,
                example_input=wl.example_input,
                order="given",
            )
        outputs = [calib_logits[c] for c in reg.cascade]
        for scorer, eps in reg.settings():
            ctrl = reg.ctrls[scorer]
            reg.reports[scorer, eps] = ctrl.calibrate(
                wl.calib, max_disagreement=eps, delta=DELTA, outputs=outputs
            )
            reg.thresholds[scorer, eps] = ctrl.threshold
    # ---- methods ------------------------------------------------------------------------------
    methods: dict[str, tuple[Any, float | None]] = {
        f"static:{k}": (m, None) for k, m in statics.items()
    }
    for reg in regimes:
        for scorer, eps in reg.settings():
            methods[f"ctrl[{reg.name}]:{scorer}:{eps}"] = (
                reg.ctrls[scorer],
                reg.thresholds[scorer, eps],
            )
    b1_regime = regimes[0]
    noesc = {f"noesc:{s}": (b1_regime.ctrls[s], float("inf")) for s in ALL_SCORERS}

    def call(label: str, x: torch.Tensor, table: dict) -> tuple[Any, float]:
        fn, thr = table[label]
        if thr is not None:
            fn.set_threshold(thr)
        return timed(fn, x)

    # ---- batch 32 over the whole test split: answers (quality) and per-input time ------------
    answers: dict[str, list[np.ndarray]] = {k: [] for k in methods}
    logits_cheap: dict[str, list[torch.Tensor]] = {k: [] for k in statics}
    b32: dict[str, list[float]] = {k: [] for k in methods}
    for label in methods:
        call(label, test_batches[0], methods)  # warm-up
    for batch in test_batches:
        for label in methods:
            y, ms = call(label, batch, methods)
            lg = answer_logits(y).float()
            answers[label].append(lg.argmax(-1).numpy())
            if label.startswith("static:"):
                logits_cheap[label[7:]].append(lg)
            if len(batch) == 32:
                b32[label].append(ms / 32)
    ans = {k: np.concatenate(v) for k, v in answers.items()}
    reference = ans["static:fp32"]
    # ---- batch 1, interleaved input by input -------------------------------------------------
    b32_decision = {}
    for s in ALL_SCORERS:
        audit = regimes[-1].ctrls[s].audit
        full = audit[audit["batch_size"] == 32].drop_duplicates("call_id")
        b32_decision[s] = float((full["decision_ms"] / full["inference_ms"]).median())
    b1_methods = {k: v for k, v in methods.items() if k.startswith("static:")}
    b1_methods.update({k: v for k, v in methods.items() if k.startswith(f"ctrl[{b1_regime.name}]")})
    b1_methods.update(noesc)
    for c in b1_regime.ctrls.values():
        c.audit_log.clear()
    n_b1 = min(setup.n_b1, n)
    b1: dict[str, list[float]] = {k: [math.inf] * n_b1 for k in b1_methods}
    b1_answers: dict[str, list[int]] = {k: [0] * n_b1 for k in b1_methods}
    for label in b1_methods:
        call(label, test_x[:1], b1_methods)
    for r in range(REPEATS):
        for i in range(n_b1):
            x = test_x[i : i + 1]
            for label in b1_methods:
                y, ms = call(label, x, b1_methods)
                b1[label][i] = min(b1[label][i], ms)
                if r == 0:
                    b1_answers[label][i] = int(answer_logits(y).argmax(-1))
    # ---- overhead per scorer -----------------------------------------------------------------
    # (a) inside the interleaved batch-1 loop above (every call follows another method's: cold
    # caches); (b) steady state: one never-escalating controller serving the inputs one after
    # another, in blocks alternating with the cheap static plan serving the same inputs; (c) the
    # batch-32 calls of the whole test split.
    cheap1 = b1_regime.cascade[0]
    interleaved = {s: b1_regime.ctrls[s].audit for s in ALL_SCORERS}
    steady = steady_overhead(b1_regime, list(test_x[:n_b1].split(1)))
    full = [b for b in test_batches if len(b) == 32]
    steady32 = steady_overhead(regimes[-1], full)
    overhead_rows = []
    for s in ALL_SCORERS:
        audit = interleaved[s]
        one = audit[(audit["batch_size"] == 1) & (audit["passes"] == 1)]
        ext = np.asarray(b1[f"noesc:{s}"]) / np.asarray(b1[f"static:{cheap1}"]) - 1.0
        overhead_rows.append(
            {
                "scorer": s,
                "cheap_variant": cheap1,
                "calls": len(one),
                "median_inference_ms": float(one["inference_ms"].median()),
                "median_decision_ms": float(one["decision_ms"].median()),
                "decision_share_median": float((one["decision_ms"] / one["inference_ms"]).median()),
                "external_overhead_median": float(np.median(ext)),
                **{f"steady_{k}": v for k, v in steady[s].items()},
                "b32_decision_share_median": b32_decision[s],
                **{f"steady_b32_{k}": v for k, v in steady32[s].items()},
            }
        )
    # ---- main table ---------------------------------------------------------------------------
    rows = []
    for label in methods:
        a = ans[label]
        reg_name = label[5 : label.index("]")] if label.startswith("ctrl[") else "static"
        row = {
            "method": label,
            "accuracy": float((a == labels).mean()),
            "disagreement": float((a != reference).mean()),
            "b1_mean_ms": mean(b1[label]) if label in b1 else float("nan"),
            "b1_p50_ms": pctl(b1[label], 50) if label in b1 else float("nan"),
            "b1_p95_ms": pctl(b1[label], 95) if label in b1 else float("nan"),
            "b32_mean_ms": mean(b32[label]),
            "b32_p50_ms": pctl(b32[label], 50),
            "b32_p95_ms": pctl(b32[label], 95),
            "regime": reg_name,
        }
        if label in b1:
            b1a = np.asarray(b1_answers[label])
            row["b1_disagreement"] = float((b1a != np.asarray(b1_answers["static:fp32"])).mean())
        rows.append(row)
    table = pd.DataFrame(rows)
    st = table[table["regime"] == "static"]
    for col, bs in (("pareto_b1", "b1_mean_ms"), ("pareto_b32", "b32_mean_ms")):
        mask = pareto_mask(st[bs].to_numpy(), st["disagreement"].to_numpy())
        table[col] = ""
        table.loc[st.index[mask], col] = "*"
    # ---- baselines: random routing and oracle, per regime -------------------------------------
    extra = []
    lat = {
        bs: {k: table.set_index("method").loc[f"static:{k}", col] for k in statics}
        for bs, col in ((1, "b1_mean_ms"), (32, "b32_mean_ms"))
    }
    for reg in regimes:
        cheap, ref = reg.cascade
        cheap_logits = torch.cat(logits_cheap[cheap])
        cheap_ans, ref_ans = ans[f"static:{cheap}"], ans[f"static:{ref}"]
        base_dis = float((cheap_ans != ref_ans).mean())
        for scorer, eps in reg.settings():
            ctrl = reg.ctrls[scorer]
            esc = score_stages(ctrl.scorer, [cheap_logits])[0] > reg.thresholds[scorer, eps]
            p = float(esc.mean())
            served = np.where(esc, ref_ans, cheap_ans)
            label = f"ctrl[{reg.name}]:{scorer}:{eps}"
            mismatch = int((served != ans[label]).sum())
            extra.append(
                {
                    "regime": reg.name,
                    "method": f"random:{scorer}:{eps}",
                    "share_escalated": p,
                    "disagreement": (1 - p) * base_dis,
                    "b1_mean_ms": (1 - p) * lat[1][cheap] + p * lat[1][ref],
                    "b32_mean_ms": (1 - p) * lat[32][cheap] + p * lat[32][ref],
                    "ctrl_offline_mismatch": mismatch,
                }
            )
        wrong = cheap_ans != ref_ans
        q = float(wrong.mean())
        extra.append(
            {
                "regime": reg.name,
                "method": "oracle",
                "share_escalated": q,
                "disagreement": 0.0,
                "b1_mean_ms": (1 - q) * lat[1][cheap] + q * lat[1][ref],
                "b32_mean_ms": (1 - q) * lat[32][cheap] + q * lat[32][ref],
                "ctrl_offline_mismatch": 0,
            }
        )
    # ---- guarantee (b1 cascade) ---------------------------------------------------------------
    base = b1_regime.ctrls["max_softmax"]
    pool_logits = [
        torch.cat([a, b])
        for a, b in zip(base.stage_outputs(wl.calib), base.stage_outputs(wl.test), strict=True)
    ]
    stage_answers = np.stack([lg.argmax(-1).numpy() for lg in pool_logits])
    split_tables = []
    for i, name_s in enumerate(GUARANTEE_SCORERS):
        scorer = make_scorer(name_s)
        stage_scores = score_stages(scorer, pool_logits[:-1])
        g = guarantee(stage_scores, stage_answers, calib_n, np.random.default_rng(1 + i))
        g.insert(0, "scorer", name_s)
        split_tables.append(g)
    splits = pd.concat(split_tables, ignore_index=True)
    return {
        "name": name,
        "regimes": regimes,
        "skipped": skipped,
        "table": table,
        "extra": pd.DataFrame(extra),
        "overhead": pd.DataFrame(overhead_rows),
        "splits": splits,
        "n_calib": calib_n,
        "n_test": n,
        "n_b1": n_b1,
        "measured": measured,
        "candidates": candidates,
        "selection": selection,
        "fp32_accuracy": float((reference == labels).mean()),
    }


def goal(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline check at ``GOAL_EPS`` per regime: controller vs the cheapest static plan
    whose test disagreement with fp32 is at most ``GOAL_EPS``, at that regime's batch size."""
    t = result["table"].set_index("method")
    statics = t[t["regime"] == "static"]
    meeting = statics[statics["disagreement"] <= GOAL_EPS]
    ov = result["overhead"].set_index("scorer")
    out = []
    for reg in result["regimes"]:
        for bs, col in ((1, "b1_mean_ms"), (32, "b32_mean_ms")):
            if reg.name != "b1+b32" and reg.name != f"b{bs}":
                continue
            best = meeting[col].idxmin()
            for scorer in ALL_SCORERS:
                label = f"ctrl[{reg.name}]:{scorer}:{GOAL_EPS}"
                row = t.loc[label]
                saving = 1 - row[col] / meeting.loc[best, col]
                key = "steady" if bs == 1 else "steady_b32"
                share = ov.loc[scorer, f"{key}_decision_share"]
                ext = ov.loc[scorer, f"{key}_external_overhead"]
                out.append(
                    {
                        "regime": reg.name,
                        "batch": bs,
                        "cascade": " -> ".join(reg.cascade),
                        "scorer": scorer,
                        "best_static": best,
                        "static_ms": float(meeting.loc[best, col]),
                        "ctrl_ms": float(row[col]),
                        "disagreement": float(row["disagreement"]),
                        "saving": float(saving),
                        "decision_share": float(share),
                        "external_overhead": float(ext),
                        "meets_eps": bool(row["disagreement"] <= GOAL_EPS),
                        "meets_saving": bool(saving >= GOAL_SAVING),
                        "meets_overhead": bool(share <= GOAL_OVERHEAD),
                    }
                )
    return out


def selection_check(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch size, what the selection chose at ``GOAL_EPS`` (``rank_cascades``' first row:
    a plan -> fp32 cascade with the ratio scorer, or a plan served alone) against the cheapest
    static plan whose test disagreement is at most ``GOAL_EPS``: the choice must not be slower
    (within ``COST_TOLERANCE``) and must meet ``GOAL_EPS`` on the test split."""
    t = result["table"].set_index("method")
    statics = t[t["regime"] == "static"]
    meeting = statics[statics["disagreement"] <= GOAL_EPS]
    out = []
    for bs, col in ((1, "b1_mean_ms"), (32, "b32_mean_ms")):
        chosen = result["selection"][bs]
        if chosen["kind"] == "alone":
            label = f"static:{chosen['candidate']}"
        else:
            reg = next(r.name for r in result["regimes"] if f"b{bs}" in r.name.split("+"))
            label = f"ctrl[{reg}]:ratio:{GOAL_EPS}"
        best = meeting[col].idxmin()
        ms, static_ms = float(t.loc[label, col]), float(meeting.loc[best, col])
        out.append(
            {
                "batch": bs,
                "selected": chosen["stages"],
                "kind": chosen["kind"],
                "predicted_ms": float(chosen["predicted_ms"]),
                "measured_ms": ms,
                "best_static": best,
                "static_ms": static_ms,
                "saving": 1.0 - ms / static_ms,
                "disagreement": float(t.loc[label, "disagreement"]),
                "meets_eps": bool(t.loc[label, "disagreement"] <= GOAL_EPS),
                "not_slower": bool(ms <= static_ms * (1.0 + COST_TOLERANCE)),
            }
        )
    return out


def overlay_data(result: dict[str, Any]) -> pd.DataFrame:
    """The figure's points, per batch size: every static plan (with its Pareto mark), each swept
    scorer's controller settings, and the random-routing and oracle baselines of that batch
    size's regime: test disagreement with fp32 against measured mean latency per input."""
    table, extra = result["table"], result["extra"]
    rows = []
    for bs in (1, 32):
        col = f"b{bs}_mean_ms"
        reg = next(r.name for r in result["regimes"] if f"b{bs}" in r.name.split("+"))
        for t in table.itertuples(index=False):
            if t.regime == "static":
                series, pareto = "static", getattr(t, f"pareto_b{bs}") == "*"
            elif t.regime == reg and t.method.split(":")[1] in SWEEP_SCORERS:
                series, pareto = f"controller ({t.method.split(':')[1]})", False
            else:
                continue
            rows.append((bs, series, t.method, getattr(t, col), t.disagreement, pareto))
        for e in extra[extra["regime"] == reg].itertuples(index=False):
            kind = e.method.split(":")
            if kind[0] == "oracle" or (kind[1] == SWEEP_SCORERS[0]):
                series = "oracle" if kind[0] == "oracle" else f"random ({kind[1]} shares)"
                rows.append((bs, series, e.method, getattr(e, col), e.disagreement, False))
    return pd.DataFrame(
        rows, columns=["batch", "series", "method", "latency_ms", "disagreement", "pareto"]
    )


def draw_overlay(results: list[dict[str, Any]], path: Path) -> None:
    """Draw :func:`overlay_data` per workload and batch size into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(results), 2, figsize=(11, 3.6 * len(results)), squeeze=False, constrained_layout=True
    )
    styles = {"static": ("s", "tab:red"), "oracle": ("*", "black")}
    for row, r in zip(axes, results, strict=True):
        data = overlay_data(r)
        for ax, bs in zip(row, (1, 32), strict=True):
            d = data[data["batch"] == bs]
            for series, g in d.groupby("series", sort=False):
                g = g.sort_values("latency_ms")
                marker, color = styles.get(series, ("o", None))
                if series == "static":
                    ax.scatter(
                        g["latency_ms"],
                        100 * g["disagreement"],
                        marker=marker,
                        color=color,
                        label="static plans (filled: Pareto)",
                        facecolors=[color if p else "none" for p in g["pareto"]],
                    )
                    for t in g.itertuples(index=False):
                        ax.annotate(
                            t.method[7:],
                            (t.latency_ms, 100 * t.disagreement),
                            fontsize=6,
                            color=color,
                        )
                else:
                    line = "-" if series.startswith("controller") else ":"
                    ax.plot(
                        g["latency_ms"],
                        100 * g["disagreement"],
                        marker=marker,
                        linestyle=line,
                        color=color,
                        label=series,
                        markersize=4,
                    )
            ax.axhline(100 * GOAL_EPS, color="0.6", linewidth=0.8, linestyle="--")
            ax.set_title(f"{r['name']}, batch {bs}", fontsize=9)
            ax.set_xlabel("mean latency per input (ms)")
            ax.set_ylabel("disagreement with fp32 (%)")
            ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_markdown(results: list[dict[str, Any]], backend: str, elapsed: float, threads: int) -> str:
    cpu = cpu_model()
    lines = [
        "# Runtime controller benchmark",
        "",
        f"Backend: `{backend}`; {cpu}; torch {torch.__version__}, {threads} thread(s). "
        f"delta = {DELTA}. Wall time {elapsed:.0f} s. Generated by "
        "`benchmarks/bench_controller.py`.",
        "",
        "Latency is per input, in ms: batch 1 (mean / p50 / p95 over the first `n_b1` test "
        f"inputs of each input's minimum over {REPEATS} runs, all methods interleaved input by "
        "input) and batch 32 (each full test batch's time / 32, methods interleaved batch by "
        "batch). `accuracy` and `disagreement` (with fp32's answer) are over the whole test "
        "split, served at batch 32; `b1_disagreement` is over the batch-1 inputs as served at "
        "batch 1. `ctrl[<regime>]:<scorer>:<eps>` is the controller whose cascade was chosen for "
        "that regime (the plan -> fp32 cascade predicted cheapest at that batch size), "
        "calibrated for disagreement <= eps. `pareto_*`: static plans on the latency / "
        "disagreement front at that batch size.",
        "",
        "![controller vs static plans](controller.png)",
        "",
        "`controller.png`: test disagreement with fp32 against measured mean latency per input, "
        "per workload and batch size: the static plans (filled: on the Pareto front), the "
        f"controller's eps sweep per scorer ({', '.join(SWEEP_SCORERS)}), random routing with "
        f"the {SWEEP_SCORERS[0]} controller's shares, and the oracle; dashed: the "
        f"{GOAL_EPS:.1%} target.",
        "",
    ]
    summary: list[dict[str, Any]] = []
    selections: list[dict[str, Any]] = []
    for r in results:
        lines += [
            f"## {r['name']}",
            "",
            f"Calibration inputs {r['n_calib']}, test inputs {r['n_test']} (batch-1 timing on "
            f"{r['n_b1']}); fp32 test accuracy {r['fp32_accuracy']:.4f}.",
            "",
            "Per-input cost of each static plan measured on the first test inputs (median of "
            "15), and the (plan -> fp32) cascades predicted from the calibration inputs alone at "
            f"eps = {GOAL_EPS} (ratio scorer, Learn-then-Test; batch 1: plan + share x fp32; "
            "batch 32: plan + share x fp32 at batch 4, the escalated rows re-run together); "
            "`rank_b1` / `rank_b32` = 0 is the regime's cascade: the cheapest prediction, where "
            f"predictions within {COST_TOLERANCE:.0%} of it tie and the one escalating fewer "
            "inputs wins:",
            "",
            plan_table(r),
            "",
            "Cascades: "
            + "; ".join(f"`{reg.name}`: {' -> '.join(reg.cascade)}" for reg in r["regimes"])
            + ".",
            "",
        ]
        for reg in r["regimes"]:
            bs = reg.batch
            predicted = r["candidates"][reg.cascade[0]][f"predicted_b{bs}_ms"]
            fp32 = r["measured"][bs]["fp32"]
            if predicted >= fp32:
                lines += [
                    f"`{reg.name}`: no cascade is predicted cheaper than fp32 alone at batch "
                    f"{bs} ({predicted:.4f} ms vs {fp32:.4f} ms); the controller is run anyway.",
                    "",
                ]
        need = min_calibration_size(GOAL_EPS, DELTA)
        if r["n_calib"] < need:
            lines += [
                f"{r['n_calib']} calibration inputs cannot certify eps = {GOAL_EPS} at delta = "
                f"{DELTA}: even with no disagreement the binomial test needs n >= {need}, so "
                "the controller escalates every input at that eps.",
                "",
            ]
        if r["skipped"]:
            lines += [f"Plans the backend refused: {r['skipped']}", ""]
        lines += [frame_table(r["table"]), ""]
        lines += [
            "Baselines per regime (computed from the per-variant test answers and the static "
            "plans' mean latencies): random routing with the controller's escalation share "
            "(routed directly: one pass), and the oracle (cheap variant where it agrees with "
            "fp32, else fp32; one pass). `ctrl_offline_mismatch`: inputs where the controller's "
            "served answer differs from its offline reconstruction (0 expected).",
            "",
            frame_table(r["extra"]),
            "",
        ]
        rep_rows = []
        for reg in r["regimes"]:
            for (scorer, eps), rep in reg.reports.items():
                rep_rows.append(
                    {
                        "regime": reg.name,
                        "scorer": scorer,
                        "eps": eps,
                        "threshold": rep.threshold,
                        "certified": rep.certified,
                        "n_fit": rep.n_fit,
                        "n_test": rep.n_test,
                        "calib_disagreement": rep.empirical_disagreement,
                        "expected_cost_ms": rep.expected_cost_ms,
                        "share": ", ".join(f"{k} {v:.3f}" for k, v in rep.share.items()),
                    }
                )
        lines += [
            "Calibration reports (share per variant and expected cost per input on the "
            "calibration inputs; cost = the variants' measured batch-32 cost per input, every "
            "pass paid):",
            "",
            frame_table(pd.DataFrame(rep_rows)),
            "",
            "Decision overhead per scorer, on calls served by the cheap variant alone "
            "(`decision` = scoring + routing time inside a call; `external` = a never-escalating "
            "controller's whole call vs the cheap static plan alone, per input, median of ratios "
            "- 1, which adds audit bookkeeping and dispatch). Batch 1 in the interleaved loop "
            "above (every call follows another method's, so caches are cold): `decision_share_"
            "median`, `external_overhead_median`; batch 1 in steady serving (one controller "
            "serving inputs one after another, blocks of 25 alternating with the cheap plan "
            "alone): `steady_*`; batch 32 in the interleaved loop over the test split: "
            "`b32_decision_share_median`; batch 32 in steady serving (the batch-32 regime's "
            "cheap variant, full test batches, as at batch 1): `steady_b32_*`. In steady serving "
            "`external` compares with the controller's own cheap module called directly. The "
            "goal checks use the steady-serving figures:",
            "",
            frame_table(r["overhead"]),
            "",
            f"Guarantee over {N_SPLITS} random draws per eps and scorer (the batch-1 cascade, "
            "pool = calibration + test inputs). `violation_true_risk`: calibration sets of "
            "`n_calib` drawn i.i.d. from the pool; violation = the chosen threshold's "
            "disagreement on the whole pool (the population sampled) > eps; Learn-then-Test "
            f"bounds this by delta = {DELTA}. `violation_test_split`: disjoint random splits, "
            "violation = empirical test-split disagreement > eps; `noise_only_rate`: the mean "
            "probability that a test split of that size exceeds eps by binomial noise alone, "
            "given the chosen threshold's pool risk. `finite_*`: the same disjoint splits, "
            "thresholds calibrated with `test_size = n_test` (the finite-test-set guarantee: "
            "Learn-then-Test with hypergeometric p-values bounds `finite_violation_test_split` "
            f"by delta = {DELTA}, assuming only that calibration and test inputs are "
            "exchangeable).",
            "",
            frame_table(r["splits"]),
            "",
        ]
        goals = goal(r)
        lines += [
            f"Goal check at eps = {GOAL_EPS} (best_static = cheapest static plan whose test "
            f"disagreement is <= {GOAL_EPS} at that batch size; goal: saving >= "
            f"{GOAL_SAVING:.0%}, decision overhead <= {GOAL_OVERHEAD:.0%}):",
            "",
        ]
        for g in goals:
            oh = (
                f"; decision overhead (steady serving) {100 * g['decision_share']:.2f}% of "
                f"inference (external {100 * g['external_overhead']:.2f}%)"
            )
            lines.append(
                f"- batch {g['batch']}, `{g['cascade']}`, {g['scorer']}: test disagreement "
                f"{g['disagreement']:.4f} ({'ok' if g['meets_eps'] else 'MISSED'}); "
                f"{g['ctrl_ms']:.4f} ms vs `{g['best_static']}` {g['static_ms']:.4f} ms: "
                f"saving {100 * g['saving']:.1f}% ({'ok' if g['meets_saving'] else 'MISSED'})"
                + oh
                + f" ({'ok' if g['meets_overhead'] else 'MISSED'})."
            )
            summary.append({"workload": r["name"], **g})
        lines += [
            "",
            f"Selection check at eps = {GOAL_EPS} on {cpu}: what `rank_cascades` chose from the "
            "calibration inputs (a plan -> fp32 cascade, or a plan served alone: a cascade of "
            "one, fp32 alone included), measured on the test split, against the best static "
            f"plan (not slower within {COST_TOLERANCE:.0%}, and meeting eps):",
            "",
        ]
        for c in selection_check(r):
            selections.append({"workload": r["name"], **c})
            lines.append(
                f"- batch {c['batch']}: `{c['selected']}` ({c['kind']}), predicted "
                f"{c['predicted_ms']:.4f} ms, measured {c['measured_ms']:.4f} ms vs "
                f"`{c['best_static']}` {c['static_ms']:.4f} ms: saving {100 * c['saving']:.1f}% "
                f"({'ok' if c['not_slower'] else 'SLOWER'}); test disagreement "
                f"{c['disagreement']:.4f} ({'ok' if c['meets_eps'] else 'MISSED'})"
                + (
                    f"; with {r['n_calib']} calibration inputs only fp32 itself can be certified "
                    f"at eps = {GOAL_EPS} (needs >= {need})."
                    if r["n_calib"] < need
                    else "."
                )
            )
        lines.append("")
    lines += [
        f"## Summary of goal checks ({cpu})",
        "",
        frame_table(pd.DataFrame(summary)),
        "",
        "Selections (cascades of one included):",
        "",
        frame_table(pd.DataFrame(selections)),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument(
        "--workloads", nargs="+", default=["digits_cnn", "char_mlp", "text_transformer"]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--splits", type=int, default=N_SPLITS, help="random draws per eps")
    parser.add_argument("--out", default=str(RESULTS / "controller.md"))
    args = parser.parse_args(argv)
    backend = args.backend
    if backend not in BACKENDS:
        print(
            f"backend {backend!r} is not registered (have {sorted(BACKENDS)}); "
            "falling back to 'simulate': latencies are NOT real-kernel latencies",
            file=sys.stderr,
        )
        backend = "simulate"
    globals()["N_SPLITS"] = args.splits
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    results = []
    for w in args.workloads:
        t0 = time.perf_counter()
        results.append(run_workload(w, backend))
        print(f"{w}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    text = to_markdown(results, backend, time.perf_counter() - start, args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    draw_overlay(results, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
