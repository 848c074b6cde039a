"""Calibrated rounding: GPTQ, AdaRound, the anchored grid, input statistics, bias correction."""

from __future__ import annotations

import pytest
import torch
from helpers import HFMoE, ReadsWeights, StandardizedConv
from torch import nn

import mpsearch as mps
from mpsearch.layers._experts import expert_rows
from mpsearch.rounding import (
    Grid,
    Rounder,
    RoundingOptions,
    adaround,
    collect_stats,
    gptq,
    output_error,
)
from mpsearch.rounding._stats import patches
from mpsearch.schemes import fake_quantize, get_scheme

INT_SCHEMES = ["w4a16", "w4a16_pc", "w2a16", "w2a16_pc", "w8a8", "w4a8", "w4a8_pc", "w8a16"]


def correlated(seed: int, n: int = 512, d: int = 64, *, mixing: int | None = None) -> torch.Tensor:
    """``n`` correlated inputs; the mixing matrix and offset from ``mixing`` (default: ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.Generator().manual_seed(seed if mixing is None else mixing)
    mix, offset = torch.randn(d, d, generator=m), torch.randn(d, generator=m)
    return torch.randn(n, d, generator=g) @ mix + offset


@pytest.mark.parametrize("scheme", INT_SCHEMES)
def test_gptq_with_identity_hessian_is_round_to_nearest(scheme: str) -> None:
    spec = get_scheme(scheme).weight
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    rtn = Grid(w, spec).rtn()
    for act_order in (True, False):
        assert torch.equal(gptq(w, torch.eye(64), spec, act_order=act_order), rtn)
    # the anchored round to nearest is round to nearest but for a rare extreme weight
    assert (rtn != fake_quantize(w, spec)).sum() <= 1


@pytest.mark.parametrize("scheme", INT_SCHEMES)
def test_gptq_and_adaround_never_lose_to_round_to_nearest(scheme: str) -> None:
    spec = get_scheme(scheme).weight
    for seed in range(4):
        x = correlated(seed)
        h = x.T @ x
        w = torch.randn(16, 64, generator=torch.Generator().manual_seed(100 + seed))
        rtn = output_error(w, Grid(w, spec).rtn(), h)
        assert output_error(w, gptq(w, h, spec), h) <= rtn
        assert output_error(w, adaround(w, h, spec, iters=60), h) <= rtn


def test_calibrated_rounding_clearly_beats_round_to_nearest_at_4_bits() -> None:
    spec = get_scheme("w4a16").weight
    x = correlated(7)
    h = x.T @ x
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    rtn = output_error(w, fake_quantize(w, spec), h)
    assert output_error(w, gptq(w, h, spec), h) < 0.7 * rtn
    assert output_error(w, adaround(w, h, spec), h) < 0.7 * rtn


@pytest.mark.parametrize("scheme", INT_SCHEMES)
def test_rounded_weights_are_fixed_points_of_the_schemes_quantizer(scheme: str) -> None:
    """Rounding moves weights to other grid points, never the grid: the kernels, which derive
    scales from the weight, store exactly the rounded codes."""
    spec = get_scheme(scheme).weight
    for seed in range(3):
        x = correlated(seed)
        h = x.T @ x
        w = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed)) * 0.05
        w[0, :32] = 0.0  # an all-zero group
        for r in (gptq(w, h, spec), adaround(w, h, spec, iters=60)):
            assert torch.equal(fake_quantize(r, spec), r)
            assert torch.equal(Grid(r, spec).scale, Grid(w, spec).scale)


def test_adaround_never_increases_the_objective_it_minimises() -> None:
    """AdaRound returns the best hard rounding it scored, its start (round to nearest) first."""
    spec = get_scheme("w2a16").weight
    x = correlated(11)
    h = x.T @ x
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    trace: list[float] = []
    r = adaround(w, h, spec, iters=200, check_every=20, trace=trace)
    hn = h / h.diagonal().mean()  # the objective as AdaRound scores it
    assert len(trace) == 11
    assert trace[0] == pytest.approx(output_error(w, Grid(w, spec).rtn(), hn), rel=1e-9)
    assert output_error(w, r, hn) == pytest.approx(min(trace), rel=1e-9)
    assert min(trace) < 0.8 * trace[0]


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(12, 5), (3, 7, 12)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 9, 8)),
        (
            nn.Conv2d(3, 4, (3, 2), dilation=(2, 1), padding="same", padding_mode="reflect"),
            (2, 3, 8, 8),
        ),
        (nn.Conv1d(1, 4, 16, stride=4, padding=3), (2, 1, 64)),
        (nn.Conv1d(6, 6, 5, groups=6, padding=2, padding_mode="circular"), (2, 6, 20)),
    ],
)
def test_patches_times_the_weight_is_the_layer(layer: nn.Module, shape: tuple[int, ...]) -> None:
    layer = layer.double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    p = patches(layer, x).double()  # (groups, rows, in per group)
    g = p.shape[0]
    w = layer.weight.reshape(g, layer.weight.shape[0] // g, -1)
    y = torch.einsum("grd,god->gro", p, w)  # per group: rows x out
    ref = layer(x).detach()
    if isinstance(layer, nn.Linear):
        expected = (ref - layer.bias.detach()).reshape(1, -1, ref.shape[-1])
    else:
        b = layer.bias.detach().reshape(1, -1, *([1] * (ref.dim() - 2)))
        flat = (ref - b).flatten(2).transpose(1, 2).reshape(-1, ref.shape[1])  # rows x out
        expected = flat.reshape(-1, g, ref.shape[1] // g).transpose(0, 1)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)  # patches are float32


def test_collect_stats_is_the_second_moment_of_the_inputs() -> None:
    net = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    xs = [torch.randn(4, 5), torch.randn(6, 5)]
    stats = collect_stats(net, xs, ["0", "2"])
    x = torch.cat(xs).double()
    # float32 products summed in float64: within float32 rounding of the exact moments (a
    # float32 reference disagreed in the last bit on an AMX Xeon)
    close = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(stats["0"].hessian[0], x.T @ x, **close)
    h1 = torch.relu(net.double()[0](x)).detach()
    torch.testing.assert_close(stats["2"].hessian[0], h1.T @ h1, **close)
    torch.testing.assert_close(stats["2"].mean[0], h1.mean(0), **close)
    assert stats["0"].count == 10


def test_tiny_inputs_give_their_exact_second_moment_and_the_rounding_of_any_scale() -> None:
    """A random-initialised MobileViT feeds layers inputs of 1e-22 to 1e-34: their float32
    products underflowed (zero or a few bits of a subnormal), the Hessian was not positive
    definite and GPTQ stopped in its Cholesky factorization. Products are now taken on
    inputs scaled to 1, so the moments are exact to float32 rounding at any scale, and GPTQ
    (invariant to the Hessian's scale) rounds tiny inputs as it rounds the same inputs at 1."""
    net = nn.Sequential(nn.Linear(64, 16)).eval()
    x = correlated(3)
    spec = get_scheme("w4a16_pc").weight
    at_one = collect_stats(net, [x], ["0"])["0"].hessian[0]
    for scale in (1e-22, 1e-34):
        stats = collect_stats(net, [x * scale], ["0"])["0"]
        exact = (x * scale).double()
        got, want = stats.hessian[0] / scale**2, exact.T @ exact / scale**2
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        w = net[0].weight.detach()
        assert torch.equal(gptq(w, stats.hessian[0], spec), gptq(w, at_one, spec))


@pytest.mark.parametrize(
    "layer, shape",
    [(nn.Linear(64, 16), (40, 64)), (nn.Conv2d(8, 8, 3, padding=1, groups=2), (6, 8, 7, 7))],
)
def test_bias_correction_zeroes_the_mean_output_shift_on_the_calibration_set(
    layer: nn.Module, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(layer).eval()
    batches = [torch.randn(shape) + 0.5, torch.randn(shape) + 0.5]
    for choice in ("w4a16_pc", "w4a16_pc+gptq", "w2a16_pc+adaround"):
        rounder = Rounder(net, batches, options=RoundingOptions(bias_correction=True))
        corrected = rounder.apply(net, {"0": choice})
        plain = Rounder(net, batches).apply(net, {"0": choice})
        for m in (corrected, plain):  # the weights as the kernels store them (rtn: rounded here)
            with torch.no_grad():
                m[0].weight.copy_(fake_quantize(m[0].weight, get_scheme(choice).weight))
        dims = [0] if isinstance(layer, nn.Linear) else [0, 2, 3]
        with torch.no_grad():
            ref = torch.cat([net(b) for b in batches])
            before = (torch.cat([plain(b) for b in batches]) - ref).mean(dims)
            after = (torch.cat([corrected(b) for b in batches]) - ref).mean(dims)
        assert before.abs().max() > 1e-3
        assert after.abs().max() < 1e-5 * max(1.0, float(ref.abs().max()))


def _mlp() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 10)).eval()
    return net, [correlated(s, mixing=0) for s in range(2)]


