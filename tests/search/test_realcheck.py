"""The front is run for real after the search: real quality and measured latency on the cost
model's backend, kept in the result and ranked by ``best``."""

from __future__ import annotations

import math
import statistics
import warnings

import optuna
import pytest
import torch
from torch import nn

import mpsearch as mps
from mpsearch.cost import held_bytes
from mpsearch.plan import PrecisionPlan
from mpsearch.search import Budget, SearchOptions, SearchResult, SearchSpace, search
from mpsearch.search._realcheck import VERIFIED_ATTR, measure_plans, verified_frame


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    ).eval()


def _score(net: nn.Module):
    """1 - relative squared error to the fp32 outputs: every rounding difference shows."""
    torch.manual_seed(1)
    data = [torch.randn(64, 16) * 3 for _ in range(2)]
    with torch.inference_mode():
        reference = [net(x) for x in data]

    def evaluate(model: nn.Module) -> float:
        with torch.inference_mode():
            err = sum(
                float(((model(x) - r) ** 2).sum()) for x, r in zip(data, reference, strict=True)
            )
        return 1.0 - err / sum(float((r**2).sum()) for r in reference)

    return evaluate


@pytest.fixture(scope="module")
def cpu_search():
    net = _net()
    evaluate = _score(net)
    cost = mps.measure_cost(
        net, torch.randn(8, 16), schemes=["w8a8", "w8a16"], backend="cpu", repeats=3
    )
    with warnings.catch_warnings():  # the all-fp32 plan runs slower on cpu than the model itself
        warnings.simplefilter("ignore", UserWarning)
        res = search(
            net,
            profile=mps.profile(net, [torch.randn(32, 16) * 3], schemes=["w8a8", "w8a16"]),
            cost=cost,
            evaluate=evaluate,
            space=SearchSpace(schemes=["fp32", "w8a8", "w8a16"]),
            n_trials=12,
            verify=4,
        )
    return net, evaluate, res, cost


def test_the_front_is_run_on_the_cost_models_backend(cpu_search) -> None:
    net, evaluate, res, cost = cpu_search
    verified = res.verified
    assert verified is not None and verified["plan"].iloc[0] == "fp32"
    assert len(verified) == 1 + min(4, len(res.pareto))
    assert set(verified["backend"]) == {"cpu"} and set(verified["note"]) == {""}
    front = res.pareto
    checked = front[front["real_note"] == ""]
    assert len(checked) == len(verified) - 1
    assert set(front.loc[front["real_note"] != "", "real_note"]) <= {"not checked"}
    for row in checked.itertuples():
        # exactly the user's evaluate on the model quantized for real
        real = evaluate(mps.quantize(net, row.plan, backend=cost.backend))
        assert row.real_quality == real
        assert row.plan.metadata["real_quality"] == real
        fp32_ms = verified["latency_ms"].iloc[0]
        assert row.real_speedup == pytest.approx(fp32_ms / row.real_latency_ms)
    # int8 kernels round and accumulate differently from the simulation
    assert (checked["real_quality"] != checked["quality"]).any()
    assert res.best().metadata["trial"] in set(checked["trial"])


def test_front_plans_carry_the_kernels_the_cost_model_chose(cpu_search) -> None:
    """``quantize(model, plan, backend="cpu")`` builds what the cost model measured: the same
    modules as with ``cost.backend``, holding the bytes the cost model predicts."""
    net, _, res, cost = cpu_search
    assert res.kernels == {"backend": "cpu", "choices": cost.backend.choices}
    for plan in res.plans:
        schemes = set(plan.resolve_choices(net).values())
        carried = plan.metadata.get("kernels", {"choices": {}})["choices"]
        assert carried == {
            k: v for k, v in cost.backend.choices.items() if k.split(" ")[0] in schemes
        }
        by_name = mps.quantize(net, plan, backend="cpu")
        measured = mps.quantize(net, plan, backend=cost.backend)
        assert [type(m) for m in by_name] == [type(m) for m in measured]
        assert held_bytes(by_name) == cost.memory_bytes(plan)


def test_verify_zero_or_none_skips_the_check() -> None:
    from fake_search import FakeCost, FakeProfile, fake_model, known_quality

    for verify in (0, None):
        res = search(
            fake_model(),
            profile=FakeProfile(),
            cost=FakeCost(),
            evaluate=known_quality,
            space=SearchSpace(schemes=["fp32", "bf16", "w8a8", "w4a16"]),
            n_trials=5,
            verify=verify,
        )
        assert res.verified is None and "real_quality" not in res.pareto
    with pytest.raises(ValueError, match="'verify' option must be a non-negative integer"):
        SearchOptions(verify=-1)


