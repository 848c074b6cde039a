"""The bundled spaces adapt to what was profiled and measured: no fixed dtype is assumed."""

from __future__ import annotations

import pytest

import mpsearch as mps
from mpsearch.search import SearchSpace, SpaceError
from mpsearch.workloads import load_workload

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("workload", ["mlp", "digits_cnn"])
def test_scheme_lists_without_bf16_search_with_the_default_spaces(
    workload, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    wl = load_workload(workload, seed=0)
    calib = list(wl.calib)[:2]
    prof = mps.profile(wl.model, calib, schemes=["w8a8", "w4a16"])
    cost = mps.measure_cost(
        wl.model, wl.example_input, schemes=prof.schemes, backend="cpu", repeats=3, warmup=1
    )
    res = mps.search(wl.model, profile=prof, cost=cost, eval_data=calib, n_trials=20)
    last = res.space.layers[-1]
    assert res.space.pinned == {}
    assert res.space.layer_choices(last) == ["fp32", "w8a8"]  # >= 8 bits among those measured
    assert {s for c in res.space.choices.values() for s in c} <= {"fp32", "w8a8", "w4a16"}
    assert len(res.pareto) >= 1 and res.best().resolve(wl.model)[last] in ("fp32", "w8a8")
    assert list(tmp_path.iterdir()) == []  # the study lived in memory
    pinned = SearchSpace(schemes=["fp32", "w8a8"], pin={"last": "bf16"})
    with pytest.raises(SpaceError, match=r"the cost model was measured for fp32, w8a8, w4a16"):
        mps.search(wl.model, profile=prof, cost=cost, eval_data=calib, space=pinned, n_trials=2)