def test_a_gptq_plan_round_trips_json_and_runs_on_cpu_as_in_simulation() -> None:
    net, calib = _mlp()
    plan = mps.PrecisionPlan({"0": "w4a16+gptq"}, default="w8a8+adaround")
    again = mps.PrecisionPlan.from_json(plan.to_json())
    assert again == plan and again.resolve_choices(net) == {"0": "w4a16+gptq", "2": "w8a8+adaround"}
    assert again.resolve(net) == {"0": "w4a16", "2": "w8a8"}
    rounder = Rounder(net, calib)
    x = correlated(9, mixing=0)[:64]
    sim = mps.quantize(net, again, backend="simulate", rounder=rounder)
    cpu = mps.quantize(net, again, backend="cpu", rounder=rounder)
    rtn = mps.quantize(net, {"0": "w4a16", "2": "w8a8"}, backend="cpu")
    with torch.no_grad():
        ref, y_sim, y_cpu, y_rtn = net(x), sim(x), cpu(x), rtn(x)
    torch.testing.assert_close(y_cpu, y_sim, rtol=0.02, atol=0.02 * float(ref.abs().max()))
    assert float(((y_cpu - ref) ** 2).mean()) < float(((y_rtn - ref) ** 2).mean())
    # the calibrated layers are the only ones changed, and the model is untouched
    assert set(rounder.report["layer"]) == {"0", "2"}
    assert torch.equal(net[0].weight, _mlp()[0][0].weight)


