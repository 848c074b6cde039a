"""Mixture-of-Experts banks: recognised by their 3-D expert weights, quantized per expert's
output channel, weight-only; simulate and cpu run the bank's own forward on the same weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mpsearch.backends import get_backend, quantize, storage_bytes
from mpsearch.backends._cpu import EXPERT_SCHEMES
from mpsearch.backends._experts import QuantizedExperts, SimulatedExperts
from mpsearch.backends._kernels import RealLayer, int8_kernel_scheme
from mpsearch.cost import held_bytes, measure_cost
from mpsearch.layers import coverage, layer_weights, quantizable_layers
from mpsearch.layers._expert_linears import ExpertLinears, follows_expert_interface
from mpsearch.layers._experts import is_expert_bank
from mpsearch.plan import PrecisionPlan
from mpsearch.profile import profile
from mpsearch.schemes import get_scheme

E, H, M = 4, 32, 64  # experts, hidden, intermediate (MLP)


class Experts(nn.Module):
    """A research-code bank: ``[experts, out, in]`` weights, a token loop over its top-k."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * M, H, generator=g) / H**0.5)
        self.down_proj = nn.Parameter(torch.randn(E, H, M, generator=g) / M**0.5)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(E):
            token, slot = torch.where(index == e)
            gate, up = (x[token] @ self.gate_up_proj[e].T).chunk(2, dim=-1)
            y = (nn.functional.silu(gate) * up) @ self.down_proj[e].T
            out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
        return out


class TransposedExperts(nn.Module):
    """A bank stored ``[experts, in, out]`` (``is_transposed``), with per-expert biases."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.up_proj = nn.Parameter(torch.randn(E, H, M, generator=g) / H**0.5)
        self.up_proj_bias = nn.Parameter(torch.randn(E, M, generator=g))
        self.down_proj = nn.Parameter(torch.randn(E, M, H, generator=g) / M**0.5)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(E):
            token, slot = torch.where(index == e)
            y = torch.relu(x[token] @ self.up_proj[e] + self.up_proj_bias[e]) @ self.down_proj[e]
            out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
        return out


class MoE(nn.Module):
    """Router + bank + head: the bank called with the routing, as a sparse layer calls it."""

    def __init__(self, bank: nn.Module) -> None:
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = bank
        self.head = nn.Linear(H, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = torch.softmax(self.router(x), -1).topk(2, dim=-1)
        return self.head(x + self.experts(x, index, weights))


def _routing(n: int = 48) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, H, generator=g)
    weights, index = torch.rand(n, E, generator=g).softmax(-1).topk(2, dim=-1)
    return x, index, weights


def _hand_int8(rows: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row (w8a8's weight spec)."""
    scale = rows.abs().amax(dim=1, keepdim=True) / 127
    return torch.clamp(torch.round(rows / scale), -127, 127) * scale


