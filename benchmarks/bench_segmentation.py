"""Dense outputs: the pipeline on per-pixel or per-label answers, and the controller per input.

Two workloads, one per run (``--workload``):

- ``digits_seg``: segmentation of 24 x 24 scenes of scikit-learn's handwritten digits (11
  classes per pixel, a trained encoder-decoder returning ``{"out": [B, 11, 24, 24]}``); a
  scene agrees with fp32 when 99 % of its pixels do; quality mean IoU;
- ``digits_tags``: multi-label tagging of the same scenes (which of the 10 digit classes a
  scene holds, one sigmoid per label, a Hugging Face style multi-label config); a scene agrees
  with fp32 when its whole label set does; quality the share of scenes tagged exactly right.
  Its controllers are calibrated twice, scoring a scene by its least certain label (the
  default for multi-label) and by the mean of its labels' scores.

Side by side in one run on this machine's real kernels:

1. the profile (its runner, the metric it picked for the output, profile time / (S x one fp32
   pass));
2. the cost model (``cpu``, autotuned) and a search of quality x latency;
3. static plans (uniform and the front), each serving every scene: quality, position
   agreement with fp32, scene disagreement (the share of test scenes that disagree), latency
   per scene at batch 32;
4. the controller: for each static plan faster than fp32, the cascade plan -> fp32
   calibrated on the calibration scenes (Learn-then-Test, ``delta = 0.1``) for each target
   ``eps`` on scene disagreement; on the test scenes its quality, scene disagreement, share
   escalated and latency per scene, timed interleaved with the static plans (median over
   rounds of each server's time on the whole test split).

Ratios: the fastest server meeting each ``eps`` on the test scenes (static or controller) vs
fp32, and the fastest controller meeting it vs the fastest static plan meeting it.

Run: ``python benchmarks/bench_segmentation.py [--workload digits_tags]`` (writes
benchmarks/results/segmentation.md or multilabel.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from _tables import md_table, write_result
from bench_models import _mix, candidates
from bench_profile import forward_time

import mpsearch as mps
from mpsearch._data import is_multi_label, run_model
from mpsearch.cost import cpu_model
from mpsearch.runtime import rank_cascades
from mpsearch.runtime._scorers import answer_logits
from mpsearch.workloads import load_workload
from mpsearch.workloads._base import METRICS

RESULTS = Path(__file__).parent / "results"
SCHEMES = ["bf16", "w8a8", "w8a16", "w4a8_pc", "w4a16"]
EPS = (0.01, 0.05, 0.1)
DELTA = 0.1
COLUMNS = [
    "server", "kind", "eps", "quality", "position_agreement", "scene_disagreement", "escalated",
    "ms_per_scene", "x_fp32",
]  # fmt: skip


@dataclass(frozen=True)
class Setting:
    """What one workload's run measures and how its table reads."""

    results: str
    min_agreement: float
    quality: str
    positions: str
    metric: str
    title: str
    reduces: tuple[str | None, ...] = (None,)


SETTINGS = {
    "digits_seg": Setting(
        "segmentation.md",
        0.99,
        "mean IoU",
        "pixels",
        "KL over the class dimension, per pixel",
        "Segmentation: the pipeline on per-pixel outputs, and the controller per scene",
    ),
    "digits_tags": Setting(
        "multilabel.md",
        1.0,
        "the share of scenes tagged exactly right",
        "labels",
        "the KL of each label's sigmoid, summed per scene",
        "Multi-label tagging: the pipeline on per-label outputs, and the controller per scene",
        reduces=(None, "mean"),
    ),
}
"""Per workload: the results file, ``min_agreement``, what the quality and the positions are,
the metric the profile should pick, the title, and the controllers' ``reduce`` values (``None``:
the controller's default)."""


def answers(output: Any, multi_label: bool) -> torch.Tensor:
    """Per-position answers ``[B, P]``: each pixel's class, or each label's ``logit > 0``."""
    return answer_logits(output, multi_label=multi_label).argmax(1)


