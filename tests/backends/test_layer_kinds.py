"""Layers quantized by what they are: Linear subclasses, HF Conv1D, MultiheadAttention.out_proj."""

from __future__ import annotations

import pytest
import torch
from helpers import ReadsWeights
from torch import nn

from mpsearch._data import output_tensor, run_model
from mpsearch.backends import collect_activation_ranges, quantize
from mpsearch.layers import quantizable_layers, swapped
from mpsearch.layers._layers import CalledOutProj, standard_form
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
    runs; before, its empty stand-in weight broke the forward pass."""

    model = ReadsWeights().eval()
    x = torch.randn(8, 64)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) stay fp32.*'gate'"):
        q = quantize(model, "w8a8", backend=backend, calib=iter([x]))
    assert q.mpsearch_assignment == {"proj": "w8a8", "gate": "fp32", "head": "w8a8"}
    assert q.gate is not model.gate and torch.equal(q.gate.weight, model.gate.weight)
    with torch.inference_mode():
        assert _rel_error(q(x), model(x)) < 0.05
    with pytest.raises(RuntimeError):  # without calib nothing says which layers are only read
        quantize(model, "w8a8", backend=backend)(x)