def test_quantize_with_calib_rounds_like_a_rounder_on_the_same_data() -> None:
    net, calib = _mlp()
    a = mps.quantize(net, "w4a16+gptq", backend="simulate", calib=calib)
    b = mps.quantize(net, "w4a16+gptq", backend="simulate", rounder=Rounder(net, calib))
    x = correlated(3, mixing=0)[:8]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_hf_conv1d_weights_are_rounded_in_their_transposed_layout() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(32, 64)).eval()  # nf=32 outputs, nx=64 inputs
    calib = [correlated(1)]
    rounded = Rounder(net, calib).apply(net, {"0": "w4a16+gptq"})
    linear = nn.Linear(64, 32).eval()
    with torch.no_grad():
        linear.weight.copy_(net[0].weight.t())
        linear.bias.copy_(net[0].bias)
    expected = Rounder(nn.Sequential(linear), calib).weight("0", "w4a16+gptq")[0]
    assert torch.equal(rounded[0].weight.t(), expected)


def test_rounding_errors_are_clear() -> None:
    net, calib = _mlp()
    with pytest.raises(ValueError, match="needs calibration data: pass calib"):
        mps.quantize(net, "w4a16+gptq")
    with pytest.raises(ValueError, match="cannot take rounding 'gptq'.*'bf16'"):
        mps.PrecisionPlan({"0": "bf16+gptq"})
    with pytest.raises(ValueError, match="'gptq'.*Got 'gtpq'"):
        mps.PrecisionPlan({"0": "w4a16+gtpq"})
    with pytest.raises(ValueError, match="damp"):
        RoundingOptions(damp=2.0)
    lstm = nn.Sequential(nn.Linear(8, 8))
    lstm.add_module("rnn", nn.LSTM(8, 8))
    with pytest.raises(ValueError, match="(?s)Calibrated rounding cannot take.*rnn.*not LSTM"):
        Rounder(lstm, [torch.randn(4, 8)]).apply(lstm, {"0": "w8a8", "rnn": "w8a8+gptq"})
    with pytest.raises(
        ValueError, match="'rounder' argument must be a Rounder built on this model"
    ):
        mps.quantize(net, "w4a16+gptq", rounder=Rounder(nn.Sequential(nn.Linear(64, 2)), calib))


