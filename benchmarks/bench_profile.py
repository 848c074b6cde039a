"""Profiler speed (vs one fp32 pass) and the additive proxy's rank correlation with real plans.

Run: ``python benchmarks/bench_profile.py``. Prints a table and writes
``benchmarks/results/profile.md``. ``--quick`` measures only the main ratio (digits CNN and
ResNet-18 in the default auto mode, 1 thread), prints it and writes nothing.

1. For the digits CNN and the ResNet-18 workload: wall time of ``profile`` (3 schemes, no
   cache) vs one fp32 forward pass over the same calibration batches, interleaved (profiles
   between pass timings; medians), their ratio in wall and in process CPU time, and the target
   ``3 x (number of schemes)``. The digits CNN runs with the default ``e2e_samples="auto"``
   (which keeps exact mode there); ResNet-18 runs in the default auto mode, which measures
   end-to-end errors on the first samples only, and in exact mode (``e2e_samples=None``).
2. ResNet-18, auto vs exact: Spearman rank correlation of the ``e2e`` column over all
   (layer, scheme) rows, and of the ``e2e`` ranking of layers per scheme.
3. On the trained digits CNN: ``prof.predict(plan)`` (sum of single-layer KL errors) vs the
   measured KL of >= 30 random multi-layer plans (simulate backend), Spearman rank correlation.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from scipy.stats import spearmanr

from mpsearch._data import run_model
from mpsearch.backends import quantize
from mpsearch.cost import cpu_model
from mpsearch.layers._batchnorm import fold_batchnorm
from mpsearch.profile import kl_divergence, profile
from mpsearch.workloads import load_workload

SCHEMES = ["bf16", "w8a8", "w4a16"]
N_PLANS = 40
RESULTS = Path(__file__).parent / "results" / "profile.md"


def forward_time(model: torch.nn.Module, batches: list) -> tuple[float, float]:
    """Wall and process-CPU seconds of one fp32 pass over all ``batches``."""
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            run_model(model, batch)
        return time.perf_counter() - wall, time.process_time() - cpu


def speed(
    name: str, e2e_samples: int | str | None = "auto", *, repeats: int = 1, passes: int = 3
) -> tuple[dict, object]:
    """``repeats`` profiles, each between ``passes`` fp32 passes, all interleaved.

    Ratios: median profile time / median pass time, for wall time and for process CPU time
    (the CPU ratio is less sensitive to other jobs taking the 2 cores away).
    """
    wl = load_workload(name, seed=0)
    load = os.getloadavg()[0]
    forward_time(wl.model, wl.calib)  # warm-up
    fwd_wall, fwd_cpu, prof_wall, prof_cpu = [], [], [], []
    prof = None
    for _ in range(repeats):
        for _ in range(passes):
            w, c = forward_time(wl.model, wl.calib)
            fwd_wall.append(w)
            fwd_cpu.append(c)
        wall, cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prof = profile(
                wl.model, wl.calib, schemes=SCHEMES, progress=False, e2e_samples=e2e_samples
            )
        prof_wall.append(time.perf_counter() - wall)
        prof_cpu.append(time.process_time() - cpu)
    for _ in range(passes):
        w, c = forward_time(wl.model, wl.calib)
        fwd_wall.append(w)
        fwd_cpu.append(c)
    fwd, fwd_c = statistics.median(fwd_wall), statistics.median(fwd_cpu)
    wall, cpu = statistics.median(prof_wall), statistics.median(prof_cpu)
    row = {
        "workload": name,
        "mode": "exact" if e2e_samples is None else str(e2e_samples),
        "layers": len(prof.layers),
        "batches": len(wl.calib),
        "runner": prof.info["runner"],
        "e2e_samples": prof.info["e2e_samples"],
        "calib_samples": prof.info["calib_samples"],
        "downstream": prof.info["downstream_passes"],
        "profile_s": wall,
        "profile_runs": [round(t, 2) for t in prof_wall],
        "forward_s": fwd,
        "ratio": wall / fwd,
        "cpu_ratio": cpu / fwd_c,
        "target": 3 * len(SCHEMES),
        "load": load,
        "timings": len(fwd_wall),
    }
    return row, prof


def fidelity(fast: object, exact: object) -> dict:
    """Rank agreement of the auto (subset) profile's e2e and mse columns with the exact ones."""
    a = fast.table.set_index(["layer", "scheme"])
    b = exact.table.set_index(["layer", "scheme"]).loc[a.index]
    ok = (a["status"] == "ok") & (b["status"] == "ok")
    rho_all = spearmanr(a.loc[ok, "e2e"], b.loc[ok, "e2e"]).statistic
    per_scheme = {}
    for scheme in SCHEMES:
        fa, fb = fast.pivot("e2e")[scheme], exact.pivot("e2e")[scheme]
        keep = fa.notna() & fb.notna()
        per_scheme[scheme] = spearmanr(fa[keep], fb[keep]).statistic
    return {
        "rows": int(ok.sum()),
        "spearman": rho_all,
        "per_scheme": per_scheme,
        "local_spearman": spearmanr(a.loc[ok, "mse"], b.loc[ok, "mse"]).statistic,
        "local_samples": fast.info["local_samples"],
    }


