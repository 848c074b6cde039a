from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mpsearch.search import Budget, hypervolume
from mpsearch.search._search import warm_start_params
from mpsearch.viz._compare import baseline_params, front_2d
from mpsearch.viz.data import (
    evaluations_to_reach,
    hypervolume_reference,
    method_budget_data,
    method_fronts_data,
    method_hypervolume_data,
)

# trial, quality, memory_mb, latency_ms, origin, quality_source, state, feasible
ROWS = [
    (0, 0.99, 4.0, 4.0, "uniform:fp32", "true", "COMPLETE", True),
    (1, 0.97, 2.0, 2.0, "uniform:bf16", "true", "COMPLETE", True),
    (2, 0.90, 1.0, 3.0, "uniform:w8a8", "true", "COMPLETE", True),
    (3, 0.98, 2.5, 1.5, "greedy:3", "true", "COMPLETE", True),
    (4, 0.95, 1.5, 2.5, "ilp:1.5MB", "true", "COMPLETE", True),
    (5, 0.985, 1.2, 1.2, "sampler", "true", "COMPLETE", True),
    (6, 0.999, 0.5, 0.5, "sampler", "proxy", "COMPLETE", True),  # not truly evaluated
    (7, 0.999, 0.5, 0.5, "sampler", "true", "COMPLETE", False),  # infeasible
    (8, math.nan, 0.4, 0.4, "sampler", "", "FAIL", True),
    (9, 0.985, 1.2, 1.2, "sampler", "memo", "COMPLETE", True),  # memoised duplicate of 5
]


def fake_result() -> SimpleNamespace:
    cols = ["trial", "quality", "memory_mb", "latency_ms", "origin", "quality_source", "state"]
    df = pd.DataFrame([r[:7] for r in ROWS], columns=cols)
    df["feasible"] = [r[7] for r in ROWS]
    return SimpleNamespace(
        trials=df,
        fp32_memory_mb=4.0,
        fp32_latency_ms=4.0,
        reference_point=lambda: (0.90, 4.0, 4.0),
    )


def test_front_2d_keeps_exactly_the_non_dominated_points() -> None:
    pts = pd.DataFrame(
        {"memory_mb": [3.0, 1.0, 2.0, 2.0, 1.0, 4.0], "quality": [0.9, 0.5, 0.9, 0.7, 0.5, 0.95]}
    )
    out = front_2d(pts, "memory_mb")
    assert out.values.tolist() == [[1.0, 0.5], [2.0, 0.9], [4.0, 0.95]]


def test_method_fronts_data_is_exact() -> None:
    df = method_fronts_data(fake_result())
    got = {m: part["trial"].tolist() for m, part in df.groupby("method", sort=False)}
    # mpsearch: every feasible truly evaluated plan (3 is dominated by 5; 9 duplicates 5)
    assert got == {"mpsearch": [2, 5, 0], "uniform": [2, 1, 0], "greedy": [3], "ilp": [4]}
    lat = method_fronts_data(fake_result(), x="latency_ms")
    assert lat[lat["method"] == "mpsearch"]["trial"].tolist() == [5, 0]
    with pytest.raises(ValueError, match="'x' argument must be one of"):
        method_fronts_data(fake_result(), x="quality")


def test_method_hypervolume_data_matches_direct_hypervolumes() -> None:
    df = method_hypervolume_data(fake_result()).set_index("method")
    # one point per plan: trial 9 re-runs trial 5's plan
    assert df["points"].to_dict() == {"mpsearch": 6, "uniform": 3, "greedy": 1, "ilp": 1}
    ref = (0.90, 4.0, 4.0)
    # greedy alone: one box (0.98 - 0.90) x (4 - 2.5) x (4 - 1.5)
    assert df.loc["greedy", "hypervolume"] == pytest.approx(0.08 * 1.5 * 2.5)
    uniform = np.array([[0.99, 4.0, 4.0], [0.97, 2.0, 2.0], [0.90, 1.0, 3.0]])
    expected = hypervolume(uniform, ref, [True, False, False])
    assert expected == pytest.approx(0.07 * 2.0 * 2.0)  # the only point inside the reference
    assert df.loc["uniform", "hypervolume"] == pytest.approx(expected)
    assert df.loc["mpsearch", "relative"] == 1.0
    assert df.loc["uniform", "relative"] == pytest.approx(
        expected / df.loc["mpsearch", "hypervolume"]
    )
    with pytest.raises(ValueError, match="'reference' argument"):
        method_hypervolume_data(fake_result(), reference=(1.0, 2.0))