def test_rules_for_many_layers_fall_back_to_round_to_nearest_where_rounding_cannot_go() -> None:
    net = nn.Sequential(nn.Embedding(16, 64), nn.Linear(64, 64), nn.Conv2d(1, 8, 3))
    plan = mps.PrecisionPlan(default="w4a16+gptq")
    assert plan.resolve_choices(net) == {"0": "w4a16", "1": "w4a16+gptq", "2": "w4a16_pc+gptq"}
    assert plan.substitutions(net)["0"].requested == "w4a16+gptq"
    assert "not Embedding" in plan.substitutions(net)["0"].reason
    assert plan.substitutions(net)["2"].used == "w4a16_pc+gptq"


def test_rounding_a_tied_layer_leaves_the_module_it_shares_its_weight_with() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64, bias=False)).eval()
    net[1].weight = net[0].weight  # tied, as an LM head and its embedding
    calib = [torch.randint(0, 64, (8, 16))]
    rounded = Rounder(net, calib).apply(net, {"1": "w4a16+gptq"})
    assert torch.equal(rounded[0].weight, net[0].weight)  # the embedding keeps fp32 values
    assert not torch.equal(rounded[1].weight, net[0].weight)
    assert torch.equal(
        fake_quantize(rounded[1].weight, get_scheme("w4a16").weight), rounded[1].weight
    )
    layer = Rounder(net, calib).layer("1", "w4a16+gptq")  # a copy: the model's own is untouched
    assert torch.equal(layer.weight, rounded[1].weight) and net[1].weight is net[0].weight


@pytest.mark.parametrize("scheme", ["w4a16", "w2a16_pc", "w4a8_pc", "w8a8"])
def test_latent_weights_round_to_the_calibrated_rounding_on_the_same_grid(scheme: str) -> None:
    spec = get_scheme(scheme).weight
    x = correlated(2)
    h = x.T @ x
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    grid = Grid(w, spec)
    rounded = gptq(w, h, spec)
    latent = grid.latent(w, grid.codes(rounded))
    assert torch.equal(Grid(latent, spec).scale, grid.scale)
    assert (fake_quantize(latent, spec) != rounded).float().mean() < 0.002
    # nearer to the weight than the rounded weight is: its fractional positions are kept
    assert ((latent - w).abs() <= (rounded - w).abs() + 1e-7).all()
    assert (latent - w).abs().mean() < 0.5 * (rounded - w).abs().mean()


@pytest.mark.parametrize("choice", ["w4a16_pc+gptq", "w8a8+adaround", "w4a8_pc+gptq"])
def test_rounded_convolutions_run_on_the_cpu_kernels_as_simulated(choice: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, groups=4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 10),
    ).eval()
    calib = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    rounder = Rounder(net, calib)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        sim = mps.quantize(net, choice, backend="simulate", rounder=rounder)(x)
        cpu = mps.quantize(net, choice, backend="cpu", rounder=rounder)(x)
    torch.testing.assert_close(cpu, sim, rtol=0.02, atol=0.02 * float(sim.abs().max()))
    assert set(rounder.report["layer"]) == {"0", "2", "5"}


# -- Mixture-of-Experts banks ------------------------------------------------------------------
EXPERTS, HIDDEN, INTER = 4, 32, 64


def _moe(family: str = "mixtral") -> tuple[nn.Module, list[torch.Tensor]]:
    return HFMoE(EXPERTS, HIDDEN, INTER, family).eval(), [
        correlated(s, n=96, d=HIDDEN, mixing=0) for s in range(2)
    ]


