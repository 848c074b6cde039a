"""Layers quantized by what they are: Linear subclasses, HF Conv1D, MultiheadAttention.out_proj,
transposed and 3-D convolutions."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import ReadsWeights
from torch import nn

import mpsearch as mps
from mpsearch._data import output_tensor, run_model
from mpsearch.backends import collect_activation_ranges, quantize
from mpsearch.layers import quantizable_layers, swapped
from mpsearch.layers._layers import CalledOutProj, input_major, output_major, standard_form
from mpsearch.workloads import load_workload
from mpsearch.workloads._zoo import zoo_available

BACKENDS = ["simulate", "cpu"]


class Conv1D(nn.Module):
    """Hugging Face's ``transformers.pytorch_utils.Conv1D``: weight ``[in, out]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.reshape(*x.shape[:-1], self.nf)


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def test_conv1d_is_a_linear_on_its_transposed_weight() -> None:
    torch.manual_seed(0)
    conv = Conv1D(24, 16)
    linear = standard_form(conv)
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (24, 16)
    assert linear.weight.data_ptr() == conv.weight.data_ptr()  # a view, no copy
    x = torch.randn(3, 5, 16)
    assert torch.allclose(linear(x), conv(x), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv1d_is_quantized_per_output_channel_like_a_linear(backend: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(32, 16), nn.ReLU(), Conv1D(8, 32)).eval()
    assert list(quantizable_layers(net)) == ["0", "2"]
    x = torch.randn(64, 16)
    q = quantize(net, "w8a8", backend=backend)
    assert all(type(q.get_submodule(n)).__name__ != "Conv1D" for n in ("0", "2"))
    # the same model written with Linear layers, quantized the same way, gives the same output
    as_linear = nn.Sequential(standard_form(net[0]), nn.ReLU(), standard_form(net[2]))
    ref = quantize(as_linear, "w8a8", backend=backend)
    with torch.inference_mode():
        assert torch.allclose(q(x), ref(x), atol=1e-6)
        assert _rel_error(q(x), net(x)) < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.skipif(not zoo_available("hf_gpt2"), reason="needs transformers")
def test_gpt2_w8a8_quantizes_its_conv1d_projections_and_stays_close(backend: str) -> None:
    wl = load_workload("hf_gpt2", n_test=16)
    q = quantize(wl.model, "w8a8", backend=backend)
    conv1d = [n for n, m in quantizable_layers(wl.model).items() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8
    assert all(type(q.get_submodule(n)).__name__ != "Conv1D" for n in conv1d)
    with torch.inference_mode():
        ref = output_tensor(run_model(wl.model, wl.example_input))
        out = output_tensor(run_model(q, wl.example_input))
    assert _rel_error(out, ref) < 0.05
    assert wl.evaluate(q) > 0.9


def test_attention_out_proj_is_a_quantizable_linear_subclass() -> None:
    model = load_workload("attention_net").model
    assert type(model.attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert "attn.out_proj" in quantizable_layers(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_out_proj_quantized_really_changes_the_projection(backend: str) -> None:
    wl = load_workload("attention_net")
    model, x = wl.model, wl.example_input
    with torch.inference_mode():
        ref = model(x)
        fp32 = quantize(model, {"attn.out_proj": "fp32"}, backend=backend)
        # fp32 out_proj: the identity projection inside the attention module is exact
        assert torch.allclose(fp32(x), ref, atol=1e-5)
        w8 = quantize(model, {"attn.out_proj": "w8a8"}, backend=backend)
        assert isinstance(w8.attn.out_proj, CalledOutProj)
        y = w8(x)
    assert not torch.equal(y, ref) and _rel_error(y, ref) < 0.02
    assert type(model.attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"  # untouched


def test_swapping_out_proj_restores_the_attention_module_exactly() -> None:
    wl = load_workload("attention_net")
    model, x = wl.model, wl.example_input
    original = model.attn.out_proj
    sim = quantize(model, {"attn.out_proj": "w4a16"})
    with torch.inference_mode():
        ref = model(x)
        with swapped(model, {"attn.out_proj": sim.attn.out_proj}):
            assert not torch.equal(model(x), ref)
        assert model.attn.out_proj is original and not model.attn._forward_hooks
        assert torch.equal(model(x), ref)


def test_static_ranges_are_observed_for_out_proj() -> None:
    wl = load_workload("attention_net")
    ranges = collect_activation_ranges(wl.model, wl.calib[:1], ["attn.out_proj"])
    lo, hi = ranges["attn.out_proj"]
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="'layers' argument must be one of"):
        collect_activation_ranges(wl.model, wl.calib[:1], ["attn.in_proj"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_whose_weight_is_read_not_called_stays_fp32_with_calib(backend: str) -> None:
    """A uniform plan on a model that reads ``gate.weight`` instead of calling ``gate`` (as
    Mamba's ``conv1d``): with calibration batches the layer stays fp32 (warned) and the model
    runs; before, its empty stand-in weight broke the forward pass. Without calib the layer
    is replaced, and the model computes with its stand-in weight, NaN."""

    model = ReadsWeights().eval()
    x = torch.randn(8, 64)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) stay fp32.*'gate'"):
        q = quantize(model, "w8a8", backend=backend, calib=iter([x]))
    assert q.mpsearch_assignment == {"proj": "w8a8", "gate": "fp32", "head": "w8a8"}
    assert q.gate is not model.gate and torch.equal(q.gate.weight, model.gate.weight)
    with torch.inference_mode():
        assert _rel_error(q(x), model(x)) < 0.05
    # without calib nothing says which layers are only read: the model computes with NaN
    assert quantize(model, "w8a8", backend=backend).gate.weight.isnan().all()


TRANSPOSED = [
    nn.ConvTranspose1d(4, 6, 3, stride=2),
    nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
    nn.ConvTranspose3d(2, 4, (1, 3, 3), stride=(1, 2, 2), bias=False),
]


def _input(layer: nn.Module) -> torch.Tensor:
    return torch.randn(2, layer.in_channels, *(5 for _ in layer.kernel_size))


@pytest.mark.parametrize("layer", TRANSPOSED, ids=lambda m: type(m).__name__)
def test_a_transposed_conv_is_quantized_per_output_channel(layer: nn.Module) -> None:
    """The simulated w8a16 weight is the layer's weight fake-quantized with one scale per
    output channel (in its own layout), and the layer's own operation runs on it."""
    torch.manual_seed(0)
    layer = layer.eval()
    q = quantize(nn.Sequential(layer), "w8a16", backend="simulate")[0]
    rows = output_major(layer.weight.detach(), layer.groups)  # [out, in / groups, *kernel]
    assert rows.shape[0] == layer.out_channels
    scale = rows.reshape(len(rows), -1).abs().amax(1) / 127
    codes = (rows / scale.reshape(-1, *[1] * (rows.dim() - 1))).round()
    expected = input_major(codes * scale.reshape(-1, *[1] * (rows.dim() - 1)), layer.groups)
    assert torch.equal(q.weight_q.float(), expected.bfloat16().float())
    x = _input(layer)
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
    ref = conv[len(layer.kernel_size)](
        x.bfloat16(), expected.bfloat16(), None if layer.bias is None else layer.bias.bfloat16(),
        layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation,
    )  # fmt: skip
    with torch.inference_mode():
        assert torch.equal(q(x), ref.float())


@pytest.mark.parametrize(
    "layer",
    [
        *TRANSPOSED,
        nn.Conv3d(3, 4, 3, padding=1),
        # a vocoder's upsampler (HiFi-GAN, EnCodec): its class, made by the parametrization,
        # cannot be copied (DequantConv copied it for its settings)
        nn.utils.parametrizations.weight_norm(nn.ConvTranspose1d(4, 6, 8, stride=4)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_conv3d_and_transposed_convs_run_float_and_weight_only_schemes_on_cpu(
    layer: nn.Module,
) -> None:
    """fp32 is the user's layer as it is, bf16 the layer in bf16 (bitwise torch's); weight-only
    schemes hold packed codes (the bytes the cost model counts) and equal the simulation
    exactly (they were refused before: a U-Net's or a vocoder's upsampling stayed float);
    int8 activations are refused before any work, naming what the backend runs."""
    from mpsearch.backends._conv import DequantConv
    from mpsearch.cost import held_bytes

    torch.manual_seed(0)
    net = nn.Sequential(layer.eval())
    x = _input(layer)
    fp32, bf16 = (quantize(net, s, backend="cpu") for s in ("fp32", "bf16"))
    assert type(fp32[0]) is type(layer)
    with torch.inference_mode():
        assert torch.equal(fp32(x), layer(x))
        assert torch.equal(bf16(x), copy.deepcopy(layer).bfloat16()(x.bfloat16()).float())
    cost = mps.measure_cost(net, x, schemes=["w8a16", "w4a16_pc"], repeats=1, warmup=0)
    for scheme in ("w8a16", "w4a16_pc"):
        real, simulated = (quantize(net, scheme, backend=b) for b in ("cpu", "simulate"))
        assert isinstance(real[0], DequantConv)
        assert cost.memory_bytes(scheme) == held_bytes(real) < held_bytes(bf16)
        with torch.inference_mode():
            assert torch.equal(real(x), simulated(x))
    with pytest.raises(ValueError, match=r"runs in float and weight-only schemes.*'w8a16'"):
        quantize(net, {"0": "w8a8"}, backend="cpu")  # named for the layer: refused


class VideoUpsampler(nn.Module):
    """A 3-D conv stem with BatchNorm, a transposed conv upsampling its features, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.head = nn.Linear(8, 5)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(clip))).mean(2)  # [B, 8, H, W]
        return self.head(torch.relu(self.up(x)).mean((2, 3)))


def test_a_uniform_plan_runs_on_layers_without_its_kernel(tmp_path) -> None:
    """Bug: uniform w8a8 on a model with a transposed or 3-D convolution was refused on the
    cpu backend (no int8 x int8 kernel for them): a uniform plan on a U-Net, a vocoder or a
    video model could not run. Such a layer takes the nearest scheme the backend runs it in
    without losing precision (w8a16), with a warning; the cost model prices it so and the
    exported plan records it. A scheme named for the layer is still refused."""
    from mpsearch.backends._quantize import runnable_variant
    from mpsearch.cost import held_bytes
    from mpsearch.schemes import get_scheme

    cpu = mps.get_backend("cpu")
    up = nn.ConvTranspose2d(8, 8, 2, stride=2)
    assert runnable_variant(up, get_scheme("w8a8"), cpu).name == "w8a16"
    assert runnable_variant(up, get_scheme("w4a8"), cpu).name == "w4a16"  # groups kept
    assert runnable_variant(nn.LSTM(32, 32), get_scheme("w4a16"), cpu).name == "bf16"
    torch.manual_seed(0)
    model = VideoUpsampler().eval()
    clip = torch.randn(2, 3, 2, 8, 8)
    with pytest.warns(UserWarning, match=r"2 layer\(s\).*stem \(w8a8 -> w8a16\), up \(w8a8"):
        q = quantize(model, "w8a8", backend="cpu")
    same = quantize(
        model, mps.PrecisionPlan({"stem": "w8a16", "up": "w8a16"}, default="w8a8"), backend="cpu"
    )
    with torch.inference_mode():
        assert torch.equal(q(clip), same(clip))
    cost = mps.measure_cost(model, clip, schemes=["w8a8"], repeats=1, warmup=0)
    assert cost.memory_bytes("w8a8") == held_bytes(q)
    with pytest.warns(UserWarning, match="nearest scheme"):
        written = mps.export_plan(model, "w8a8", tmp_path, example_input=clip, formats=["plan"])
    assert written is not None
    saved = mps.PrecisionPlan.load(tmp_path / "plan.json").resolve(model)
    assert saved == {"stem": "w8a16", "up": "w8a16", "head": "w8a8"}
    with pytest.raises(ValueError, match="no real kernel for 'w8a8' on ConvTranspose2d"):
        quantize(model, {"up": "w8a8"}, backend="cpu")


def test_a_model_of_3d_and_transposed_convs_runs_the_whole_pipeline(tmp_path) -> None:
    """profile (graph runner) -> measure_cost on cpu -> search -> quantize
    on cpu -> export; the cost model's memory is what the quantized model holds."""
    import mpsearch as mps
    from mpsearch.cost import held_bytes

    torch.manual_seed(0)
    model = VideoUpsampler().eval()
    calib = [torch.randn(4, 3, 2, 8, 8) for _ in range(3)]
    prof = mps.profile(model, calib, schemes=["bf16", "w8a8"], progress=False)
    assert prof.info["runner"] == "graph:fx"
    assert prof.table["e2e"].notna().all()
    cost = mps.measure_cost(
        model, calib[0], schemes=["fp32", "bf16", "w8a8"], backend="cpu", repeats=1, warmup=0
    )
    refused = cost.table[~cost.table["supported"]]
    assert set(zip(refused["layer"], refused["scheme"], strict=True)) == {
        ("stem", "w8a8"),
        ("up", "w8a8"),
    }
    res = mps.search(model, profile=prof, cost=cost, eval_data=calib, n_trials=20, seed=0)
    plan = res.best()
    assert plan.resolve_choices(model)["up"] in ("fp32", "bf16")
    for plan_ in (plan, {"stem": "bf16", "up": "bf16", "head": "w8a8"}):
        quantized = mps.quantize(model, plan_, backend=cost.backend)  # the kernels it measured
        assert cost.memory_bytes(plan_) == held_bytes(quantized)
    exported = mps.export_plan(
        model, plan, tmp_path, example_input=calib[0], formats=("plan", "state_dict")
    )
    assert {r.format: r.check for r in exported.records}["plan"] == 0.0


def test_quantizing_with_calib_leaves_a_training_models_batchnorm_statistics() -> None:
    """``quantize(calib=...)`` runs the user's model to find the layers it never calls and,
    for a calibrated rounding, to gather the layers' inputs: a model left in training mode
    updated its BatchNorm running statistics there (and the rounding saw batch statistics)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    before = copy.deepcopy(model.state_dict())
    calib = [torch.randn(4, 3, 8, 8) + 1.0 for _ in range(2)]
    quantize(model, "w4a16_pc+gptq", backend="simulate", calib=calib)
    assert model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_quantized_layer_keeps_the_users_hooks() -> None:
    """A forward hook the user put on a layer (here halving its output) and a pre-hook still
    act on its quantized form, in the profile's variants and in ``quantize`` alike: without
    them the w8a8 model was 26 % off the model it replaces, and the profile measured the
    missing hook as the layer's error."""
    from mpsearch.profile import profile

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    net[0].register_forward_hook(lambda _m, _args, out: out * 0.5)
    net[2].register_forward_pre_hook(lambda _m, args: (args[0] + 1.0,))
    x = torch.randn(32, 16)
    for backend in ("simulate", "cpu"):
        quantized = quantize(net, "w8a8", backend=backend, calib=[x])
        with torch.no_grad():
            assert float((quantized(x) - net(x)).norm() / net(x).norm()) < 0.02
    prof = profile(net, [x], schemes=["bf16"], progress=False)
    assert (prof.pivot("sqnr_db")["bf16"] > 40).all()


@pytest.mark.parametrize("kind", ["prune", "weight_norm", "spectral_norm"])
def test_hooks_that_recompute_the_weight_stay_behind(kind: str) -> None:
    """A pruned layer, or one under the old-style weight or spectral norm, recomputes its
    weight in a pre-hook: its quantized form holds that weight, the hook stays behind (carried
    over, the pruning hook looked for ``weight_mask`` on the quantized layer)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm is deprecated
        if kind == "prune":
            torch.nn.utils.prune.l1_unstructured(net[0], "weight", amount=0.5)
        else:
            getattr(torch.nn.utils, kind)(net[0])
    x = torch.randn(32, 16)
    for backend in ("simulate", "cpu"):
        quantized = quantize(net, "w8a8", backend=backend, calib=[x])
        with torch.no_grad():
            assert float((quantized(x) - net(x)).norm() / net(x).norm()) < 0.02