def test_method_budget_data_picks_the_best_plan_per_method() -> None:
    budgets = {"mem 50%": Budget(memory_fraction=0.5), "lat 1.3": {"latency_ms": 1.3}}
    df = method_budget_data(fake_result(), budgets)
    trials = {(r.budget, r.method): r.trial for r in df.itertuples()}
    # 50 % of 4 MB = 2 MB: mpsearch best is trial 5 (0.985 at 1.2 MB), uniform's is bf16 (trial 1)
    assert trials[("mem 50%", "mpsearch")] == 5
    assert trials[("mem 50%", "uniform")] == 1
    assert trials[("mem 50%", "ilp")] == 4
    assert math.isnan(trials[("mem 50%", "greedy")])  # its only plan needs 2.5 MB
    assert trials[("lat 1.3", "mpsearch")] == 5
    assert df[df["budget"] == "lat 1.3"]["quality"].isna().sum() == 3
    with pytest.raises(ValueError, match="'budgets' argument"):
        method_budget_data(fake_result(), {})


def test_evaluations_to_reach() -> None:
    h = pd.DataFrame({"true_evaluations": [1, 2, 3, 4], "hypervolume": [0.0, 0.5, 0.9, 1.0]})
    assert evaluations_to_reach(h, 0.99) == 4
    assert evaluations_to_reach(h, 0.9) == 3
    assert evaluations_to_reach(h, 0.5) == 2
    assert evaluations_to_reach(h.iloc[:0]) is None
    assert evaluations_to_reach(h.iloc[:1]) is None  # final volume 0
    with pytest.raises(ValueError, match="'fraction' argument"):
        evaluations_to_reach(h, 1.5)


@pytest.mark.parametrize("study", ["stored_front", "stored_budget"])
def test_on_a_real_study_mpsearch_front_contains_the_search_front(study, request) -> None:
    res = request.getfixturevalue(study)[1]
    # the baselines' proposals are exactly the warm starts, before de-duplication across methods
    warm = warm_start_params(res.table, res.limits)
    mine = baseline_params(res.table, res.limits)

    def key(p):
        return tuple(p[k] for k in res.table.error)

    assert {key(p) for p in warm.values()} == {key(p) for ps in mine.values() for p in ps}
    for origin, p in warm.items():
        assert key(p) in {key(q) for q in mine[origin.split(":")[0]]}
    # with the table, a baseline counts every plan it proposed, even one another method named first
    df = res.trials[
        (res.trials["state"] == "COMPLETE") & res.trials["quality_source"].isin(["true", "memo"])
    ]
    df = df[df["feasible"]]
    df = df[~df["assignment"].map(lambda a: tuple(sorted(a.items()))).duplicated()]
    points = method_hypervolume_data(res).set_index("method")["points"]
    for method in ("uniform", "greedy", "ilp"):
        by_origin = int(df["origin"].str.startswith(method + ":").sum())
        proposed = {key(p) for p in mine[method]}
        in_table = sum(key(res.space.params_of(a)) in proposed for a in df["assignment"])
        assert points[method] == in_table >= by_origin
    fronts = method_fronts_data(res)
    assert {"mpsearch", "uniform", "greedy", "ilp"} == set(fronts["method"])
    # every 2-D (memory, quality) front point is on the 3-D front too
    assert set(fronts[fronts["method"] == "mpsearch"]["trial"]) <= set(res.pareto["trial"])
    hv = method_hypervolume_data(res).set_index("method")
    assert hv.loc["mpsearch", "hypervolume"] == pytest.approx(res.hypervolume())
    assert hv["hypervolume"].max() == hv.loc["mpsearch", "hypervolume"]


def test_plot_method_fronts_draws_one_series_per_method() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from mpsearch.viz import plot_method_fronts

    ax = plot_method_fronts(fake_result(), x="latency_ms")
    assert len(ax.collections) == 4 and len(ax.lines) == 4
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "mpsearch",
        "uniform",
        "greedy",
        "ilp",
    ]


def test_hypervolume_reference() -> None:
    res = fake_result()
    # feasible, truly evaluated plans: lowest quality 0.90, highest 0.99
    assert hypervolume_reference(res) == pytest.approx((0.90 - 0.01 * 0.99, 4.0, 4.0))
    assert hypervolume_reference(res, margin=0.0) == pytest.approx((0.90, 4.0, 4.0))
    res.fp32_latency_ms = 2.0  # plans slower than fp32 exist (trials 0, 2, 4)
    assert hypervolume_reference(res, margin=0.0)[2] == 2.0
    assert hypervolume_reference(res, margin=0.0, cover_all=True)[2] == 4.0
    with pytest.raises(ValueError, match="'margin' argument"):
        hypervolume_reference(res, margin=1.5)
