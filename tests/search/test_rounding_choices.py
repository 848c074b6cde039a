"""Choices with a calibrated rounding ('w4a16+gptq') through profile, cost model and search."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import SharedEmbedding
from torch import nn

import mpsearch as mps
from mpsearch.search import SpaceError
from mpsearch.search._quality import Fidelity
from mpsearch.search._space import _with_roundings

SCHEMES = ["w8a8", "w4a16", "w4a16+gptq", "w2a16", "w2a16+adaround"]


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 10)).eval()
    mix = torch.randn(64, 64)
    calib = [torch.randn(128, 64) @ mix for _ in range(2)]
    held_out = [torch.randn(128, 64) @ mix]
    return net, calib, held_out


def test_profile_rows_per_rounding_and_the_profiles_rounder(setup) -> None:
    net, calib, _ = setup
    prof = mps.profile(net, calib, schemes=SCHEMES, progress=False)
    assert prof.schemes == SCHEMES
    for layer in ("0", "2"):  # calibrated rounding lowers the layer's own and the final error
        for metric in ("mse", "e2e"):
            assert prof.error(layer, "w4a16+gptq", metric) < prof.error(layer, "w4a16", metric)
            assert prof.error(layer, "w2a16+adaround", metric) < prof.error(layer, "w2a16", metric)
    rows = prof.table.set_index(["layer", "scheme"])
    assert rows.loc[("0", "w4a16+gptq"), "weight_bytes"] == rows.loc[("0", "w4a16"), "weight_bytes"]
    # the rounder quantizes a plan of those choices as the profile measured them
    plan = mps.PrecisionPlan({"0": "w4a16+gptq"}, default="w2a16+adaround")
    qnet = mps.quantize(net, plan, backend="simulate", rounder=prof.rounder)
    with torch.no_grad():
        swapped = mps.quantize(net, plan, backend="simulate", calib=calib)(calib[0])
        assert torch.equal(qnet(calib[0]), swapped)


def test_rounding_rows_are_skipped_where_rounding_cannot_go() -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(8, 16, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = mps.profile(
            Tagger().eval(), [torch.randn(4, 5, 8)], schemes=["w8a8", "w8a8+gptq"], progress=False
        )
    rows = prof.table.set_index(["layer", "scheme"])
    assert rows.loc[("rnn", "w8a8+gptq"), "status"] == "skipped"
    assert "not LSTM" in rows.loc[("rnn", "w8a8+gptq"), "reason"]
    assert rows.loc[("head", "w8a8+gptq"), "status"] == "ok"


def test_cost_model_costs_a_choice_as_its_scheme(setup) -> None:
    net, calib, _ = setup
    cost = mps.measure_cost(net, calib[0], schemes=SCHEMES, backend="simulate")
    assert set(cost.schemes) == {"fp32", "w8a8", "w4a16", "w2a16"}
    assert cost.supported("0", "w4a16+gptq") and cost.supported("0", "w4a16")
    plan = mps.PrecisionPlan({"0": "w4a16+gptq"}, default="w2a16+adaround")
    rtn = mps.PrecisionPlan({"0": "w4a16"}, default="w2a16")
    assert cost.memory_bytes(plan) == cost.memory_bytes(rtn)
    assert cost.latency_ms(plan) == cost.latency_ms(rtn)


def test_the_search_offers_profiled_roundings_and_evaluates_them_rounded(setup) -> None:
    net, calib, held_out = setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = mps.profile(net, calib, schemes=SCHEMES, progress=False)
        cost = mps.measure_cost(net, calib[0], schemes=SCHEMES, backend="simulate")
        space = {"schemes": ["fp32", "w8a8", "w4a16", "w2a16"]}
        res = mps.search(
            net,
            profile=prof,
            cost=cost,
            eval_data=held_out,
            n_trials=12,
            seed=0,
            space=space,
            verify=0,
        )
    choices = {c for p in res.plans for c in p.resolve_choices(net).values()}
    assert choices & {"w4a16+gptq", "w2a16+adaround"}
    # a front plan's quality is the quality of the plan quantized with the profile's rounding
    fidelity = Fidelity(net, held_out)
    row = res.pareto.iloc[0]
    qnet = mps.quantize(net, row.plan, backend="simulate", rounder=prof.rounder)
    assert fidelity(qnet) == pytest.approx(row.quality)


def test_space_lists_roundings_after_their_scheme() -> None:
    profiled = ["bf16", "w4a16", "w4a16+gptq", "w4a16+adaround", "w2a16+gptq"]
    assert _with_roundings(["fp32", "w4a16", "bf16"], profiled) == [
        "fp32",
        "w4a16",
        "w4a16+gptq",
        "w4a16+adaround",
        "bf16",
    ]
    space = mps.SearchSpace(schemes=["fp32", "w4a16+gptq"])  # a space may name choices too
    assert space.schemes == ["fp32", "w4a16+gptq"]
    with pytest.raises(SpaceError, match="unknown scheme 'bf16\\+gptq'"):
        mps.SearchSpace(schemes=["bf16+gptq"])


@pytest.mark.parametrize("bias_correction", [False, True])
def test_a_never_called_follower_is_evaluated_beside_rounded_layers(bias_correction: bool) -> None:
    import optuna

    torch.manual_seed(0)
    net = SharedEmbedding().eval()
    calib = [torch.randint(0, 64, (8, 12)) for _ in range(2)]
    options = mps.ProfileOptions(rounding=mps.RoundingOptions(bias_correction=bias_correction))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = mps.profile(
            net, calib, schemes=["w8a16", "w8a16+gptq"], progress=False, options=options
        )
        cost = mps.measure_cost(net, calib[0], schemes=["w8a16"], backend="simulate")
        res = mps.search(
            net, profile=prof, cost=cost, eval_data=calib, n_trials=8, seed=0, verify=0
        )
    assert "shared" not in prof.rounder.layers and res.space.followers == {"shared": "enc"}
    states = {t.state for t in res.study.trials}
    assert states == {optuna.trial.TrialState.COMPLETE}  # failed before: KeyError 'shared'
    plans = [p.resolve_choices(net) for p in res.plans]
    assert any(p["enc"] == p["shared"] == "w8a16" for p in plans)
    # the front plans run on real kernels with the profile's rounder (failed before: "must be
    # a Rounder built on this model"); the never-called layer is rounded to nearest
    plan = next(p for p in res.plans if p.resolve_choices(net)["enc"] == "w8a16")
    ids = calib[0]
    with torch.no_grad():
        real = mps.quantize(net, plan, backend="cpu", rounder=prof.rounder)(ids)
        simulated = mps.quantize(net, plan, backend="simulate", rounder=prof.rounder)(ids)
    assert float((real - simulated).norm() / simulated.norm()) < 0.01  # bf16 activations
    with pytest.raises(ValueError, match="The rounder has no layer 'shared'"):
        mps.quantize(net, {"shared": "w8a16+gptq"}, rounder=prof.rounder)
