"""Exported plans: file sizes, round-trip checks, and ONNX Runtime vs PyTorch speed.

For each workload and one mixed plan: ``export_plan`` to every format; the bytes of each
file against the fp32 model's state dict; the ONNX file's max abs diff and top-1 agreement
against the PyTorch ``simulate`` model (ONNX Runtime at its default optimization level and at
the basic level only); Q/DQ node counts; median latency at the workload's batch of fp32
eager, the ``simulate`` model, the ``cpu`` model (real kernels), the ``torch.export`` program
and ONNX Runtime, as ratios to fp32. Writes benchmarks/results/export.md.

Timing is this process's CPU time on one thread (ONNX Runtime with one intra-op thread), as
the machine is shared.

    python benchmarks/bench_export.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
from _tables import md_table  # benchmarks/ is the script's folder

import mpsearch as mps
from mpsearch.cost import cpu_model, median_ms
from mpsearch.export import export_plan
from mpsearch.workloads import load_workload

OUT = Path(__file__).parent / "results" / "export.md"
PLANS = {
    "mlp": mps.PrecisionPlan({"fc1": "w8a8", "fc2": "w4a16"}, default="w8a16"),
    "digits_cnn": mps.PrecisionPlan(
        {"conv1": "bf16", "conv2": "w8a8", "conv3": "w8a8", "fc1": "w4a16"}, default="w8a8"
    ),
    "text_transformer": mps.PrecisionPlan(
        {"re:.*fc1": "w8a8", "re:.*q_proj": "w4a16"}, default="w8a16"
    ),
}


def ort_session(path: Path, level: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[level]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latencies(wl, plan: mps.PrecisionPlan, paths: dict[str, Path], repeats: int) -> dict:
    """Median ms of each way of running the plan, on the workload's example batch."""
    x = wl.example_input
    sim = mps.quantize(wl.model, plan, backend="simulate")
    real = mps.quantize(wl.model, plan, backend="cpu")
    program = torch.export.load(str(paths["program"])).module()
    sessions = {lvl: ort_session(paths["onnx"], lvl) for lvl in ("all", "basic")}
    feed = {sessions["all"].get_inputs()[0].name: x.numpy()}
    fns = {
        "fp32 eager": lambda: wl.model(x),
        "simulate eager": lambda: sim(x),
        "cpu real kernels": lambda: real(x),
        "torch.export program": lambda: program(x),
        "ONNX Runtime": lambda: sessions["all"].run(None, feed),
        "ONNX Runtime (basic opt)": lambda: sessions["basic"].run(None, feed),
    }
    return {k: median_ms(f, repeats=repeats, warmup=5, timer="process") for k, f in fns.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    repeats = 15 if parser.parse_args().quick else 60
    torch.set_num_threads(1)
    size_rows, check_rows, speed_rows = [], [], []
    for name, plan in PLANS.items():
        wl = load_workload(name)
        x = wl.example_input
        with tempfile.TemporaryDirectory() as tmp:
            res = export_plan(
                wl.model, plan, tmp, example_input=x, backend="cpu", check_inputs=wl.test
            )
            buffer = io.BytesIO()
            torch.save(wl.model.state_dict(), buffer)
            fp32_bytes = buffer.tell()
            row = {"workload": name, "fp32 state dict": fp32_bytes}
            for r in res.records:
                row[r.format] = r.bytes
                if r.format != "plan":
                    row[f"{r.format} / fp32"] = r.bytes / fp32_bytes
            size_rows.append(row)
            rec = res.record("onnx")
            d = rec.details
            check_rows.append(
                {
                    "workload": name,
                    "outputs": d["n_outputs"],
                    "max abs diff": d["max_abs_diff"],
                    "top-1 agreement": d["top1_agreement"],
                    "max abs diff (basic)": d["max_abs_diff_basic"],
                    "top-1 (basic)": d["top1_agreement_basic"],
                    "Q / DQ / DynQ": "{QuantizeLinear} / {DequantizeLinear} / "
                    "{DynamicQuantizeLinear}".format(**d["qdq_nodes"]),
                    "Cast": d["node_counts"].get("Cast", 0),
                    "opset": d["opset"],
                    "program check": res.record("program").check,
                    "state_dict check": res.record("state_dict").check,
                }
            )
            times = latencies(wl, plan, res.paths, repeats)
        base = times["fp32 eager"]
        speed = {"workload": name, "batch": int(x.shape[0]), "fp32 ms": base}
        speed.update({f"{k} (x fp32)": v / base for k, v in times.items() if k != "fp32 eager"})
        speed_rows.append(speed)
        print(name, {k: round(v, 3) for k, v in times.items()}, flush=True)

    size_cols = [
        "workload",
        "fp32 state dict",
        "state_dict",
        "state_dict / fp32",
        "program",
        "program / fp32",
        "onnx",
        "onnx / fp32",
        "plan",
    ]
    speed_cols = list(speed_rows[0])
    check_cols = list(check_rows[0])
    text = "\n\n".join(
        [
            "# Exported plans (benchmarks/bench_export.py)",
            f"CPU: {cpu_model()}; torch {torch.__version__}.",
            "Plans: "
            + "; ".join(f"{k}: {v.rules} default {v.default!r}" for k, v in PLANS.items())
            + ". Backend `cpu` for the state dict and program, `simulate` for ONNX; dynamic "
            "activation ranges.",
            "## ONNX Runtime vs PyTorch `simulate` (all test batches)",
            md_table(check_rows, check_cols),
            "## File sizes (bytes)",
            md_table(size_rows, size_cols),
            f"## Latency (median of {repeats}, process CPU time, 1 thread; ratio to fp32 eager)",
            md_table(speed_rows, speed_cols),
        ]
    )
    OUT.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
