from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

from mpsearch.runtime import Controller
from mpsearch.viz import plot_controller_tradeoff, plot_variant_share
from mpsearch.viz.data import (
    cascade_arrays,
    controller_tradeoff_data,
    difficulty_examples,
    variant_share_data,
)

matplotlib.use("Agg")

# 3 variants x 5 inputs; the last variant is the reference
ANSWERS = np.array([[1, 1, 0, 2, 2], [1, 0, 0, 2, 1], [1, 0, 0, 1, 1]])
SCORES = np.array([[0.1, 0.6, 0.2, 0.9, 0.4], [0.2, 0.3, 0.1, 0.8, 0.7]])
COSTS = [1.0, 2.0, 4.0]
LABELS = np.array([1, 0, 0, 2, 1])


def test_controller_tradeoff_data_is_exact() -> None:
    df = controller_tradeoff_data(
        ANSWERS,
        SCORES,
        COSTS,
        thresholds={"all": -math.inf, "t0.5": 0.5, "none": math.inf},
        variants=["a", "b", "c"],
        labels=LABELS,
    )
    assert df["setting"].tolist() == ["a", "b", "c", "all", "t0.5", "none"]
    assert df["method"].tolist() == ["static"] * 3 + ["controller"] * 3
    assert df["agreement"].tolist() == [0.4, 0.8, 1.0, 1.0, 0.8, 0.4]
    assert df["accuracy"].tolist() == [0.6, 1.0, 0.8, 0.8, 0.6, 0.6]
    # t0.5: inputs 0, 2, 4 served by a (cost 1); input 1 by b (0.3 <= 0.5: 1 + 2);
    # input 3 escalated twice (1 + 2 + 4)
    assert df.set_index("setting").loc["t0.5", ["a", "b", "c"]].tolist() == [0.6, 0.2, 0.2]
    assert df["cost_ms"].tolist() == pytest.approx([1.0, 2.0, 4.0, 7.0, (3 * 1 + 3 + 7) / 5, 1.0])
    assert df[df["method"] == "static"]["threshold"].isna().all()
    no_labels = controller_tradeoff_data(ANSWERS, SCORES, COSTS, thresholds={"t": 0.5})
    assert no_labels["accuracy"].isna().all()
    assert list(no_labels.columns[-3:]) == ["variant 0", "variant 1", "variant 2"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": SCORES[:1]}, "'scores' argument"),
        ({"costs": [1.0, 2.0]}, "'costs' argument"),
        ({"variants": ["a", "a", "b"]}, "'variants' argument"),
        ({"labels": LABELS[:3]}, "'labels' argument"),
        ({"thresholds": {}}, "'thresholds' argument"),
        ({"thresholds": {"x": float("nan")}}, "thresholds\\['x'\\]"),
    ],
)
def test_controller_tradeoff_data_refuses_bad_input(kwargs, match) -> None:
    args = {"answers": ANSWERS, "scores": SCORES, "costs": COSTS, "thresholds": {"t": 0.5}}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        controller_tradeoff_data(args.pop("answers"), args.pop("scores"), args.pop("costs"), **args)


def test_variant_share_and_difficulty_examples() -> None:
    df = controller_tradeoff_data(
        ANSWERS, SCORES, COSTS, thresholds={"t0.5": 0.5, "none": math.inf}, variants="abc"
    )
    long = variant_share_data(df, ["a", "b", "c"])
    assert long.values.tolist() == [
        ["t0.5", "a", 0.6],
        ["t0.5", "b", 0.2],
        ["t0.5", "c", 0.2],
        ["none", "a", 1.0],
        ["none", "b", 0.0],
        ["none", "c", 0.0],
    ]
    with pytest.raises(ValueError, match="missing \\['d'\\]"):
        variant_share_data(df, ["a", "d"])
    ex = difficulty_examples(SCORES, n=2)
    assert ex.values.tolist() == [
        ["easy", 0, 0.1],
        ["easy", 2, 0.2],
        ["hard", 3, 0.9],
        ["hard", 1, 0.6],
    ]
    with pytest.raises(ValueError, match="'n' argument"):
        difficulty_examples(SCORES, n=0)


def test_tradeoff_of_a_real_controller_matches_what_it_serves() -> None:
    # weight-only variants: an input's output does not depend on the rest of its batch (with
    # dynamic per-tensor activation scales, as in w8a8, it does, slightly)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(64, 32, generator=gen) for _ in range(4)]
    test = torch.randn(200, 32, generator=gen)
    ctrl = Controller(
        net, ["w4a16", "w8a16", "fp32"], backend="simulate", example_input=calib[0], order="given"
    )
    ctrl.calibrate(calib, max_disagreement=0.05, delta=0.2)
    answers, scores, costs = cascade_arrays(ctrl, [test])
    assert answers.shape == (3, 200) and scores.shape == (2, 200) and costs.shape == (3,)
    names = [v.name for v in ctrl.variants]
    df = controller_tradeoff_data(
        answers, scores, costs, thresholds={"calibrated": ctrl.threshold}, variants=names
    )
    with torch.inference_mode():
        served = ctrl(test).argmax(-1).numpy()
        reference = net(test).argmax(-1).numpy()
    row = df.set_index("setting").loc["calibrated"]
    assert row["agreement"] == pytest.approx(float((served == reference).mean()))
    assert 0 < row[names[0]] < 1  # a real mix: some inputs escalated, some not
    audit = ctrl.audit.tail(200)
    for k, name in enumerate(names):
        assert row[name] == pytest.approx(float((audit["variant"] == k).mean()))
    ax = plot_controller_tradeoff(df)
    assert len(ax.lines[0].get_xdata()) == 1 and len(ax.collections) == 1
    ax = plot_variant_share(df, names)
    assert len(ax.patches) == len(names)
    with pytest.raises(ValueError, match="'y' argument"):
        plot_controller_tradeoff(df, y="latency")
