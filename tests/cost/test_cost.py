from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import ReadsWeights, conv_net
from torch import nn

import mpsearch as mps
from mpsearch.backends import storage_bytes
from mpsearch.backends._cpu import CPU_KERNELS
from mpsearch.cost import CostCacheWarning, CostModel, held_bytes, measure_cost
from mpsearch.cost._cache import read_cache, write_cache
from mpsearch.cost._model import ideal_layer_bytes
from mpsearch.layers._layers import NEVER_CALLED

SCHEMES = ["bf16", "w8a8", "w4a16", "fp8"]


def _net() -> nn.Module:
    return conv_net(32)


X = torch.randn(4, 3, 8, 8)


@pytest.fixture(scope="module")
def cost() -> CostModel:
    return measure_cost(_net(), X, schemes=SCHEMES, backend="cpu", repeats=2, warmup=1)


PLANS = [
    "fp32",
    "bf16",
    {"0": "w8a8", "3": "bf16", "5": "w4a16", "7": "w8a8"},
    mps.PrecisionPlan({"re:[57]": "w4a16"}, default="w8a8"),
]


@pytest.mark.parametrize("plan", PLANS)
def test_memory_equals_bytes_of_quantized_model(cost: CostModel, plan) -> None:
    qnet = mps.quantize(_net(), plan, backend=cost.backend)  # with the kernels it measured
    state_bytes = sum(t.numel() * t.element_size() for t in qnet.state_dict().values())
    assert cost.memory_bytes(plan) == state_bytes == storage_bytes(qnet)
    assert cost.memory_mb(plan) == pytest.approx(state_bytes / 1e6)


def test_fp32_references(cost: CostModel) -> None:
    assert cost.fp32_memory_bytes == storage_bytes(_net())
    assert cost.memory_bytes("fp32") == cost.fp32_memory_bytes
    assert cost.fp32_latency_ms > 0


def test_table_and_support(cost: CostModel) -> None:
    assert list(cost.table.columns) == [
        "layer",
        "scheme",
        "memory_bytes",
        "latency_ms",
        "supported",
        "reason",
        "kernel",
    ]
    assert cost.layers == ["0", "3", "5", "7"]
    assert cost.schemes == ["fp32", *SCHEMES]
    # 4 layers x 5 schemes, and w4a16_pc on the two convs w4a16's groups do not fit
    assert len(cost.table) == 4 * 5 + 2
    assert set(cost.table[cost.table.scheme == "w4a16_pc"].layer) == {"0", "3"}
    assert cost.supported("5", "w4a16") and not cost.supported("0", "w4a16")
    assert not cost.supported("5", "fp8")
    row = cost.table[(cost.table.layer == "5") & (cost.table.scheme == "fp8")].iloc[0]
    assert "fp8" in row.reason and "simulate" in row.reason


def test_latency_prediction_api(cost: CostModel) -> None:
    plan = {"0": "w8a8", "3": "bf16", "5": "w4a16", "7": "w8a8"}
    assert cost.layer_sum_ms(plan) > 0
    assert cost.latency_ms(plan) == pytest.approx(
        cost.intercept_ms + cost.slope * cost.layer_sum_ms(plan)
    )
    assert cost.latency_ms(mps.PrecisionPlan(plan)) == cost.latency_ms(plan)
    assert set(cost.fit_table.columns) >= {
        "plan",
        "layer_sum_ms",
        "measured_ms",
        "predicted_ms",
        "rel_error",
    }
    assert cost.measure(plan, repeats=2) > 0
    report = cost.validate([plan, "bf16"], repeats=2)
    assert list(report.columns) == ["plan", "predicted_ms", "measured_ms", "rel_error"]
    assert len(report) == 2


def test_unsupported_plan_is_refused(cost: CostModel) -> None:
    with pytest.raises(ValueError, match=r"0 in 'w4a16'"):
        cost.memory_bytes({"0": "w4a16"})
    with pytest.raises(ValueError, match="not measured"):
        cost.latency_ms({"0": "w8a16"})


