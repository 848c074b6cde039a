"""Speed on real models: eager vs autotuned vs compiled plans, and the cost model's end-to-end error.

Run: ``python benchmarks/bench_speed.py`` (``--models resnet18,audio_cnn`` for a subset,
``--trials N``, ``--rounds N``). Prints a table and writes ``benchmarks/results/speed.md``.

For each model, side by side in one run on this machine's real kernels:

1. ``measure_cost`` twice on the ``cpu`` backend: each (layer, scheme) on its default kernel
   (``autotune=False``, "eager") and autotuned (every implementation timed, the fastest kept);
2. a search (quality x latency) on the autotuned cost model; every front plan and every
   uniform plan quantized on the autotuned backend, quality and latency measured for real;
   the best uniform and the best mixed plan meeting a 1% quality drop are the fastest measured;
3. fp32 (the user's model), the backend's fp32 plan, the best uniform and the best mixed plan,
   timed interleaved (medians of rounds) on the default kernels, the autotuned kernels and,
   where the ``cpu-inductor`` backend is registered, compiled whole; and the same plans, plus
   w8a8 on every layer it takes, through PyTorch's pt2e X86 Inductor int8 flow (``cpu-pt2e``:
   the other choices on the ``cpu`` kernels inside it), their quality measured again;
4. the cost model's predicted end-to-end latency of each measured plan vs its measured latency.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch
from _tables import available_rows, md_table  # benchmarks/: the script's folder
from bench_models import candidates
from torch.utils.flop_counter import FlopCounterMode

import mpsearch as mps
from mpsearch._data import run_model
from mpsearch.backends import BACKENDS, get_backend, quantize
from mpsearch.cost import cpu_model, median_ms
from mpsearch.layers import quantizable_layers
from mpsearch.schemes import get_scheme
from mpsearch.search._realcheck import measure_plans
from mpsearch.workloads import load_workload

SCHEMES = ["bf16", "w8a8", "w8a16", "w4a16_pc"]
TARGET_DROP = 0.01
MODELS = ["resnet18", "digits_resnet18", "audio_cnn", "hf_bert", "hf_llama"]
RESULTS = Path(__file__).parent / "results" / "speed.md"


def gflop(model: torch.nn.Module, batch: Any) -> float:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        run_model(model, batch)
    return counter.get_total_flops() / 1e9


def interleaved_ms(models: dict[str, Any], batch: Any, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each model's median of 3 calls, the models timed in turn."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for label, model in models.items():
            times[label].append(median_ms(lambda m=model: run_model(m, batch), repeats=3, warmup=1))
    return {k: statistics.median(v) for k, v in times.items()}


def run_model_row(name: str, *, trials: int, rounds: int) -> dict[str, Any]:
    wl = load_workload(name, n_calib=64, n_test=128, batch_size=32)
    x = wl.example_input
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = mps.profile(wl.model, wl.calib, schemes=SCHEMES, progress=False)
    started = time.perf_counter()
    mps.measure_cost(wl.model, x, schemes=SCHEMES, backend="cpu", autotune=False)
    eager_s = time.perf_counter() - started
    started = time.perf_counter()
    tuned = mps.measure_cost(wl.model, x, schemes=SCHEMES, backend="cpu")
    tuned_s = time.perf_counter() - started
    print(f"  {name}: {tuned.tuning_summary()}", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mps.search(
            wl.model, profile=prof, cost=tuned, evaluate=wl.evaluate, n_trials=trials,
            options=mps.SearchOptions(objectives=["quality", "latency"], seed=0, verify=0),
        )  # fmt: skip
    plans = candidates(wl.model, res, list(prof.schemes))
    table = measure_plans(
        wl.model, plans, backend=tuned.backend, evaluate=wl.evaluate,
        time_module=lambda m: median_ms(lambda: run_model(m, x), repeats=3, warmup=1),
        rounds=max(3, rounds // 3),
    ).set_index("plan")  # fmt: skip
    ran = table[table["note"] == ""]
    quality, ms = ran["quality"], ran["latency_ms"]
    meets = [k for k in ran.index if k != "fp32" and quality[k] >= quality["fp32"] - TARGET_DROP]
    best = min(meets, key=ms.__getitem__, default=None)
    best_uniform = min(
        (k for k in meets if k.startswith("uniform")), key=ms.__getitem__, default=None
    )
    errors = [abs(tuned.latency_ms(plans[k]) - ms[k]) / ms[k] for k in ran.index if k != "fp32"]
    chosen = {"fp32_plan": mps.PrecisionPlan.uniform("fp32")}
    if best_uniform is not None:
        chosen["uniform"] = plans[best_uniform]
    if best is not None:
        chosen["mixed"] = plans[best]
    modes = {"eager": get_backend("cpu"), "tuned": tuned.backend}
    if "cpu-inductor" in BACKENDS:
        modes["compiled"] = get_backend("cpu-inductor").tuned(tuned.backend.choices)
    models: dict[str, Any] = {"user_fp32": wl.model}
    for mode, backend in modes.items():
        for label, plan in chosen.items():
            models[f"{mode}:{label}"] = quantize(wl.model, plan, backend=backend)
            run_model(models[f"{mode}:{label}"], x)  # compiles where the backend compiles
    pt2e_quality = add_pt2e(models, wl, chosen, quality["fp32"], prof)
    timed = interleaved_ms(models, x, rounds)
    user = timed["user_fp32"]
    row: dict[str, Any] = {
        "model": name,
        "gflop": gflop(wl.model, x),
        "fp32_ms": user,
        "best_uniform": best_uniform or "",
        "best_mixed": best or "",
        "mixed_quality": float("nan") if best is None else quality[best],
        "cost_s_eager": eager_s,
        "cost_s_tuned": tuned_s,
        "cost_err_median": statistics.median(errors) if errors else float("nan"),
        "cost_err_max": max(errors, default=float("nan")),
    }
    for mode in modes:
        for label in chosen:
            row[f"{mode}_{label}_x"] = user / timed[f"{mode}:{label}"]
    for label in PT2E_LABELS:
        key = f"pt2e:{label}"
        row[f"pt2e_{label}_x"] = user / timed[key] if key in timed else float("nan")
        row[f"pt2e_{label}_quality"] = pt2e_quality.get(label, float("nan"))
    row["pt2e_w8a8_fp32_layers"] = pt2e_quality.get("w8a8_fp32_layers", float("nan"))
    return row


PT2E_LABELS = ("uniform", "mixed", "w8a8")


PT2E_FP32_KEPT = (0, 1, 2, 4, 8)
"""How many of the most sensitive int8-capable layers the pt2e w8a8 candidate keeps in fp32,
tried in turn until its quality meets the target."""


def pt2e_w8a8_plans(model: torch.nn.Module, prof: Any) -> dict[int, mps.PrecisionPlan]:
    """w8a8 on every layer ``cpu-pt2e`` takes, fp32 elsewhere, with the ``n`` layers the profile
    finds most sensitive to w8a8 also in fp32, for each ``n`` of :data:`PT2E_FP32_KEPT`."""
    backend = get_backend("cpu-pt2e")
    w8a8 = get_scheme("w8a8")
    layers = quantizable_layers(model)
    takes = [n for n, layer in layers.items() if backend.unsupported_reason(layer, w8a8) is None]
    errors = prof.pivot()["w8a8"] if "w8a8" in prof.schemes else None
    order = sorted(takes, key=lambda n: -float(errors.get(n, 0.0))) if errors is not None else takes
    return {
        n: mps.PrecisionPlan({name: "w8a8" if name in order[n:] else "fp32" for name in layers})
        for n in PT2E_FP32_KEPT
        if n < len(order)
    }


def add_pt2e(
    models: dict[str, Any],
    wl: Any,
    chosen: dict[str, mps.PrecisionPlan],
    fp32_quality: float,
    prof: Any,
) -> dict[str, Any]:
    """The chosen uniform and mixed plans, and w8a8 on every layer it takes (fp32 elsewhere,
    and on the most sensitive ones until the quality meets the target: :func:`pt2e_w8a8_plans`),
    on ``cpu-pt2e`` where it runs them (the plans the cpu backend runs) and
    where their quality, measured again (its activation ranges are static, calibrated on the
    workload's calibration batches), still drops at most TARGET_DROP; added to ``models`` as
    ``pt2e:<label>``. Returns each one's quality (and ``w8a8_fp32_kept``)."""
    if "cpu-pt2e" not in BACKENDS or get_backend("cpu-pt2e").unavailable_reason():
        return {}
    candidates = [(k, v) for k, v in chosen.items() if k in PT2E_LABELS]
    candidates += [("w8a8", plan) for plan in pt2e_w8a8_plans(wl.model, prof).values()]
    quality: dict[str, Any] = {}
    for label, plan in candidates:
        if f"pt2e:{label}" in models:  # a w8a8 candidate met the target already
            continue
        try:
            model = quantize(wl.model, plan, backend="cpu-pt2e", calib=wl.calib)
        except ValueError as err:  # a scheme or layer type it does not run
            print(f"  pt2e {label}: {' '.join(str(err).split())[:200]}", flush=True)
            continue
        quality[label] = wl.evaluate(model)
        fp32_kept = sum(1 for s in plan.resolve(wl.model).values() if s == "fp32")
        if quality[label] >= fp32_quality - TARGET_DROP:
            models[f"pt2e:{label}"] = model
            if label == "w8a8":
                quality["w8a8_fp32_layers"] = fp32_kept
        else:
            print(
                f"  pt2e {label} ({fp32_kept} layers fp32): quality {quality[label]:.4f} misses "
                "the target",
                flush=True,
            )
    return quality


def int8_ceiling(rounds: int) -> dict[str, float]:
    """This CPU's int8 : fp32 ceiling on a compute-bound convolution stack (two 256-channel
    3x3 convolutions at 14x14, batch 32, 14.8 GFLOP): the faster fp32 layout (the module as it
    is, NCHW, or channels-last) against the same stack through ``cpu-pt2e`` w8a8. No plan of a
    convolutional model can gain much more than this over fp32 on this machine."""
    torch.manual_seed(0)
    stack = torch.nn.Sequential(
        torch.nn.Conv2d(256, 256, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(256, 256, 3, padding=1), torch.nn.ReLU(),
    ).eval()  # fmt: skip
    x = torch.randn(32, 256, 14, 14)
    models: dict[str, Any] = {"nchw": stack, "channels_last": _ChannelsLast(stack)}
    if "cpu-pt2e" in BACKENDS and not get_backend("cpu-pt2e").unavailable_reason():
        models["int8"] = quantize(stack, "w8a8", backend="cpu-pt2e", calib=[x[:8]])
    with torch.no_grad():
        timed = interleaved_ms(models, x, rounds)
    fp32 = min(timed["nchw"], timed["channels_last"])
    return {"gflop": gflop(stack, x), "fp32_ms": fp32, "int8_x": fp32 / timed.get("int8", math.nan)}


class _ChannelsLast(torch.nn.Module):
    """``module`` on a channels-last copy of its input, with channels-last weights."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(module).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS, help="the Markdown table's path")
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    torch.manual_seed(0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    rows = available_rows(
        names, lambda name: run_model_row(name, trials=args.trials, rounds=args.rounds)
    )
    columns = [
        "model", "gflop", "fp32_ms", "best_uniform", "best_mixed", "mixed_quality",
        *(f"{mode}_{label}_x" for mode in ("eager", "tuned", "compiled")
          for label in ("fp32_plan", "uniform", "mixed")),
        *(f"pt2e_{label}_{what}" for label in PT2E_LABELS for what in ("x", "quality")),
        "pt2e_w8a8_fp32_layers",
        "best_x", "cost_err_median", "cost_err_max", "cost_s_eager", "cost_s_tuned",
    ]  # fmt: skip
    for r in rows:
        r["best_x"] = max(
            (
                v
                for k, v in r.items()
                if k.endswith(("_uniform_x", "_mixed_x", "pt2e_w8a8_x")) and v == v
            ),
            default=float("nan"),
        )
    ceiling = int8_ceiling(args.rounds)
    print(f"int8 ceiling: {ceiling}", flush=True)
    errors = [r["cost_err_median"] for r in rows]
    big = ", ".join("{model} {best_x:.2f}x".format(**r) for r in rows if r["gflop"] >= 1)
    fp32 = ", ".join(
        "{} {:.2f}x".format(r["model"], min(r["eager_fp32_plan_x"], r["tuned_fp32_plan_x"]))
        for r in rows
    )
    summary = (
        f"cost model end-to-end error (median over models of the per-model median): "
        f"{statistics.median(errors):.1%} (goal <= 10%); best plan vs the user's fp32 model on "
        f"the models of >= 1 GFLOP: {big} (goal >= 4x on two with VNNI or AMX, >= 2x on AVX2); "
        f"the backend's fp32 plan vs the user's model: {fp32} (goal: never slower). "
        f"This CPU's int8 : fp32 ceiling (a compute-bound conv stack of {ceiling['gflop']:.1f} "
        f"GFLOP, the faster fp32 layout at {ceiling['fp32_ms']:.1f} ms vs pt2e int8): "
        f"{ceiling['int8_x']:.2f}x"
        if rows
        else "no model ran"
    )
    text = "\n".join(
        [
            "# Speed on real models: eager vs autotuned vs compiled",
            "",
            f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} "
            f"thread(s); schemes {SCHEMES}; {args.trials} trials per search; wall time "
            f"{time.perf_counter() - started:.0f} s. Generated by `benchmarks/bench_speed.py`.",
            "",
            "`*_x`: speed-up over the user's fp32 model (median of "
            f"{args.rounds} interleaved rounds on the example batch of 32); `eager`: each layer "
            "on the backend's default kernel; `tuned`: the autotuned kernels (`measure_cost`'s "
            "picks); `compiled`: the autotuned plan compiled whole (`cpu-inductor`); `pt2e`: "
            "the plan through PyTorch's pt2e X86 Inductor int8 flow (`cpu-pt2e`: its w8a8 "
            "layers, static activation ranges from the calibration batches, the other choices "
            "on the cpu kernels inside the compiled model; `pt2e_w8a8`: "
            "w8a8 on every Conv1d / Conv2d / Linear but the ones the profile finds most "
            "sensitive, added to fp32 until the quality meets the target; "
            "`pt2e_w8a8_fp32_layers`: its layers left in fp32), kept only where its own measured quality still meets "
            "the target (`pt2e_*_quality`). "
            "`fp32_plan`: the backend's own fp32 plan; `uniform` / `mixed`: the fastest uniform "
            f"/ any plan whose quality drops at most {TARGET_DROP:.0%} (front and uniform plans, "
            "measured). `cost_err_*`: |predicted - measured| / measured end-to-end latency over "
            "the measured plans; `cost_s_*`: seconds to measure the cost table.",
            "",
            summary + ".",
            "",
            md_table(rows, columns),
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
