"""torchvision / timm zoo models through the whole pipeline, in their own venv.

PyPI's torchvision does not load beside the pinned torch of the main environment (and breaks
``transformers`` there), so these models run in a subprocess of the venv
``scripts/models_venv.sh`` makes (``.venv-vision``, or the interpreter
``MPSEARCH_VISION_PYTHON`` names). Without it they are skipped, saying how to make it. One
model by hand: ``.venv-vision/bin/python tests/zoo_pipeline.py tv_resnet18``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpsearch.workloads import ZOO, load_workload
from mpsearch.workloads._zoo import zoo_available

ROOT = Path(__file__).resolve().parents[2]
VISION = [name for name, entry in ZOO.items() if entry.needs in ("torchvision", "timm")]
SCHEMES = ["bf16", "w8a8", "w4a16"]
MAKE = "bash scripts/models_venv.sh"


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
        [str(python), str(ROOT / "tests" / "zoo_pipeline.py"), name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
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