@torch.no_grad()
def test_a_banks_statistics_are_each_experts_routed_inputs_to_each_projection() -> None:
    model, calib = _moe()
    stats = collect_stats(model, calib, ["experts"])["experts"]
    bank = model.experts
    up_h = torch.zeros(EXPERTS, HIDDEN, HIDDEN, dtype=torch.float64)
    down_h = torch.zeros(EXPERTS, INTER, INTER, dtype=torch.float64)
    rows = 0
    for x in calib:  # Mixtral's own routing, by hand
        _, index = model.route(x)
        for e in range(EXPERTS):
            xe = x[(index == e).any(-1)]
            gate, up = nn.functional.linear(xe, bank.gate_up_proj[e]).chunk(2, dim=-1)
            he = bank.act_fn(gate) * up
            up_h[e] += (xe.T @ xe).double()
            down_h[e] += (he.T @ he).double()
            rows += len(xe)
    assert set(stats) == {"gate_up_proj", "down_proj"}
    torch.testing.assert_close(stats["gate_up_proj"].hessian, up_h, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats["down_proj"].hessian, down_h, rtol=1e-5, atol=1e-4)
    assert stats["gate_up_proj"].count == rows == 2 * sum(len(x) for x in calib)  # top-2
    assert not stats["down_proj"].hessian[EXPERTS - 1].any()  # the unrouted expert


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@torch.no_grad()
def test_gptq_rounds_each_expert_of_a_bank_and_the_cpu_kernels_run_it_as_rounded(
    family: str,
) -> None:
    model, calib = _moe(family)
    rounder = Rounder(model, calib)
    weights, bias = rounder.weight("experts", "w4a16+gptq")
    assert bias is None and set(weights) == {"gate_up_proj", "down_proj"}
    stats = rounder.stats(["experts"])["experts"]
    spec = get_scheme("w4a16").weight
    for name, rounded in weights.items():
        w = getattr(model.experts, name)
        assert rounded.shape == w.shape
        if family == "gpt_oss":  # stored [experts, in, out]: rounded by output channel
            w, rounded = w.transpose(1, 2), rounded.transpose(1, 2)
        for e in range(EXPERTS):
            h = stats[name].hessian[e].float()
            rtn = Grid(w[e], spec).rtn()
            assert torch.equal(fake_quantize(rounded[e], spec), rounded[e])  # on its grid
            if e == EXPERTS - 1:  # no token: round to nearest
                assert torch.equal(rounded[e], rtn)
            else:
                assert output_error(w[e], rounded[e], h) < output_error(w[e], rtn, h)
    row = rounder.report.set_index("layer").loc["experts"]
    assert row["error"] < row["error_rtn"]
    bank = model.experts
    for name, latent in rounder.latent("experts", "w4a16+gptq").items():  # where recover starts
        w, rows, latent = (
            expert_rows(bank, t) for t in (getattr(bank, name), weights[name], latent)
        )
        assert (fake_quantize(latent, spec) != rows).float().mean() < 0.002
        assert (latent - w).abs().mean() < 0.5 * (rows - w).abs().mean()
    x = correlated(9, n=64, d=HIDDEN, mixing=0)
    plan = {"experts": "w4a16+gptq"}
    cpu = mps.quantize(model, plan, backend="cpu", rounder=rounder)
    sim = mps.quantize(model, plan, backend="simulate", rounder=rounder)
    rtn = mps.quantize(model, {"experts": "w4a16"}, backend="cpu")
    ref = model(x)
    torch.testing.assert_close(cpu(x), sim(x), rtol=0.02, atol=0.02 * float(ref.abs().max()))
    assert float(((cpu(x) - ref) ** 2).mean()) < float(((rtn(x) - ref) ** 2).mean())
    assert torch.equal(model.experts.gate_up_proj, _moe(family)[0].experts.gate_up_proj)


def test_a_bank_outside_the_expert_interface_falls_back_to_round_to_nearest_by_name() -> None:
    class Bank(nn.Module):  # research code: 3-D expert weights, its own forward
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(EXPERTS, 2 * INTER, HIDDEN))
            self.down_proj = nn.Parameter(torch.randn(EXPERTS, HIDDEN, INTER))

    net = nn.Sequential(Bank())
    plan = mps.PrecisionPlan(default="w4a16+gptq")
    assert plan.resolve_choices(net) == {"0": "w4a16"}
    assert "not Bank" in plan.substitutions(net)["0"].reason
    assert "expert interface" in plan.substitutions(net)["0"].reason
    assert mps.PrecisionPlan(default="w4a16+gptq").resolve_choices(_moe()[0])["experts"] == (
        "w4a16+gptq"
    )


