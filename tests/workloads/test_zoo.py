"""Every zoo model installable here (Hugging Face from configs, research-code shapes, LSTM,
MultiheadAttention) through the whole pipeline, on the graph fast path, with the cost model's
memory equal to the bytes the quantized model holds."""

from __future__ import annotations

import sys

import pytest
from zoo_pipeline import check

from mpsearch.workloads import ZOO
from mpsearch.workloads._zoo import zoo_available

HERE = [n for n, e in ZOO.items() if e.needs in (None, "transformers")]
EXPECTED_RUNNER = {"flag_net": "graph:fx(concrete_args)", "cell_decoder": "graph:fx(values)"}


@pytest.mark.slow
@pytest.mark.parametrize("name", HERE)
def test_zoo_model_runs_the_whole_pipeline(name: str) -> None:
    if not zoo_available(name):
        pytest.skip(f"needs {ZOO[name].needs}: pip install -e '.[models]'")
    seen = check(name)
    runner = EXPECTED_RUNNER.get(name, "graph:fx(values)" if ZOO[name].needs else "graph:fx")
    assert seen["runner"] == runner, seen["fallbacks"]
    for label, (predicted, held) in seen["memory"].items():
        assert predicted == held, label
    assert seen["export"]["plan"][0] == 0.0
    assert seen["export"]["state_dict"] == [0.0, 1.0]
    assert "torchvision" not in sys.modules
