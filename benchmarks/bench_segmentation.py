"""Segmentation: the pipeline on per-pixel outputs, and the controller serving each scene.

On the ``digits_seg`` workload (24 x 24 scenes of scikit-learn's handwritten digits, 11 classes
per pixel, a trained encoder-decoder returning ``{"out": [B, 11, 24, 24]}``), side by side in
one run on this machine's real kernels:

1. the profile (its runner, the metric it picked for the output, profile time / (S x one fp32
   pass));
2. the cost model (``cpu``, autotuned) and a search of mean IoU x latency;
3. static plans (uniform and the front), each serving every scene: mean IoU, pixel agreement
   with fp32, scene disagreement (the share of test scenes with fewer than ``MIN_AGREEMENT``
   of their pixels on fp32's class), latency per scene at batch 32;
4. the controller: for each static plan faster than fp32, the cascade plan -> fp32
   calibrated on the calibration scenes (Learn-then-Test, ``delta = 0.1``) for each target
   ``eps`` on scene disagreement; on the test scenes its mean IoU, scene disagreement, share
   escalated and latency per scene, timed interleaved with the static plans (median over
   rounds of each server's time on the whole test split).

Ratios: the fastest server meeting each ``eps`` on the test scenes (static or controller) vs
fp32, and the fastest controller meeting it vs the fastest static plan meeting it.

Run: ``python benchmarks/bench_segmentation.py`` (writes benchmarks/results/segmentation.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch
from _tables import md_table, write_result
from bench_models import _mix, candidates
from bench_profile import forward_time

import mpsearch as mps
from mpsearch._data import output_tensor, run_model
from mpsearch.cost import cpu_model
from mpsearch.runtime import rank_cascades
from mpsearch.runtime._scorers import answer_logits
from mpsearch.workloads import load_workload
from mpsearch.workloads._base import mean_iou

RESULTS = Path(__file__).parent / "results" / "segmentation.md"
SCHEMES = ["bf16", "w8a8", "w8a16", "w4a8_pc", "w4a16"]
MIN_AGREEMENT = 0.99
EPS = (0.01, 0.05, 0.1)
DELTA = 0.1
COLUMNS = [
    "server", "kind", "eps", "miou", "pixel_agreement", "scene_disagreement", "escalated",
    "ms_per_scene", "x_fp32",
]  # fmt: skip


def scene_agreement(server: Any, batches: list[Any], reference: list[torch.Tensor]) -> torch.Tensor:
    """Each scene's share of pixels on the reference's class, served by ``server``."""
    shares = []
    with torch.inference_mode():
        for batch, ref in zip(batches, reference, strict=True):
            got = output_tensor(run_model(server, batch)).argmax(1)
            shares.append((got == ref).flatten(1).double().mean(1))
    return torch.cat(shares)


def interleaved_ms(servers: dict[str, Any], batches: list[Any], rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each server's ms per scene over all ``batches``, the
    servers timed in turn (a warm-up pass first)."""
    n = sum(len(b) for b in batches)
    times: dict[str, list[float]] = {k: [] for k in servers}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for label, server in servers.items():
                start = time.perf_counter()
                for batch in batches:
                    run_model(server, batch)
                if r:
                    times[label].append((time.perf_counter() - start) * 1e3 / n)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS, help="the markdown table written")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    wl = load_workload("digits_seg", n_calib=512, n_test=512, batch_size=32)

    passes = [forward_time(wl.model, wl.calib)[0] for _ in range(4)][1:]
    t0 = time.perf_counter()
    prof = mps.profile(wl.model, wl.calib, schemes=SCHEMES, progress=False)
    profile_ratio = (time.perf_counter() - t0) / (len(SCHEMES) * statistics.median(passes))
    cost = mps.measure_cost(wl.model, wl.example_input, schemes=["fp32", *SCHEMES], backend="cpu")
    res = mps.search(
        wl.model, profile=prof, cost=cost, evaluate=wl.evaluate, n_trials=args.trials,
        options=mps.SearchOptions(objectives=["quality", "latency"], seed=0),
    )  # fmt: skip
    print(f"profile: {prof.info['runner']}, metric {prof.e2e_metric}, ratio {profile_ratio:.2f}")

    with torch.inference_mode():
        reference = [output_tensor(wl.model(b)).argmax(1) for b in wl.test]
    plans = candidates(wl.model, res, SCHEMES)
    servers: dict[str, Any] = {"fp32": wl.model}
    rows: dict[str, dict[str, Any]] = {"fp32": {"kind": "static"}}
    for label, plan in plans.items():
        try:
            servers[label] = mps.quantize(wl.model, plan, backend=cost.backend, calib=wl.calib)
        except ValueError as err:
            print(f"  {label}: {str(err).splitlines()[0]}")
            continue
        rows[label] = {"kind": "static", "choices": _mix(plan, wl.model)}
    static_ms = interleaved_ms(servers, wl.test, args.rounds)
    for label in [k for k in list(servers) if k != "fp32" and static_ms[k] < static_ms["fp32"]]:
        for eps in EPS:
            ctrl = mps.Controller(
                wl.model, [plans[label]], backend=cost.backend, calib=wl.calib,
                min_agreement=MIN_AGREEMENT,
            )  # fmt: skip
            ctrl.calibrate(wl.calib, max_disagreement=eps, delta=DELTA)
            name = f"{label} -> fp32"
            servers[f"{name} @ {eps}"] = ctrl
            rows[f"{name} @ {eps}"] = {"kind": "controller", "eps": eps, "choices": name}
    for label, server in servers.items():
        agreement = scene_agreement(server, wl.test, reference)
        row = rows[label]
        row.update(
            server=label,
            miou=mean_iou(server, wl.test, wl.test_labels),
            pixel_agreement=float(agreement.mean()),
            scene_disagreement=float((agreement < MIN_AGREEMENT).double().mean()),
        )
        if isinstance(server, mps.Controller):
            row["escalated"] = float((server.audit["variant"] == 1).mean())
    timed = interleaved_ms(servers, wl.test, args.rounds)
    for label, row in rows.items():
        row["ms_per_scene"] = timed[label]
        row["x_fp32"] = timed["fp32"] / timed[label]
    lines = [_verdict(list(rows.values()), eps) for eps in EPS]
    lines += [_selection(servers, static_ms, wl.calib, eps) for eps in EPS]
    for line in lines:
        print(line)
    text = "\n".join(
        [
            "# Segmentation: the pipeline on per-pixel outputs, and the controller per scene",
            "",
            f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} "
            f"thread(s); workload `digits_seg` ({wl.info['fp32_quality']:.4f} mean IoU in "
            f"fp32, {sum(len(b) for b in wl.calib)} calibration and "
            f"{sum(len(b) for b in wl.test)} test scenes, batches of 32); schemes {SCHEMES}; "
            f"{args.trials} trials; wall time {time.perf_counter() - started:.0f} s. Generated "
            "by `benchmarks/bench_segmentation.py`.",
            "",
            f"Profile: runner `{prof.info['runner']}`, metric `{prof.e2e_metric}` (KL over the "
            f"class dimension, per pixel), profile time / (S x one fp32 pass) "
            f"{profile_ratio:.2f}.",
            "",
            "`miou`: mean intersection over union on the test scenes; `pixel_agreement`: share "
            "of pixels on fp32's class; `scene_disagreement`: share of test scenes with fewer "
            f"than {MIN_AGREEMENT:.0%} of their pixels on fp32's class (what the controller's "
            f"`max_disagreement` = `eps` bounds, at `min_agreement={MIN_AGREEMENT}`, "
            f"delta {DELTA}); `escalated`: share of test scenes the controller re-ran on fp32; "
            f"`ms_per_scene`: median over {args.rounds} rounds of the whole test split at batch "
            "32, every server timed in turn; `x_fp32`: fp32's time over the server's. Static "
            "plans: uniform and the search's front (mean IoU x latency), on the cost model's "
            "autotuned kernels with activation ranges from the calibration scenes; controllers: "
            "each static plan faster than fp32 as the cheap stage, fp32 the reference.",
            "",
            *[f"- {line}" for line in lines],
            "",
            md_table(list(rows.values()), [*COLUMNS, "choices"], digits=4),
            "",
        ]
    )
    write_result(args.out, text)