def scene_agreement(
    server: Any, batches: list[Any], reference: list[torch.Tensor], multi_label: bool
) -> torch.Tensor:
    """Each scene's share of positions on the reference's answer, served by ``server``."""
    shares = []
    with torch.inference_mode():
        for batch, ref in zip(batches, reference, strict=True):
            got = answers(run_model(server, batch), multi_label)
            shares.append((got == ref).double().mean(1))
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
    parser.add_argument("--workload", choices=sorted(SETTINGS), default="digits_seg")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, help="the markdown table written (default by workload)")
    args = parser.parse_args()
    setting = SETTINGS[args.workload]
    out_path = args.out or RESULTS / setting.results
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    wl = load_workload(args.workload, n_calib=512, n_test=512, batch_size=32)
    multi_label, quality_of = is_multi_label(wl.model), METRICS[wl.task]

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
        reference = [answers(wl.model(b), multi_label) for b in wl.test]
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
            for reduce in setting.reduces:
                ctrl = mps.Controller(
                    wl.model, [plans[label]], backend=cost.backend, calib=wl.calib,
                    min_agreement=setting.min_agreement, reduce=reduce,
                )  # fmt: skip
                ctrl.calibrate(wl.calib, max_disagreement=eps, delta=DELTA)
                name = f"{label} -> fp32" + (f" ({reduce})" if reduce else "")
                servers[f"{name} @ {eps}"] = ctrl
                rows[f"{name} @ {eps}"] = {"kind": "controller", "eps": eps, "choices": name}
    for label, server in servers.items():
        agreement = scene_agreement(server, wl.test, reference, multi_label)
        row = rows[label]
        row.update(
            server=label,
            quality=quality_of(server, wl.test, wl.test_labels),
            position_agreement=float(agreement.mean()),
            scene_disagreement=float((agreement < setting.min_agreement).double().mean()),
        )
        if isinstance(server, mps.Controller):
            row["escalated"] = float((server.audit["variant"] == 1).mean())
    timed = interleaved_ms(servers, wl.test, args.rounds)
    for label, row in rows.items():
        row["ms_per_scene"] = timed[label]
        row["x_fp32"] = timed["fp32"] / timed[label]
    lines = [_verdict(list(rows.values()), eps) for eps in EPS]
    lines += [_selection(servers, static_ms, wl.calib, eps, setting, multi_label) for eps in EPS]
    for line in lines:
        print(line)
    if len(setting.reduces) > 1:
        lines += [_reductions(list(rows.values()), eps) for eps in EPS]
    for line in lines:
        print(line)
    agreement_rule = (
        "its whole label set is fp32's"
        if setting.min_agreement == 1.0
        else f"at least {setting.min_agreement:.0%} of its {setting.positions} take fp32's answer"
    )
    text = "\n".join(
        [
            f"# {setting.title}",
            "",
            f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} "
            f"thread(s); workload `{args.workload}` ({wl.info['fp32_quality']:.4f} "
            f"{setting.quality} in fp32, {sum(len(b) for b in wl.calib)} calibration and "
            f"{sum(len(b) for b in wl.test)} test scenes, batches of 32); schemes {SCHEMES}; "
            f"{args.trials} trials; wall time {time.perf_counter() - started:.0f} s. Generated "
            f"by `benchmarks/bench_segmentation.py --workload {args.workload}`.",
            "",
            f"Profile: runner `{prof.info['runner']}`, metric `{prof.e2e_metric}` "
            f"({setting.metric}), profile time / (S x one fp32 pass) {profile_ratio:.2f}.",
            "",
            f"`quality`: {setting.quality} on the test scenes; `position_agreement`: share of "
            f"{setting.positions} on fp32's answer; `scene_disagreement`: share of test scenes "
            f"that disagree with fp32 (a scene agrees when {agreement_rule}: what the "
            f"controller's `max_disagreement` = `eps` bounds, at "
            f"`min_agreement={setting.min_agreement}`, delta {DELTA}); `escalated`: share of "
            "test scenes the controller re-ran on fp32; "
            f"`ms_per_scene`: median over {args.rounds} rounds of the whole test split at batch "
            "32, every server timed in turn; `x_fp32`: fp32's time over the server's. Static "
            "plans: uniform and the search's front (quality x latency), on the cost model's "
            "autotuned kernels with activation ranges from the calibration scenes; controllers: "
            "each static plan faster than fp32 as the cheap stage, fp32 the reference"
            + (
                "; `(mean)`: scoring a scene by the mean of its labels' scores instead of its "
                "least certain label's (the default)."
                if len(setting.reduces) > 1
                else "."
            ),
            "",
            *[f"- {line}" for line in lines],
            "",
            md_table(list(rows.values()), [*COLUMNS, "choices"], digits=4),
            "",
        ]
    )
    write_result(out_path, text)


def _selection(
    servers: dict[str, Any],
    static_ms: dict[str, float],
    calib: list[Any],
    eps: float,
    setting: Setting,
    multi_label: bool,
) -> str:
    """What ``rank_cascades`` picks at ``eps`` from the calibration scenes and the measured
    costs alone: each static plan served alone, or as a cascade's cheap stage before fp32."""
    with torch.inference_mode():
        logits = {
            label: torch.cat(
                [
                    answer_logits(run_model(servers[label], b), multi_label=multi_label)
                    for b in calib
                ]
            ).float()
            for label in static_ms
        }
    reference = logits.pop("fp32")
    table = rank_cascades(
        logits, reference, costs={k: static_ms[k] for k in logits},
        reference_cost=static_ms["fp32"], max_disagreement=eps, delta=DELTA,
        reference_name="fp32", min_agreement=setting.min_agreement,
        reduce="max" if multi_label else "mean",
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


def _reductions(rows: list[dict[str, Any]], eps: float) -> str:
    """Per cheap plan at ``eps``: the controller scoring a scene by its least certain label vs
    by the mean of its labels' scores (share escalated, speed, test-scene disagreement)."""
    ctrl = {r["server"]: r for r in rows if r["kind"] == "controller" and r["eps"] == eps}
    parts = []
    for name, by_max in ctrl.items():
        by_mean = ctrl.get(name.replace(" -> fp32 @", " -> fp32 (mean) @"))
        if by_mean is None or by_mean is by_max:
            continue
        parts.append(
            f"`{by_max['choices']}`: {by_max['escalated']:.1%} escalated, "
            f"{by_max['x_fp32']:.2f}x fp32, disagreement {by_max['scene_disagreement']:.2%} by "
            f"the least certain label; {by_mean['escalated']:.1%}, {by_mean['x_fp32']:.2f}x, "
            f"{by_mean['scene_disagreement']:.2%} by the mean"
        )
    return f"eps {eps}: " + ("; ".join(parts) or "no controller")


if __name__ == "__main__":
    main()
