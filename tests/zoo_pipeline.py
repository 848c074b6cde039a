"""One zoo model through the whole pipeline (profile, measure_cost on cpu, search, quantize on
cpu, export), returning what was seen: shared by the zoo tests in this environment and, as a
script, in the torchvision/timm venv (``python tests/zoo_pipeline.py tv_resnet18``)."""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from typing import Any

from mpsearch._data import output_tensor, run_model
from mpsearch.workloads import load_workload

SCHEMES = ["bf16", "w8a8", "w4a16"]


def check(name: str) -> dict[str, Any]:
    """Profile, measure, search, quantize and export zoo model ``name``; return what was seen.

    Runs inside the vision venv; raises on the first step that fails.
    """
    import torch

    import mpsearch as mps
    from mpsearch.cost import held_bytes

    imported = [m for m in ("torchvision", "timm") if m in sys.modules]
    torch.set_num_threads(1)
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal start
        now = time.perf_counter()
        seconds[step] = round(now - start, 2)
        start = now

    wl = load_workload(name, n_calib=16, n_test=16, batch_size=8)
    with torch.inference_mode():
        logits_std = float(output_tensor(run_model(wl.model, wl.example_input)).float().std())
    lap("load")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prof = mps.profile(wl.model, wl.calib, schemes=SCHEMES, progress=False)
    lap("profile")
    cost = mps.measure_cost(
        wl.model, wl.example_input, schemes=["fp32", *prof.schemes], backend="cpu", repeats=1,
        warmup=0,
    )  # fmt: skip
    lap("measure_cost")
    res = mps.search(wl.model, profile=prof, cost=cost, evaluate=wl.evaluate, n_trials=20, seed=0)
    lap("search")
    memory = {}
    for label, plan in {"best": res.best(), "w8a8": "w8a8", "bf16": "bf16"}.items():
        quantized = mps.quantize(wl.model, plan, backend=cost.backend)  # the kernels it measured
        memory[label] = (cost.memory_bytes(plan), held_bytes(quantized))
    lap("quantize")
    with tempfile.TemporaryDirectory() as out:
        exported = mps.export_plan(
            wl.model, res.best(), out, example_input=wl.example_input,
            formats=("plan", "state_dict"),
        )  # fmt: skip
    lap("export")
    return {
        "imported_with_mpsearch": imported,
        "logits_std": logits_std,
        "runner": prof.info.get("runner"),
        "fallbacks": prof.info.get("runner_fallbacks"),
        "warnings": sorted({str(w.message)[:200] for w in caught}),
        "memory": memory,
        "export": {r.format: [r.check, r.top1_agreement] for r in exported.records},
        "seconds": seconds,
    }


if __name__ == "__main__":
    print(json.dumps(check(sys.argv[1])), flush=True)