def _selection(
    servers: dict[str, Any], static_ms: dict[str, float], calib: list[Any], eps: float
) -> str:
    """What ``rank_cascades`` picks at ``eps`` from the calibration scenes and the measured
    costs alone: each static plan served alone, or as a cascade's cheap stage before fp32."""
    with torch.inference_mode():
        logits = {
            label: torch.cat([answer_logits(run_model(servers[label], b)).float() for b in calib])
            for label in static_ms
        }
    reference = logits.pop("fp32")
    table = rank_cascades(
        logits, reference, costs={k: static_ms[k] for k in logits},
        reference_cost=static_ms["fp32"], max_disagreement=eps, delta=DELTA,
        reference_name="fp32", min_agreement=MIN_AGREEMENT,
    )  # fmt: skip
    top = table.iloc[0]
    return (
        f"`rank_cascades` at eps {eps} (calibration scenes and measured costs only) picks "
        f"`{top['stages']}`, predicted {static_ms['fp32'] / top['predicted_ms']:.2f}x fp32"
    )


def _verdict(rows: list[dict[str, Any]], eps: float) -> str:
    """The fastest server meeting ``eps`` on the test scenes vs fp32, and the fastest
    controller meeting it vs the fastest static plan meeting it."""
    meets = [r for r in rows if r["scene_disagreement"] <= eps]
    best = min(meets, key=lambda r: r["ms_per_scene"])
    static = min((r for r in meets if r["kind"] == "static"), key=lambda r: r["ms_per_scene"])
    ctrl = [r for r in meets if r["kind"] == "controller" and r["eps"] == eps]
    line = (
        f"scene disagreement <= {eps}: fastest `{best['server']}` {best['x_fp32']:.2f}x fp32; "
        f"fastest static `{static['server']}` {static['x_fp32']:.2f}x"
    )
    if not ctrl:
        return line + "; no controller calibrated at this eps met it on the test scenes"
    fastest = min(ctrl, key=lambda r: r["ms_per_scene"])
    return line + (
        f"; fastest controller `{fastest['server']}` {fastest['x_fp32']:.2f}x fp32, "
        f"{static['ms_per_scene'] / fastest['ms_per_scene']:.2f}x that static plan "
        f"({fastest['escalated']:.1%} of scenes escalated)"
    )


if __name__ == "__main__":
    main()