def test_banks_are_recognised_by_their_3d_expert_weights() -> None:
    assert is_expert_bank(Experts()) and is_expert_bank(TransposedExperts())
    assert not is_expert_bank(nn.Linear(4, 4))
    odd = nn.Module()
    odd.gate_up_proj = nn.Parameter(torch.zeros(2, 4, 4))
    odd.scale = nn.Parameter(torch.ones(4))  # a 1-D parameter: not a bank's bias
    assert not is_expert_bank(odd)
    model = MoE(Experts())
    assert list(quantizable_layers(model)) == ["router", "experts", "head"]
    assert coverage(model).share == 1.0
    rows = layer_weights(TransposedExperts())  # one row per expert's output channel
    assert {n: tuple(w.shape) for n, w in rows.items()} == {
        "up_proj": (E * M, H),
        "down_proj": (E * H, M),
    }
    assert torch.equal(rows["up_proj"][M + 3], TransposedExperts().up_proj[1, :, 3])


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
@pytest.mark.parametrize("bank_type", [Experts, TransposedExperts])
@torch.no_grad()
def test_w8a8_is_int8_weight_only_per_expert_channel_equal_to_the_hand_computation(
    backend: str, bank_type: type[nn.Module]
) -> None:
    bank = bank_type().eval()
    hand = bank_type().eval()
    for name, w in layer_weights(bank).items():
        param = getattr(hand, name)
        rows = _hand_int8(w)
        if getattr(bank, "is_transposed", False):
            param.copy_(rows.reshape(E, param.shape[2], param.shape[1]).transpose(1, 2))
        else:
            param.copy_(rows.reshape(param.shape))
    q = get_backend(backend).quantize_layer(bank, get_scheme("w8a8"))
    x, index, weights = _routing()
    torch.testing.assert_close(q(x, index, weights), hand(x, index, weights), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", EXPERT_SCHEMES)
@torch.no_grad()
def test_cpu_runs_the_simulated_weights_bit_for_bit_with_their_bytes(scheme: str) -> None:
    bank = TransposedExperts().eval()
    s = get_scheme(scheme)
    sim = get_backend("simulate").quantize_layer(bank, s)
    real = get_backend("cpu").quantize_layer(bank, s)
    assert isinstance(sim, SimulatedExperts) and isinstance(real, QuantizedExperts)
    x, index, weights = _routing()
    assert torch.equal(sim(x, index, weights), real(x, index, weights))
    assert sim(x, index, weights).dtype == torch.float32
    bias = bank.up_proj_bias.numel() * 4  # its own copy, fp32
    assert (
        storage_bytes(real) == sum(map(_stored_bytes, layer_weights(bank).values(), [s] * 2)) + bias
    )


def _stored_bytes(rows: torch.Tensor, scheme) -> int:
    """Bytes of weight rows ``[n, d]`` stored in ``scheme``: bf16 / fp16 values, or codes packed
    to bytes per row, a scale per row or group (fp32 or bf16) and a byte per zero point."""
    n, d = rows.shape
    spec = scheme.weight
    if spec.fmt.kind != "int":
        return n * d * 2
    groups = n * (d // spec.group_size if spec.granularity == "group" else 1)
    scale = 2 if spec.scale_dtype == "bf16" else 4
    return n * -(-d * spec.fmt.bits // 8) + groups * scale + (0 if spec.symmetric else groups)


def test_a_model_with_a_bank_profiles_on_the_graph_as_on_hooks_and_costs_its_exact_bytes(
    monkeypatch,
) -> None:
    import importlib

    runner_module = importlib.import_module("mpsearch.profile._runner")
    model = MoE(Experts()).eval()
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(16, H, generator=g) for _ in range(2)]
    kwargs = {"schemes": ["bf16", "w8a8", "w4a16"], "progress": False, "e2e_samples": None}
    graph = profile(model, calib, **kwargs)
    assert graph.info["runner"] == "graph:fx"  # the bank's token loop stays inside its node
    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setattr(runner_module, "CAPTURES", {})
        hooks = profile(model, calib, **kwargs)
    assert hooks.info["runner"] == "hooks"
    rows = graph.table.set_index(["layer", "scheme"])
    torch.testing.assert_close(
        torch.tensor(rows["e2e"].to_numpy()),
        torch.tensor(hooks.table.set_index(["layer", "scheme"])["e2e"].to_numpy()),
        rtol=1e-4,
        atol=1e-10,
    )
    assert rows.loc[("experts", "w4a16"), "e2e"] > rows.loc[("experts", "bf16"), "e2e"] > 0


@pytest.mark.parametrize("bank_type", [Experts, TransposedExperts])
def test_cost_counts_the_bytes_the_quantized_bank_holds(bank_type: type[nn.Module]) -> None:
    """A quantized bank holds its own copy of the biases (shared with the fp32 bank, the cost
    model counted that whole bank as kept)."""
    model = MoE(bank_type()).eval()
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(3))
    cost = measure_cost(model, x, schemes=["fp32", "bf16", "w8a8", "w4a16"], repeats=2, warmup=1)
    assert set(cost.table[cost.table.layer == "experts"]["supported"]) == {True}
    for plan in ({"experts": "w4a16"}, {"experts": "w8a8", "router": "bf16"}, {"head": "bf16"}):
        quantized = quantize(model, PrecisionPlan(plan, default="fp32"), backend="cpu")
        assert cost.memory_bytes(plan) == held_bytes(quantized)
        assert torch.isfinite(quantized(x)).all()


def _hf_bank(family: str) -> nn.Module:
    """A Hugging Face expert bank of the generic interface, random-initialised from a config:
    Mixtral (``[experts, out, in]``, SiLU gate) or GPT-OSS (transposed, per-expert biases,
    its own clamped gate on interleaved gate/up columns)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(
            hidden_size=H, intermediate_size=M, num_local_experts=E, num_experts_per_tok=2
        )
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Bank
    else:
        cfg = transformers.GptOssConfig(
            hidden_size=H, intermediate_size=M, num_local_experts=E, num_experts_per_tok=2
        )
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Bank
    cfg._experts_implementation = "eager"
    bank = Bank(cfg).eval()
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0.0, 0.2)
    return bank


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@torch.no_grad()
def test_an_interface_bank_runs_as_its_expert_linears_with_its_own_routing(family: str) -> None:
    bank = _hf_bank(family)
    assert follows_expert_interface(bank)
    x, index, weights = _routing()
    as_linears = ExpertLinears(bank, get_scheme("fp32"), lambda linear, scheme: linear)
    torch.testing.assert_close(as_linears(x, index, weights), bank(x, index, weights))
    assert storage_bytes(as_linears) == storage_bytes(bank)  # the experts' own weights, once
    # compiled: every expert on every token in one graph, weighted by the routing
    compiled = torch.compile(as_linears, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, index, weights), bank(x, index, weights))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("scheme", ["bf16", "w8a8", "w8a16", "w4a16", "w4a16_pc"])
@torch.no_grad()
def test_an_interface_bank_runs_the_cpu_linear_kernels_as_simulated(
    family: str, scheme: str
) -> None:
    bank = _hf_bank(family)
    s = get_scheme(scheme)
    real = get_backend("cpu").quantize_layer(bank, s)
    ran = int8_kernel_scheme(s) if s.quantizes_activations else s  # what the int8 kernels run
    sim = get_backend("simulate").quantize_layer(bank, ran)
    assert isinstance(real, ExpertLinears) and isinstance(sim, ExpertLinears)
    assert all(isinstance(m, RealLayer) for m in [*real.up, *real.down])
    x, index, weights = _routing()
    ref, out = sim(x, index, weights), real(x, index, weights)
    noise = (out - ref).pow(2).sum() / ref.pow(2).sum()
    assert float(10 * torch.log10(1 / noise)) >= (60.0 if scheme in ("bf16", "w8a8") else 30.0)
    assert (
        held_bytes(real)
        == storage_bytes(real)
        < storage_bytes(bank) / (1.9 if scheme == "bf16" else 3.0)
    )


def test_an_interface_bank_takes_only_what_its_expert_linears_take_on_cpu() -> None:
    bank = _hf_bank("mixtral")
    why = get_backend("cpu").unsupported_reason(bank, get_scheme("w2a16"))
    assert why is not None and why.startswith("its expert Linear layers:")
    assert get_backend("simulate").quantize_layer(bank, get_scheme("w2a16")) is not None


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_an_interface_bank_exports_with_static_shapes_and_the_same_outputs(
    family: str, scheme: str
) -> None:
    """Under torch.export every expert runs on every token, weighted by the routing (zero where
    not routed): the eager outputs, without the routing's data-dependent shapes. ``w8a8``
    measures each expert's activation range per call, on its routed tokens (before: on every
    token, 0.2 off the eager logits on GPT-OSS)."""
    q = get_backend("simulate").quantize_layer(_hf_bank(family), get_scheme(scheme))
    x, index, weights = _routing()
    with torch.no_grad():
        program = torch.export.export(q, (x, index, weights))
        got, want = program.module()(x, index, weights), q(x, index, weights)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_an_interface_bank_is_autotuned_over_its_expert_linears_int8_kernels() -> None:
    """Every int8 Linear kernel the machine has is a candidate for the bank's expert Linear
    layers; the cost model times each on the bank's real call, and a plan's pick is built."""
    from mpsearch.backends._kernels import choice_key

    bank = _hf_bank("mixtral")
    w8a8 = get_scheme("w8a8")
    cpu = get_backend("cpu")
    names = [k.name for k in cpu.candidates(bank, w8a8)]
    assert names[0] == "default" and set(names[1:]) <= {"onednn", "fbgemm"}
    assert [k.name for k in cpu.candidates(bank, get_scheme("w4a16"))] == ["default"]
    if len(names) == 1:
        pytest.skip("one int8 Linear engine in this PyTorch build")
    model = MoE(bank).eval()
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(3))
    cost = measure_cost(model, x, schemes=["fp32", "w8a8"], repeats=2, warmup=1)
    timed = cost.tuning[(cost.tuning.layer == "experts") & (cost.tuning.scheme == "w8a8")]
    assert list(timed.kernel) == names and timed.chosen.astype(bool).sum() == 1
    x, index, weights = _routing()
    picked = cpu.tuned({choice_key(bank, w8a8): names[1]}).quantize_layer(bank, w8a8)
    default = cpu.quantize_layer(bank, w8a8)
    assert type(picked.up[0]) is not type(default.up[0])
    ref = bank(x, index, weights)
    torch.testing.assert_close(
        picked(x, index, weights), ref, rtol=0.05, atol=0.05 * ref.abs().max()
    )


def test_a_bank_takes_a_static_activation_range_per_expert_linear_from_its_tokens() -> None:
    """Calibration observes each expert Linear layer's input on the tokens routed to it (named
    as in the quantized model); an expert no token reaches keeps a range measured per call."""
    from mpsearch.backends._kernels import per_call_ranges
    from mpsearch.backends._quantize import collect_activation_ranges, takes_act_range

    model = MoE(_hf_bank("mixtral")).eval()
    assert takes_act_range(model.experts) and not takes_act_range(MoE(Experts()).experts)
    g = torch.Generator().manual_seed(4)
    calib = [torch.randn(1, H, generator=g)]  # 1 token, top-2: 2 of the 4 experts idle
    ranges = collect_activation_ranges(model, calib, ["experts", "head"])
    with torch.no_grad():  # by hand: each expert's tokens through the router and the bank
        x = calib[0]
        index = torch.softmax(model.router(x), -1).topk(2, dim=-1).indices
        bank = model.experts
        expected = {}
        for e in index.unique().tolist():
            xe = x[(index == e).any(-1)]
            gate, up = nn.functional.linear(xe, bank.gate_up_proj[e]).chunk(2, dim=-1)
            he = bank.act_fn(gate) * up
            expected[f"experts.up.{e}"] = (float(xe.min()), float(xe.max()))
            expected[f"experts.down.{e}"] = (float(he.min()), float(he.max()))
    assert set(ranges) == {"head", *expected} and len(expected) < 2 * E
    for key, (lo, hi) in expected.items():
        assert ranges[key] == pytest.approx((min(lo, 0.0), max(hi, 0.0)), rel=1e-5, abs=1e-6)
    plan = PrecisionPlan({"experts": "w8a8", "head": "w8a8"}, default="fp32")
    calibrated = quantize(model, plan, backend="cpu", calib=calib)
    dynamic = per_call_ranges(calibrated)
    idle = {f"experts.{p}.{e}" for p in ("up", "down") for e in range(E)} - set(expected)
    assert set(dynamic) == idle  # the routed experts' ranges are static
    given = quantize(model, plan, backend="cpu", act_ranges=ranges)
    simulated = quantize(model, plan, backend="simulate", act_ranges=ranges)
    with torch.no_grad():
        assert torch.equal(calibrated(x), given(x))
        ref = model(x)
        torch.testing.assert_close(given(x), simulated(x), rtol=0.05, atol=0.05 * ref.abs().max())