def test_a_weight_normed_layer_rounds_as_the_plain_layer_with_its_weight() -> None:
    """wav2vec2's positional conv is weight-normed (a parametrization): setting its rounded
    weight raised "attribute 'weight' already exists". It now rounds as the plain conv that
    holds the weight the parametrization computes, and the user's model keeps its own."""
    torch.manual_seed(0)
    normed = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 32, 3, padding=1)),
        nn.ReLU(),
        nn.Conv1d(32, 4, 1),
    ).eval()
    plain = nn.Sequential(nn.Conv1d(4, 32, 3, padding=1), nn.ReLU(), nn.Conv1d(32, 4, 1)).eval()
    with torch.no_grad():
        plain[0].weight.copy_(normed[0].weight)
        plain[0].bias.copy_(normed[0].bias)
        plain[2].load_state_dict(normed[2].state_dict())
    calib = [torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    outs, rows = [], []
    for model in (normed, plain):
        q = mps.quantize(model, "w4a16_pc+gptq", backend="simulate", calib=calib)
        with torch.inference_mode():
            outs.append(q(calib[0]))
        rows.append(mps.profile(model, calib, schemes=["w4a16_pc+gptq"], progress=False))
    assert torch.equal(outs[0], outs[1])
    assert rows[0].pivot("mse").equals(rows[1].pivot("mse"))
    # the user's layer keeps its parametrization (torch's deepcopy shares its class)
    assert nn.utils.parametrize.is_parametrized(normed[0], "weight")
    torch.testing.assert_close(normed[0].weight, plain[0].weight, rtol=0, atol=0)


def test_a_weight_standardizing_conv_keeps_the_codes_its_rounding_chose() -> None:
    """timm's ``StdConv2d`` (BiT, NFNet) standardizes its weight in forward: the rounded weight
    was standardized again, and the kernels re-rounded it (884 of 1,152 GPTQ codes changed,
    and GPTQ came out worse than round to nearest on a ResNetV2). The rounded layer is now
    the plain conv it computes, holding exactly the rounded weight."""
    torch.manual_seed(0)
    model = nn.Sequential(StandardizedConv(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    model.eval()
    calib = [
        torch.randn(8, 8, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    rounder = Rounder(model, calib)
    rounded, _ = rounder.weight("0", "w4a16_pc+gptq")
    for layer in (
        rounder.apply(model, {"0": "w4a16_pc+gptq"})[0],
        rounder.layer("0", "w4a16_pc+gptq"),
    ):
        assert type(layer) is nn.Conv2d
        assert torch.equal(layer.weight, rounded.reshape(layer.weight.shape))
    assert type(model[0]) is StandardizedConv


def test_a_rounder_alone_keeps_a_layer_the_model_never_calls_in_fp32() -> None:
    """``quantize(..., rounder=...)`` without ``calib``: the rounder's batches show which layers
    the model never calls (Mamba's ``conv1d``, whose weight it reads), as ``calib`` would.
    Before, bias correction asked for that layer's statistics and stopped: "never ran"."""
    model = ReadsWeights().eval()
    calib = [torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rounder = Rounder(model, calib, options=RoundingOptions(bias_correction=True))
    with pytest.warns(UserWarning, match=r"1 layer\(s\) stay fp32.*'gate'"):
        q = mps.quantize(model, "w4a16_pc", backend="simulate", rounder=rounder)
    assert q.mpsearch_assignment["gate"] == "fp32"
    assert set(rounder.report["layer"]) == {"proj", "head"}


def test_gptq_factors_in_float32_and_in_float64_where_float32_finds_no_factor() -> None:
    from mpsearch.rounding._gptq import _inverse_factor

    torch.manual_seed(0)
    a = torch.randn(64, 8, dtype=torch.float64)
    h = a @ a.T + 1e-6 * torch.eye(64, dtype=torch.float64)  # condition number ~1e8
    assert int(torch.linalg.cholesky_ex(h.float())[1]) != 0  # not positive definite in float32
    unit = h / float(h.diagonal().mean())
    exact = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(unit)), upper=True)
    assert torch.equal(_inverse_factor(h), exact)
    well = a @ a.T + torch.eye(64, dtype=torch.float64)
    upper = _inverse_factor(well)
    assert upper.dtype == torch.float32
    identity = upper.T.double() @ upper.double() @ well / float(well.diagonal().mean())
    torch.testing.assert_close(identity, torch.eye(64).double(), atol=1e-5, rtol=0)
    tiny = _inverse_factor(well * 1e-40)  # below float32's range: factored at unit scale
    assert tiny.dtype == torch.float32
    torch.testing.assert_close(tiny, upper)
