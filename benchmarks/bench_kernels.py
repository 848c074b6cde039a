"""Real low-precision kernels on this CPU and the cost model's latency predictions.

For each bundled workload: end-to-end latency (median) and memory of fp32, every uniform
plan the cpu backend runs and mixed plans, as ratios to fp32, with task quality; the cost
model's predicted vs measured latency for random mixed plans; the large-Linear speed check;
the cost of the per-layer boundary casts. Writes benchmarks/results/kernels.md.

Timing uses this process's CPU time with one thread (``timer="process"``) because the
benchmark machine is shared: wall-clock medians there move by 2-10x with other jobs.

    python benchmarks/bench_kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import torch
from _tables import md_table  # benchmarks/ is the script's folder
from torch import nn

import mpsearch as mps
from mpsearch.cost import cpu_model, measure_cost, median_ms
from mpsearch.workloads import load_workload

SCHEMES = ["bf16", "fp16", "w8a8", "w8a16", "w4a16"]
WORKLOADS = {"digits_cnn": 32, "resnet18": 8, "text_transformer": 32}
OUT = Path(__file__).parent / "results" / "kernels.md"
TIMING = {"num_threads": 1, "timer": "process"}


def fastest_plan(cost, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    t = cost.table[cost.table.supported & ~cost.table.scheme.isin(exclude)]
    best = t.loc[t.groupby("layer")["latency_ms"].idxmin()]
    return dict(zip(best.layer, best.scheme, strict=True))


def greedy_plan(wl, model, cost, target: float) -> dict[str, str]:
    """Each layer's fastest kernel, for as many layers as the quality target allows: layers
    ranked by the quality drop of quantizing them alone, the longest prefix kept (bisection)."""
    fast = fastest_plan(cost)
    fp32 = dict.fromkeys(cost.layers, "fp32")
    drop = {}
    for layer in cost.layers:
        if fast[layer] == "fp32":
            drop[layer] = 0.0
            continue
        q = mps.quantize(model, {**fp32, layer: fast[layer]}, backend="cpu")
        drop[layer] = -wl.evaluate(q)
    order = sorted(cost.layers, key=lambda n: drop[n])

    def plan_of(k: int) -> dict[str, str]:
        return {**fp32, **{n: fast[n] for n in order[:k]}}

    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if wl.evaluate(mps.quantize(model, plan_of(mid), backend="cpu")) >= target:
            lo = mid
        else:
            hi = mid - 1
    return plan_of(lo)


def random_plan(cost, rng: random.Random) -> dict[str, str]:
    t = cost.table[cost.table.supported]
    options = t.groupby("layer")["scheme"].apply(list).to_dict()
    return {layer: rng.choice(options[layer]) for layer in cost.layers}


def bench_workload(name: str, batch: int, n_random: int, repeats: int, out: list[str]) -> None:
    start = time.time()
    wl = load_workload(name, seed=0, batch_size=batch)
    model, x = wl.model.eval(), wl.example_input
    cost = measure_cost(
        model, x, schemes=SCHEMES, backend="cpu", repeats=repeats, warmup=2, **TIMING
    )
    fp32_q = wl.evaluate(model)
    target = fp32_q - 0.01 * abs(fp32_q)
    plans: dict[str, dict[str, str]] = {}
    for s in ["fp32", *SCHEMES]:
        plans[f"uniform {s}"] = {n: (s if cost.supported(n, s) else "fp32") for n in cost.layers}
    plans["mixed: fastest kernel per layer"] = fastest_plan(cost)
    plans["mixed: fastest per layer, no int4"] = fastest_plan(cost, exclude=("w4a16",))
    plans["mixed: fastest per layer, first/last bf16"] = {
        **fastest_plan(cost),
        cost.layers[0]: "bf16",
        cost.layers[-1]: "bf16",
    }
    plans["mixed: greedy by per-layer quality drop"] = greedy_plan(wl, model, cost, target)
    rows = [
        {
            "plan": "fp32 model (untouched)",
            "latency_ms": cost.fp32_latency_ms,
            "x_fp32": 1.0,
            "memory_MB": cost.fp32_memory_bytes / 1e6,
            "mem_x_fp32": 1.0,
            "quality": fp32_q,
            "meets_target": True,
        }
    ]
    for label, plan in plans.items():
        ms = cost.measure(plan)
        quality = wl.evaluate(mps.quantize(model, plan, backend="cpu"))
        rows.append(
            {
                "plan": label,
                "latency_ms": ms,
                "x_fp32": ms / cost.fp32_latency_ms,
                "memory_MB": cost.memory_mb(plan),
                "mem_x_fp32": cost.memory_bytes(plan) / cost.fp32_memory_bytes,
                "quality": quality,
                "meets_target": quality >= target,
            }
        )
    ok = [r for r in rows if r["meets_target"]]
    ok_uniform = [r for r in ok if r["plan"].startswith("uniform") or r["plan"].startswith("fp32")]
    ok_mixed = [r for r in ok if r["plan"].startswith("mixed")]
    best_u = min(ok_uniform, key=lambda r: r["latency_ms"])
    best_m = min(ok_mixed, key=lambda r: r["latency_ms"]) if ok_mixed else None

    rng = random.Random(0)
    randoms = [random_plan(cost, rng) for _ in range(n_random)]
    check = cost.validate(randoms)
    out.append(f"## {name} (batch {batch}, {len(cost.layers)} quantizable layers)\n")
    out.append(
        f"Quality: `workload.evaluate` ({wl.task}); target = within 1% of fp32 ({target:.4g}).\n"
    )
    out.append(
        md_table(
            rows,
            ["plan", "latency_ms", "x_fp32", "memory_MB", "mem_x_fp32", "quality", "meets_target"],
        )
    )
    verdict = (
        f"Fastest uniform plan meeting the target: **{best_u['plan']}** ({best_u['latency_ms']:.3g} ms). "
        + (
            f"Fastest mixed plan meeting it: **{best_m['plan']}** ({best_m['latency_ms']:.3g} ms): "
            f"{cost.fp32_latency_ms / best_m['latency_ms']:.2f}x faster than fp32, "
            f"{best_u['latency_ms'] / best_m['latency_ms']:.2f}x vs the best uniform plan."
            if best_m
            else "No mixed plan tried met the target."
        )
    )
    out.append("\n" + verdict + "\n")
    out.append(
        f"Cost model ({len(check)} random mixed plans, predicted vs measured end to end): "
        f"median relative error **{check.rel_error.median():.1%}**, max {check.rel_error.max():.1%} "
        f"(fit: intercept {cost.intercept_ms:.3g} ms, slope {cost.slope:.3g}; "
        f"in-sample error on uniform plans median {cost.fit_table.rel_error.median():.1%}).\n"
    )
    out.append(f"_{time.time() - start:.0f} s for this workload._\n")
    print("\n".join(out[-6:]), flush=True)

    if name == "resnet18":
        # Boundary casts: each real layer casts fp32 -> bf16 -> fp32. Compare the uniform bf16
        # plan with the whole model cast to bf16 (no casts between layers, norms in bf16 too).
        q = mps.quantize(model, "bf16", backend="cpu")
        whole = copy.deepcopy(model).to(torch.bfloat16).to(memory_format=torch.channels_last)
        xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        torch.set_num_threads(1)
        a = median_ms(lambda: q(x), repeats=repeats, warmup=2, timer="process")
        b = median_ms(lambda: whole(xb), repeats=repeats, warmup=2, timer="process")
        out.append(
            "Boundary casts (resnet18): uniform bf16 plan with per-layer fp32<->bf16 casts "
            f"{a:.3g} ms vs whole model in bf16 (no casts) {b:.3g} ms: the casts cost "
            f"{(a - b) / a:.0%} of the bf16 plan.\n"
        )


def bench_large_linear(out: list[str], repeats: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(6)]).eval()
    rows = []
    for batch in (32, 1):
        x = torch.randn(batch, 2048)
        torch.set_num_threads(1)
        ref = median_ms(lambda x=x: model(x), repeats=repeats, warmup=3, timer="process")
        row = {"batch": batch, "fp32_ms": ref}
        for s in ["bf16", "w8a8", "w8a16", "w4a16"]:
            q = mps.quantize(model, s, backend="cpu")
            row[s] = ref / median_ms(
                lambda q=q, x=x: q(x), repeats=repeats, warmup=3, timer="process"
            )
        qd = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )
        row["quantize_dynamic"] = ref / median_ms(
            lambda qd=qd, x=x: qd(x), repeats=repeats, warmup=3, timer="process"
        )
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            ao = copy.deepcopy(model)
            quantize_(ao, Int8DynamicActivationInt8WeightConfig())
            row["torchao_int8"] = ref / median_ms(
                lambda ao=ao, x=x: ao(x), repeats=repeats, warmup=3, timer="process"
            )
        except Exception as exc:  # pragma: no cover - depends on torchao build
            row["torchao_int8"] = f"n/a ({type(exc).__name__})"
        rows.append(row)
    out.append("## 6 x Linear(2048): speed-up over fp32 (1 thread, CPU time)\n")
    out.append(
        "Our backend's kernels (bf16, w8a8 on fbgemm where oneDNN lacks VNNI, else oneDNN, "
        "w8a16/w4a16 aten packed) next to torch's `quantize_dynamic` and torchao int8 dynamic, "
        "as fp32_ms / ms (higher is faster).\n"
    )
    out.append(
        md_table(
            rows,
            [
                "batch",
                "fp32_ms",
                "bf16",
                "w8a8",
                "w8a16",
                "w4a16",
                "quantize_dynamic",
                "torchao_int8",
            ],
        )
    )
    out.append("")
    print("\n".join(out[-4:]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and plans")
    args = parser.parse_args()
    repeats, n_random = (5, 5) if args.quick else (15, 20)
    start = time.time()
    out = [
        "# Real kernels and the cost model (cpu backend)\n",
        f"Device: {cpu_model()}, torch {torch.__version__}, 1 thread, timer = process CPU time, "
        f"median of {repeats} runs. Ratios are to the untouched fp32 model measured in the same run. "
        "Uniform plans keep layers the scheme cannot run (e.g. weight-only on convolutions) in fp32.\n",
    ]
    bench_large_linear(out, repeats)
    for name, batch in WORKLOADS.items():
        bench_workload(name, batch, n_random, repeats, out)
    out.append(f"Total benchmark time: {time.time() - start:.0f} s.\n")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(out) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