def test_a_plan_that_cannot_run_on_the_backend_gets_a_note() -> None:
    net = _net()
    plans = {"w4a4": PrecisionPlan.uniform("w4a4"), "w8a8": PrecisionPlan.uniform("w8a8")}
    df = measure_plans(
        net, plans, backend="cpu", evaluate=_score(net), time_module=lambda m: 1.0, rounds=1
    )
    assert list(df["plan"]) == ["fp32", "w4a4", "w8a8"]
    assert df.loc[1, "note"].startswith("cannot run: ValueError: The plan cannot run on the 'cpu'")
    assert math.isnan(df.loc[1, "quality"]) and math.isnan(df.loc[1, "latency_ms"])
    assert list(df.loc[[0, 2], "note"]) == ["", ""] and df.loc[2, "speedup"] == 1.0


def test_plans_of_the_same_choices_are_measured_once(monkeypatch) -> None:
    from mpsearch.search import _realcheck

    net, quantized = _net(), []
    real_quantize = _realcheck.quantize
    monkeypatch.setattr(
        _realcheck, "quantize", lambda m, p, **kw: quantized.append(p) or real_quantize(m, p, **kw)
    )
    timed: list[nn.Module] = []
    plans = {
        "best": PrecisionPlan({"0": "w8a8", "2": "w8a8"}, default="w8a8"),
        "uniform:bf16": PrecisionPlan.uniform("bf16"),
        "uniform:w8a8": PrecisionPlan.uniform("w8a8"),
        "gptq": PrecisionPlan.uniform("w8a8+gptq"),  # another rounding: another plan
    }
    df = measure_plans(
        net, plans, backend="simulate", evaluate=_score(net),
        time_module=lambda m: timed.append(m) or float(len(timed)), rounds=2,
    )  # fmt: skip
    assert quantized == [plans["best"], plans["uniform:bf16"], plans["gptq"]]
    assert list(df["plan"]) == ["fp32", *plans]
    best, w8a8 = df.set_index("plan").loc[["best", "uniform:w8a8"]].to_dict("records")
    assert best == w8a8 and best["note"] == ""
    assert df.loc[3, "latency_ms"] == statistics.median([2.0, 5.0])  # best's two rounds
    assert len(timed) == 2 * 3  # fp32, best and bf16 in each round
    assert df.loc[4, "note"].startswith("cannot run")  # gptq without calibration data


def test_plans_of_the_same_choices_but_other_kernels_are_measured_apart(monkeypatch) -> None:
    """A searched plan carrying its measured kernels is not the uniform plan of its choices:
    ``quantize`` builds other kernels for it."""
    from mpsearch.search import _realcheck

    net, quantized = _net(), []
    real_quantize = _realcheck.quantize
    monkeypatch.setattr(
        _realcheck, "quantize", lambda m, p, **kw: quantized.append(p) or real_quantize(m, p, **kw)
    )
    kernels = {"backend": "cpu", "choices": {"w8a8 Linear(...)": "fbgemm"}}
    plans = {
        "uniform:w8a8": PrecisionPlan.uniform("w8a8"),
        "best": PrecisionPlan({}, default="w8a8", metadata={"kernels": kernels}),
    }
    measure_plans(
        net, plans, backend="simulate", evaluate=_score(net), time_module=lambda m: 1.0, rounds=1
    )
    assert quantized == list(plans.values())


# trial: (plan, quality on simulate, memory MB, predicted ms); fp32 10 MB, 10 ms
FRONT = {
    0: ("fp32", 1.00, 10.0, 10.0),
    1: ("bf16", 0.99, 5.0, 6.0),
    2: ("w8a8", 0.99, 2.5, 5.0),
    3: ("w4a16", 0.98, 1.5, 4.0),
    4: ("w8a16", 0.995, 2.5, 2.8),  # cannot run for real
    5: ("fp16", 0.96, 2.0, 2.5),  # not checked
}