def test_layers_subset_and_simulate_backend() -> None:
    net = _net()
    cost = measure_cost(
        net, X, schemes=["w4a16", "fp4"], backend="simulate", layers=["5"], repeats=1, warmup=0
    )
    layer = net[5]
    # Ideal storage: 4-bit codes + (bf16 scale + 4-bit zero) per group of 32, fp32-free bias in bf16.
    expected = (576 * 64 * 4 + (576 * 64 // 32) * (16 + 4)) // 8 + 64 * 2
    assert ideal_layer_bytes(layer, mps.get_scheme("w4a16")) == expected
    assert cost.memory_bytes({"5": "w4a16"}) == storage_bytes(net) - 4 * (576 * 64 + 64) + expected
    assert cost.supported("5", "fp4")
    with pytest.raises(ValueError, match="not measured"):
        cost.memory_bytes({"0": "bf16"})


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'schemes'"):
        measure_cost(_net(), X, schemes=[])
    with pytest.raises(ValueError, match="'layers'"):
        measure_cost(_net(), X, schemes=["bf16"], layers=["nope"])
    with pytest.raises(ValueError, match="'repeats'"):
        measure_cost(_net(), X, schemes=["bf16"], repeats=0)
    with pytest.raises(ValueError, match="no CUDA|cannot run"):
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
        measure_cost(_net(), X, schemes=["bf16"], backend="cuda")


def test_cache_reused_and_keyed(tmp_path) -> None:
    first = measure_cost(_net(), X, schemes=["bf16"], repeats=1, warmup=0, cache_dir=tmp_path)
    files = list(tmp_path.glob("cost-cpu-*.json"))
    assert len(files) == 1
    assert not list(tmp_path.glob("*.tmp"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = measure_cost(_net(), X, schemes=["bf16"], repeats=1, warmup=0, cache_dir=tmp_path)
    assert second.table.equals(first.table)
    assert second.intercept_ms == first.intercept_ms
    # Another scheme list is another key: a second file, the first untouched.
    measure_cost(_net(), X, schemes=["w8a8"], repeats=1, warmup=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("cost-cpu-*.json"))) == 2


def test_a_new_kernel_is_a_new_cache_key(tmp_path) -> None:
    """Costs measured on one kernel are never reused for another (e.g. after an upgrade)."""
    measure_cost(_net(), X, schemes=["w8a8"], repeats=1, warmup=0, cache_dir=tmp_path)
    key = (nn.Linear, "w8a8")
    kernel = CPU_KERNELS[key]
    try:
        mps.backends.register_cpu_kernel(
            nn.Linear, "w8a8", mps.backends.Kernel(kernel.build, "another int8 kernel")
        )
        measure_cost(_net(), X, schemes=["w8a8"], repeats=1, warmup=0, cache_dir=tmp_path)
    finally:
        mps.backends.register_cpu_kernel(nn.Linear, "w8a8", kernel)
    assert len(list(tmp_path.glob("cost-cpu-*.json"))) == 2


@pytest.mark.parametrize("damage", ["torn", "edited", "other_key", "other_format"])
def test_damaged_cache_is_not_trusted(tmp_path, damage: str) -> None:
    path = tmp_path / "c.json"
    write_cache(path, "k1", {"rows": [1, 2, 3]})
    assert read_cache(path, "k1") == {"rows": [1, 2, 3]}
    text = path.read_text()
    if damage == "torn":
        path.write_text(text[: len(text) // 2])
    elif damage == "edited":
        record = json.loads(text)
        record["payload"]["rows"][0] = 99
        path.write_text(json.dumps(record))
    elif damage == "other_format":
        record = json.loads(text)
        record["format"] = 0
        path.write_text(json.dumps(record))
    key = "k2" if damage == "other_key" else "k1"
    with pytest.warns(CostCacheWarning):
        assert read_cache(path, key) is None


def test_torn_cache_file_is_remeasured(tmp_path) -> None:
    measure_cost(_net(), X, schemes=["bf16"], repeats=1, warmup=0, cache_dir=tmp_path)
    (path,) = tmp_path.glob("cost-cpu-*.json")
    path.write_text(path.read_text()[:100])
    with pytest.warns(CostCacheWarning):
        cost = measure_cost(_net(), X, schemes=["bf16"], repeats=1, warmup=0, cache_dir=tmp_path)
    assert cost.supported("0", "bf16")
    assert json.loads(path.read_text())["format"] == 1  # rewritten whole


def test_atomic_write_leaves_old_file_on_failure(tmp_path) -> None:
    path = tmp_path / "c.json"
    write_cache(path, "k", {"a": 1})
    with pytest.raises(TypeError):
        write_cache(path, "k", {"a": object()})
    assert read_cache(path, "k") == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_latency_fit_shrugs_off_one_plan_timed_under_load() -> None:
    from mpsearch.cost._model import _fit

    sums = [10.0, 20.0, 30.0, 40.0, 50.0]
    measured = [2.0 + 1.5 * s for s in sums]
    measured[2] = 400.0  # a burst of load on a shared machine while one plan was timed
    fit = _fit([{"layer_sum_ms": s, "measured_ms": m} for s, m in zip(sums, measured, strict=True)])
    assert fit["slope"] == pytest.approx(1.5) and fit["intercept_ms"] == pytest.approx(2.0)
    assert all(p["predicted_ms"] > 0 for p in fit["points"])


def test_latency_fit_never_predicts_a_negative_latency() -> None:
    """Two plans timed under load: the line through them is steep and its intercept negative,
    which predicted -3.6 ms for a plan whose layers sum to less (a CI run beside a sweep)."""
    from mpsearch.cost._model import _fit

    fit = _fit(
        [{"layer_sum_ms": 1.0, "measured_ms": 2.0}, {"layer_sum_ms": 2.0, "measured_ms": 9.0}]
    )
    assert fit["intercept_ms"] == 0.0 and fit["slope"] == pytest.approx(3.25)  # median of 2, 4.5
    assert all(p["predicted_ms"] > 0 for p in fit["points"])


def test_cold_layer_timings_are_a_separate_measurement(tmp_path) -> None:
    """Cold timings (caches flushed before each call) are cached apart from warm ones."""
    import mpsearch as mps

    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(1, 64)
    opts = {"repeats": 3, "warmup": 1, "cache_dir": tmp_path, "autotune": False}
    warm = mps.measure_cost(net, x, schemes=["w8a8"], options=mps.CostOptions(**opts))
    cold = mps.measure_cost(net, x, schemes=["w8a8"], options=mps.CostOptions(cold=True, **opts))
    assert warm.meta["cold"] is False and cold.meta["cold"] is True
    assert len(list(tmp_path.glob("cost-*.json"))) == 2
    assert (cold.table["latency_ms"] > 0).all()


def test_layers_the_model_never_calls_are_left_out_and_searched_in_fp32() -> None:
    model = ReadsWeights().eval()
    x = torch.randn(16, 64)
    with pytest.warns(UserWarning, match=r"never called on 'example_input'.*'gate'"):
        cost = measure_cost(model, x, schemes=["w8a8"], repeats=2, warmup=1)
    assert cost.layers == ["proj", "head"] and cost.never_called == ["gate"]
    assert cost.memory_bytes({"proj": "w8a8"}) < cost.fp32_memory_bytes
    # the model reads its weight directly: quantize keeps it fp32 where calib shows it, and
    # a plan that quantizes it is priced so (no time)
    assert cost.read_directly == ["gate"]
    with pytest.warns(UserWarning, match=r"1 layer\(s\) stay fp32.*'gate'"):
        quantized = mps.quantize(model, "w8a8", backend=cost.backend, calib=[x])
    assert cost.memory_bytes("w8a8") == held_bytes(quantized)
    assert cost.layer_sum_ms("w8a8") == cost.layer_sum_ms({"proj": "w8a8", "head": "w8a8"})
    with pytest.raises(ValueError, match=r"gate in 'fp8': .*simulate"):  # the backend's reason
        cost.memory_bytes({"gate": "fp8"})
    with pytest.raises(ValueError, match=r"Layers \['gate'\] are never called"):
        measure_cost(model, x, schemes=["w8a8"], layers=["proj", "gate"])  # chosen: refused
    with pytest.warns(UserWarning, match="gate / w8a8: the layer is never called"):
        prof = mps.profile(model, [x, x], schemes=["w8a8"], progress=False)
    assert prof.table.set_index("layer").loc["gate", "reason"] == NEVER_CALLED
    res = mps.search(model, profile=prof, cost=cost, eval_data=[x], n_trials=4, seed=0)
    assert all(plan.resolve(model)["gate"] == "fp32" for plan in res.plans)
    with torch.inference_mode():
        assert mps.quantize(model, res.best(), backend=cost.backend)(x).shape == (16, 4)


@pytest.mark.parametrize("runner", ["graph", "hooks"])
def test_a_layer_read_besides_its_calls_stays_fp32(runner: str, monkeypatch) -> None:
    """Bug: ``embed`` is called and its weight read by ``F.linear`` too. Quantized, the read
    got the replaced layer's stand-in weight: every output was NaN, on every backend and
    scheme (bf16 included), and the profile and the search took the layer for quantizable."""
    import importlib

    from helpers import TiedThroughFunctional

    from mpsearch.layers._layers import READ_BESIDES_CALLS

    if runner == "hooks":
        monkeypatch.setattr(importlib.import_module("mpsearch.profile._runner"), "CAPTURES", {})
    model = TiedThroughFunctional().eval()
    ids = [
        torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    cost = measure_cost(model, ids[0], schemes=["bf16", "w8a8"], repeats=2, warmup=1)
    assert cost.read_directly == ["embed"]
    for scheme in ("bf16", "w8a8"):
        with pytest.warns(UserWarning, match=r"1 layer\(s\) stay fp32, the model reads.*'embed'"):
            quantized = mps.quantize(model, scheme, backend="cpu", calib=ids)
        assert type(quantized.embed) is nn.Embedding
        assert cost.memory_bytes(scheme) == held_bytes(quantized)
        with torch.inference_mode():
            out, ref = quantized(ids[0]), model(ids[0])
        assert float((out - ref).norm() / ref.norm()) < 0.02  # finite, near fp32 (was NaN)
    prof = mps.profile(model, ids, schemes=["bf16", "w8a8"], progress=False)
    assert prof.info["runner"].startswith(runner)
    assert set(prof.table.set_index("layer").loc[["embed"], "reason"]) == {READ_BESIDES_CALLS}
    res = mps.search(model, profile=prof, cost=cost, eval_data=ids, n_trials=4, seed=0)
    assert all(plan.resolve(model)["embed"] == "fp32" for plan in res.plans)


def test_a_uniform_plan_that_substitutes_a_variant_has_a_cost() -> None:
    """``w4a16``'s groups of 32 cannot take a fan-in of 9 or 24 (ConvNeXt's depthwise convs,
    Swin's patch embedding): the plan gives those layers ``w4a16_pc``, which measure_cost
    did not measure, so the plan had no cost."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 24, 3), nn.ReLU(), nn.Conv2d(24, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 16)
    ).eval()
    cost = measure_cost(net, torch.randn(2, 1, 8, 8), schemes=["w4a16"], repeats=1, warmup=0)
    assert cost.schemes == ["fp32", "w4a16"]
    substituted = mps.PrecisionPlan.uniform("w4a16").substitutions(net)
    assert {n: s.used for n, s in substituted.items()} == {"0": "w4a16_pc", "2": "w4a16_pc"}
    assert cost.supported("0", "w4a16_pc") and not cost.supported("0", "w4a16")
    assert not cost.supported("4", "w4a16_pc")  # the Linear takes w4a16 itself
    quantized = mps.quantize(net, "w4a16", backend=cost.backend)
    assert cost.memory_bytes("w4a16") == held_bytes(quantized)
    assert cost.latency_ms("w4a16") > 0