def plan_kl(model: torch.nn.Module, plan: dict, batches: list, refs: list) -> float:
    qm = quantize(model, plan, backend="simulate")
    total, n = 0.0, 0
    with torch.inference_mode():
        for batch, ref in zip(batches, refs, strict=True):
            out = run_model(qm, batch).float()
            total += kl_divergence(ref, out) * batch.shape[0]
            n += batch.shape[0]
    return total / n


def proxy_quality() -> dict:
    wl = load_workload("digits_cnn", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = profile(wl.model, wl.calib, schemes=SCHEMES, progress=False)
    folded = fold_batchnorm(wl.model)
    with torch.inference_mode():
        refs = [run_model(folded, b).float() for b in wl.calib]
        refs_unfolded = [run_model(wl.model, b).float() for b in wl.calib]
    rng = random.Random(0)
    status = prof.table.pivot(index="layer", columns="scheme", values="status")
    choices = {
        layer: ["fp32"] + [s for s in SCHEMES if status.loc[layer, s] == "ok"]
        for layer in prof.layers
    }
    predicted, measured, measured_unfolded = [], [], []
    while len(predicted) < N_PLANS:
        plan = {layer: rng.choice(opts) for layer, opts in choices.items()}
        if sum(s != "fp32" for s in plan.values()) < 2:
            continue
        predicted.append(prof.predict(plan))
        measured.append(plan_kl(folded, plan, wl.calib, refs))
        measured_unfolded.append(plan_kl(wl.model, plan, wl.calib, refs_unfolded))
    rho = spearmanr(predicted, measured).statistic
    rho_unfolded = spearmanr(predicted, measured_unfolded).statistic
    ratio = statistics.median(m / p for m, p in zip(measured, predicted, strict=True) if p > 0)
    return {
        "plans": N_PLANS,
        "spearman": rho,
        "spearman_unfolded": rho_unfolded,
        "median_measured_over_predicted": ratio,
    }


def quick() -> None:
    """The main ratio only: profile time / one fp32 pass, 1 thread, default auto mode."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, repeats, passes in (("digits_cnn", 5, 4), ("resnet18", 1, 3)):
            row, _ = speed(name, "auto", repeats=repeats, passes=passes)
            print(
                f"{name}: ratio (wall) {row['ratio']:.1f}, ratio (CPU) {row['cpu_ratio']:.1f}, "
                f"target {row['target']}, load {row['load']:.1f}, runs {row['profile_runs']}",
                flush=True,
            )
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    if "--quick" in sys.argv[1:]:
        quick()
        return
    torch.manual_seed(0)
    load_start = os.getloadavg()
    rows = []
    profiles = {}
    threads = torch.get_num_threads()
    # 2 threads (the default here), then 1 thread: with one thread a process's CPU time is its
    # own work, so the CPU-time ratio holds still while other jobs load the 2 shared cores
    for n_threads in (threads, 1):
        torch.set_num_threads(n_threads)
        for name, mode, repeats, passes in (
            ("digits_cnn", "auto", 5, 4),
            ("resnet18", "auto", 1, 3),
            ("resnet18", None, 1, 3),
        ):
            row, prof = speed(name, mode, repeats=repeats, passes=passes)
            row["threads"] = n_threads
            rows.append(row)
            print(row, flush=True)
            profiles.setdefault((name, mode), prof)
    torch.set_num_threads(threads)
    fid = fidelity(profiles[("resnet18", "auto")], profiles[("resnet18", None)])
    print(fid, flush=True)
    proxy = proxy_quality()
    load_end = os.getloadavg()
    lines = [
        "# Profiler benchmark",
        "",
        f"CPU: {cpu_model()}; torch {torch.__version__}, schemes {SCHEMES}, "
        "simulate backend, no cache. Each row: `runs` profiles interleaved with `n` timings of "
        "one fp32 pass over all calibration batches (the user's model, BatchNorm unfolded); "
        "ratio = median profile time / median pass time, in wall time and in process CPU time "
        "(with 1 thread the CPU time is the process's own work, so that ratio is the one "
        "least moved by other jobs on the shared cores).",
        "",
        f"Machine load (1/5/15-min load average on 2 cores, shared with other jobs): "
        f"{'/'.join(f'{v:.1f}' for v in load_start)} at the start, "
        f"{'/'.join(f'{v:.1f}' for v in load_end)} at the end; column `load`: the 1-min load "
        "average when the row started. Absolute seconds are noisy; each ratio is measured "
        "side by side.",
        "",
        "`e2e samples`: calibration samples the end-to-end errors were measured on (the local "
        "errors: all of them in exact mode, the batches holding the first 64 in auto mode); "
        "`D`: the end-to-end work per scheme in exact mode, in fp32 passes (from the traced "
        'graph\'s multiply-accumulates), which `e2e_samples="auto"` uses to choose (exact when '
        "D <= 1, else half a pass per scheme).",
        "",
        "| workload | e2e_samples | threads | quantizable layers | batches | runner | "
        "e2e samples | D | load | profile runs (s) | fp32 pass (s) | n | ratio (wall) | "
        "ratio (CPU) | target (3 x S) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['threads']} | {r['layers']} | {r['batches']} | "
            f"{r['runner']} | "
            f"{r['e2e_samples']} / {r['calib_samples']} | {r['downstream']:.2f} | "
            f"{r['load']:.1f} | {', '.join(f'{t:.2f}' for t in r['profile_runs'])} | "
            f"{r['forward_s']:.4f} | {r['timings']} | {r['ratio']:.1f} | {r['cpu_ratio']:.1f} | "
            f"{r['target']} |"
        )
    per = ", ".join(f"{k} {v:.3f}" for k, v in fid["per_scheme"].items())
    lines += [
        "",
        "## ResNet-18: auto (subset) vs exact end-to-end errors",
        "",
        f"Spearman rho of `e2e` over all {fid['rows']} (layer, scheme) rows: "
        f"**{fid['spearman']:.3f}**; per scheme (ranking of the layers): {per}. "
        f"Local errors (`mse`) on the first {fid['local_samples']} samples vs all: Spearman "
        f"{fid['local_spearman']:.3f}.",
        "",
        "## Additive proxy vs measured plans (digits CNN, trained)",
        "",
        f"{proxy['plans']} random plans (each layer fp32/bf16/w8a8/w4a16, >= 2 layers quantized), "
        "measured KL(fp32 || plan) on the calibration batches vs `prof.predict(plan)`.",
        "",
        "| measured on | Spearman rho | median measured / predicted |",
        "|---|---|---|",
        f"| BN-folded model (what the profile quantizes) | {proxy['spearman']:.3f} | "
        f"{proxy['median_measured_over_predicted']:.2f} |",
        f"| original model (BN unfolded) | {proxy['spearman_unfolded']:.3f} | - |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