def _result(real: dict[int, tuple[float | None, float | None, str]] | None) -> SearchResult:
    study = optuna.create_study(direction="maximize")
    for _, (name, quality, memory_mb, latency_ms) in FRONT.items():
        attrs = {"plan": {"0": name}, "memory_mb": memory_mb, "latency_ms": latency_ms}
        trial = optuna.trial.create_trial(
            value=quality, user_attrs={**attrs, "quality_source": "true"}
        )
        study.add_trial(trial)
    if real is not None:  # (quality, latency ms, note); fp32 timed at 20 ms next to them
        rows = [{"plan": "fp32", "quality": 1.0, "latency_ms": 20.0, "speedup": 1.0, "note": ""}]
        for trial, (quality, latency, note) in real.items():
            speedup = None if latency is None else 20.0 / latency
            rows.append(
                {"plan": str(trial), "quality": quality, "latency_ms": latency, "speedup": speedup}
                | {"note": note}
            )
        study.set_user_attr(VERIFIED_ATTR, {"backend": "cpu", "rows": rows})
    return SearchResult(
        study=study,
        space=None,
        table=None,
        objectives=("quality", "memory", "latency"),
        limits=(None, None),
        fp32_memory_mb=10.0,
        fp32_latency_ms=10.0,
    )


def _scheme(plan: PrecisionPlan) -> str:
    return plan.resolve(["0"])["0"]


REAL = {
    1: (0.99, 18.0, ""),  # bf16: as simulated, but measured nearly as slow as fp32
    2: (0.969, 8.0, ""),  # w8a8: simulate said 0.99
    3: (0.975, 9.0, ""),
    4: (None, None, "cannot run: no kernel"),
}


def test_best_ranks_by_the_real_figures_where_they_exist() -> None:
    assert _scheme(_result(None).best(Budget(memory_mb=3.0))) == "w8a16"  # simulate: 0.995
    res = _result(REAL)
    # real figures decide: w8a16 cannot run, w8a8 is 0.969 for real, w4a16 0.975
    assert _scheme(res.best(Budget(memory_mb=3.0))) == "w4a16"
    # a latency fraction is held against the measured speed-up: bf16 (1.11x) is over 0.8
    assert _scheme(res.best(Budget(latency_fraction=0.8))) == "w4a16"
    assert _scheme(res.best(Budget(latency_fraction=0.95))) == "bf16"
    assert _scheme(res.best()) == "bf16"  # the best real quality; fp32 was not checked
    # no checked plan meets it: the unchecked ones by their search figures, never w8a16
    assert _scheme(res.best(Budget(memory_mb=2.6, latency_fraction=0.3))) == "fp16"
    with pytest.raises(ValueError, match="No evaluated plan meets the budget"):
        res.best(Budget(memory_mb=2.6, latency_fraction=0.2))
    plan = res.best(Budget(memory_mb=3.0))
    assert plan.metadata == {
        "trial": 3,
        "quality": 0.98,
        "memory_mb": 1.5,
        "latency_ms": 4.0,
        "real_quality": 0.975,
        "real_latency_ms": 9.0,
        "real_speedup": 20.0 / 9.0,
    }


def test_pareto_carries_the_real_columns_and_warnings_the_measured_speed() -> None:
    res = _result({3: (0.975, 24.0, "")})
    front = res.pareto
    assert list(front.columns) == [
        "trial",
        "quality",
        "memory_mb",
        "latency_ms",
        "origin",
        "real_quality",
        "real_latency_ms",
        "real_speedup",
        "real_note",
        "plan",
    ]
    assert list(front["trial"]) == [3, 5, 4, 0]
    assert list(front["real_note"]) == ["", "not checked", "not checked", "not checked"]
    assert front.loc[0, "real_speedup"] == 20.0 / 24.0 and math.isnan(front.loc[1, "real_quality"])
    assert verified_frame(res.study)["trial"].tolist()[1:] == [3]
    note, cost_note = res.warnings  # 24 ms measured where 4 ms were predicted
    assert cost_note.startswith("The cost model's latency predictions were off by 83%")
    assert note.startswith(
        "The best plan (no budget was given) (trial 3) is measured 1.20x slower than fp32 "
        "(24 ms vs 20 ms) on the 'cpu' backend"
    )


def test_latency_check_compares_the_cost_model_with_the_real_runs() -> None:
    res = _result(REAL)
    check = res.latency_check.set_index("trial")
    assert set(check.index) == {3}  # the front's plans that ran
    assert check.loc[3, "predicted_ms"] == 4.0 and check.loc[3, "measured_ms"] == 9.0
    assert check.loc[3, "rel_error"] == pytest.approx(5.0 / 9.0)
    assert any(
        w.startswith("The cost model's latency predictions were off by") for w in res.warnings
    )
    assert _result(None).latency_check is None
