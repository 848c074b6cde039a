"""torchvision / timm zoo models through the whole pipeline, in their own venv.

PyPI's torchvision does not load beside the pinned torch of the main environment (and breaks
``transformers`` there), so these models run in a subprocess of the venv
``scripts/models_venv.sh`` makes (``.venv-vision``, or the interpreter
``MPSEARCH_VISION_PYTHON`` names). Without it they are skipped, saying how to make it. One
model by hand: ``.venv-vision/bin/python tests/workloads/test_zoo_vision.py tv_resnet18``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from mpsearch.workloads import ZOO, load_workload
from mpsearch.workloads._zoo import zoo_available

ROOT = Path(__file__).resolve().parents[2]
VISION = [name for name, entry in ZOO.items() if entry.needs in ("torchvision", "timm")]
SCHEMES = ["bf16", "w8a8", "w4a16"]
MAKE = "bash scripts/models_venv.sh"


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
        logits_std = float(wl.model(wl.example_input).std())
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
        quantized = mps.quantize(wl.model, plan, backend="cpu")
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


def _vision_python() -> Path | None:
    named = os.environ.get("MPSEARCH_VISION_PYTHON")
    if named:
        if not Path(named).is_file():
            pytest.fail(f"MPSEARCH_VISION_PYTHON={named!r} is not a file; make it with `{MAKE}`")
        return Path(named)
    default = ROOT / ".venv-vision" / "bin" / "python"
    return default if default.exists() else None


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here"
)
@pytest.mark.parametrize("name", VISION)
def test_without_torchvision_vision_models_are_listed_and_say_how_to_get_them(name: str) -> None:
    assert not zoo_available(name)
    with pytest.raises(ModuleNotFoundError, match="scripts/models_venv.sh"):
        load_workload(name)
    assert "torchvision" not in sys.modules and "timm" not in sys.modules


@pytest.mark.slow
@pytest.mark.parametrize("name", VISION)
def test_vision_zoo_model_runs_the_whole_pipeline(name: str) -> None:
    python = _vision_python()
    if python is None:
        pytest.skip(
            f"no torchvision/timm venv: make it with `{MAKE}` (or set MPSEARCH_VISION_PYTHON)"
        )
    done = subprocess.run(
        [str(python), __file__, name], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{name} failed in {python}:\n{done.stderr[-4000:]}"
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["imported_with_mpsearch"] == [], seen
    assert seen["logits_std"] > 1e-2, seen  # not vanishing (random-init BatchNorm statistics)
    assert seen["runner"].startswith("graph:"), seen
    for predicted, held in seen["memory"].values():
        assert predicted == held, seen["memory"]
    assert seen["export"]["plan"][0] == 0.0, seen["export"]
    assert seen["export"]["state_dict"] == [0.0, 1.0], seen["export"]


if __name__ == "__main__":
    print(json.dumps(check(sys.argv[1])), flush=True)
