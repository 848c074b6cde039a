"""The ``cpu-pt2e`` backend: PyTorch's pt2e X86 Inductor int8 flow for fp32 / w8a8 plans on
Conv2d and Linear, with calibration, and a fallback to the ``cpu`` backend that says why."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mpsearch as mps
from mpsearch.backends import get_backend
from mpsearch.backends._pt2e import Conv1dAs2d, Pt2eModel

pytestmark = pytest.mark.skipif(
    get_backend("cpu-pt2e").unavailable_reason() is not None,
    reason=str(get_backend("cpu-pt2e").unavailable_reason()),
)


class ConvNet(nn.Module):
    """Conv-ReLU, a residual Conv-ReLU, pooling and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x) + x)
        return self.fc(x.mean((2, 3)))


def _net_and_calib() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    return ConvNet().eval(), [torch.randn(8, 3, 16, 16) for _ in range(4)]


def _quantize_nodes(model: Pt2eModel) -> int:
    return sum(
        1
        for n in model.converted.graph.nodes
        if n.op == "call_function" and "quantize_per_tensor" in str(n.target)
        and "dequantize" not in str(n.target)
    )  # fmt: skip


def test_uniform_w8a8_runs_compiled_int8_close_to_its_reference_and_fp32() -> None:
    net, calib = _net_and_calib()
    q = mps.quantize(net, "w8a8", backend="cpu-pt2e", calib=calib)
    assert isinstance(q, Pt2eModel) and q.mpsearch_compile["mode"] == "inductor"
    x = torch.randn(8, 3, 16, 16)
    got = q(x)
    with torch.no_grad():
        reference = q.converted(x)  # the quantize / dequantize arithmetic in float
        fp32 = net(x)
    assert float((got - reference).norm() / reference.norm()) < 1e-2
    assert float((got - fp32).norm() / fp32.norm()) < 0.05  # int8 rounding, not a wrong kernel
    assert q(torch.randn(3, 3, 16, 16)).shape == (3, 10)  # another batch size
    assert q.mpsearch_assignment == {"conv1": "w8a8", "conv2": "w8a8", "fc": "w8a8"}
    q.eval()  # an exported graph refuses train/eval; the wrapper keeps only the flag
    assert not q.training


def test_fp32_layers_of_a_mixed_plan_are_left_unquantized() -> None:
    net, calib = _net_and_calib()
    uniform = mps.quantize(net, "w8a8", backend="cpu-pt2e", calib=calib)
    plan = mps.PrecisionPlan({"fc": "fp32"}, default="w8a8")
    mixed = mps.quantize(net, plan, backend="cpu-pt2e", calib=calib)
    assert _quantize_nodes(mixed) < _quantize_nodes(uniform)
    fp32_only = mps.quantize(net, "fp32", backend="cpu-pt2e", calib=calib)
    assert _quantize_nodes(fp32_only) == 0
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fp32_only(x), net(x), atol=1e-4, rtol=1e-4)


def _add_fused(model: Pt2eModel) -> list[bool]:
    """For each residual add of the converted graph: whether it is part of its convolution's
    int8 pattern (the conv's output feeds it, and its residual input is int8, dequantized)."""
    return [
        any("dequantize" in str(a.target) for a in n.args if isinstance(a, torch.fx.Node))
        for n in model.converted.graph.nodes
        if n.op == "call_function" and n.target in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
    ]  # fmt: skip


def test_the_residual_add_of_an_int8_conv_is_int8_even_outside_the_layer_module() -> None:
    net, calib = _net_and_calib()
    uniform = mps.quantize(net, "w8a8", backend="cpu-pt2e", calib=calib)
    assert _add_fused(uniform) == [True]  # conv2 + x fused: no fp32 add between
    conv2_fp32 = mps.PrecisionPlan({"conv2": "fp32"}, default="w8a8")
    mixed = mps.quantize(net, conv2_fp32, backend="cpu-pt2e", calib=calib)
    assert _add_fused(mixed) == [False]  # anchored on an fp32 layer: left alone


def test_bad_input_names_the_argument_and_what_is_accepted() -> None:
    net, calib = _net_and_calib()
    with pytest.raises(ValueError, match="'calib' argument must be calibration batches"):
        mps.quantize(net, "w8a8", backend="cpu-pt2e")
    with pytest.raises(
        ValueError, match=r"conv1 \(Conv2d\) in 'w2a16_pc': .*no 2-bit kernel on CPU"
    ):
        mps.quantize(net, "w2a16", backend="cpu-pt2e", calib=calib)  # nor on the cpu backend


def test_other_schemes_run_the_cpu_kernels_inside_the_compiled_int8_model() -> None:
    net, calib = _net_and_calib()
    plan = mps.PrecisionPlan({"conv1": "bf16", "conv2": "w8a8", "fc": "w4a16_pc"})
    q = mps.quantize(net, plan, backend="cpu-pt2e", calib=calib)
    assert isinstance(q, Pt2eModel) and q.mpsearch_compile["mode"] == "inductor"
    assert _add_fused(q)[0]  # conv2 and its residual add, int8 in one kernel (then fc's bias)
    targets = {str(n.target) for n in q.converted.graph.nodes if n.op == "call_function"}
    assert "aten._weight_int4pack_mm_for_cpu.default" in targets  # fc: the cpu backend's kernel
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        got, cpu = q(x), mps.quantize(net, plan, backend="cpu")(x)
    assert float((got - cpu).norm() / cpu.norm()) < 0.02  # static vs dynamic int8 ranges


def test_a_model_export_cannot_capture_falls_back_to_the_cpu_backend_with_the_reason() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            return y if int(y.argmax()) % 2 else -y  # control flow on a value: no graph

    torch.manual_seed(0)
    net = DataDependent().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = mps.quantize(net, "w8a8", backend="cpu-pt2e", calib=[torch.randn(4, 8)])
    assert q.mpsearch_compile["mode"] == "cpu" and "pt2e failed" in q.mpsearch_compile["reason"]
    assert any("running the plan on the cpu backend" in str(w.message) for w in caught)
    x = torch.randn(4, 8)
    cpu = mps.quantize(net, "w8a8", backend="cpu", calib=[torch.randn(4, 8)])
    assert q(x).shape == cpu(x).shape == (4, 8)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(1, 8, 64, stride=4, padding=8),  # one input channel, a long kernel
        nn.Conv1d(8, 8, 5, dilation=3, groups=4, bias=False),
        nn.Conv1d(8, 8, 3, padding="same"),
        nn.Conv1d(8, 8, 9, groups=8),  # depthwise
    ],
)
def test_conv1d_as_2d_is_the_same_convolution(conv: nn.Conv1d) -> None:
    x = torch.randn(2, conv.in_channels, 200)
    with torch.no_grad():
        torch.testing.assert_close(Conv1dAs2d(conv)(x), conv(x), atol=1e-5, rtol=1e-5)


def test_conv1d_layers_run_int8_as_a_conv2d_of_height_or_width_one() -> None:
    """The last conv (16 input channels, a 16-wide kernel) ran 1.97 away from fp32 as a 1 x K
    Conv2d, compiled or not (see ``conv1d_as_2d_dim``)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(1, 16, 32, stride=4, padding=4), nn.ReLU(), nn.Conv1d(16, 16, 9), nn.ReLU(),
        nn.Conv1d(16, 16, 16, padding=8),
    ).eval()  # fmt: skip
    calib = [torch.randn(4, 1, 400) for _ in range(3)]
    q = mps.quantize(net, "w8a8", backend="cpu-pt2e", calib=calib)
    assert isinstance(q, Pt2eModel) and _quantize_nodes(q) >= 3
    x = torch.randn(4, 1, 400)
    with torch.no_grad():
        assert float((q(x) - net(x)).norm() / net(x).norm()) < 0.05
    assert isinstance(net[0], nn.Conv1d)  # the user's model is left alone


def test_fp32_layers_of_any_type_are_left_alone() -> None:
    class Tagger(nn.Module):  # an embedding (which cpu-pt2e cannot quantize) feeding Linears
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.fc1 = nn.Linear(16, 32)
            self.fc2 = nn.Linear(32, 5)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(self.embed(ids))))

    torch.manual_seed(0)
    net = Tagger().eval()
    calib = [torch.randint(0, 50, (4, 7)) for _ in range(3)]
    plan = mps.PrecisionPlan({"embed": "fp32"}, default="w8a8")
    q = mps.quantize(net, plan, backend="cpu-pt2e", calib=calib)
    assert isinstance(q, Pt2eModel) and _quantize_nodes(q) >= 2
    ids = torch.randint(0, 50, (4, 7))
    with torch.no_grad():
        assert float((q(ids) - net(ids)).norm() / net(ids).norm()) < 0.05


def test_the_cost_model_refuses_to_time_it_layer_by_layer() -> None:
    net, _ = _net_and_calib()
    with pytest.raises(ValueError, match="'cpu-pt2e' quantizes the whole model at once"):
        mps.measure_cost(net, torch.randn(2, 3, 16, 16), schemes=["w8a8"], backend="cpu-pt2e")


class Tagger(nn.Module):
    """A Linear and an LSTM (int8 on the cpu backend: an op export cannot take)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(torch.relu(self.fc(x)))[0]


def test_a_cpu_kernel_export_cannot_capture_falls_back_to_the_cpu_backend_whole() -> None:
    torch.manual_seed(0)
    net = Tagger().eval()
    calib = [torch.randn(4, 5, 6) for _ in range(2)]
    with pytest.warns(RuntimeWarning, match="cpu-pt2e: running the plan on the cpu backend"):
        q = mps.quantize(net, "w8a8", backend="cpu-pt2e", calib=calib)
    assert q.mpsearch_compile["mode"] == "cpu" and "quantized_lstm" in q.mpsearch_compile["reason"]
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        want = mps.quantize(net, "w8a8", backend="cpu", calib=calib)(x)
        torch.testing.assert_close(q(x), want)  # the same kernels, the same static ranges


def test_weights_get_the_cpu_kernels_7_bit_codes_where_onednn_saturates(monkeypatch) -> None:
    from mpsearch.backends import _pt2e

    net, calib = _net_and_calib()
    for saturates, bound in ((False, 127), (True, 63)):
        monkeypatch.setattr(_pt2e, "onednn_u8s8_saturates", lambda s=saturates: s)
        q = mps.quantize(net, "w8a8", backend="cpu-pt2e", calib=calib)
        codes = [b for _, b in q.converted.named_buffers() if b.dtype == torch.int8]
        assert len(codes) == 3  # conv1, conv2, fc
        assert max(int(c.abs().max()) for c in codes) == bound


def test_a_conv2d_onednn_computes_wrongly_runs_the_cpu_kernel_inside_the_compiled_model() -> None:
    """A 1 x 8 kernel on 16 input channels: oneDNN's int8 conv gives wrong sums for it on an
    AMX Xeon, compiled or not (``onednn_int8_conv_exact``); there it is left out of the pt2e
    annotation and runs the ``cpu`` backend's kernel (im2col), the rest compiled around it."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, (1, 8), padding=(0, 4))
    ).eval()
    calib = [torch.randn(4, 3, 12, 20) for _ in range(3)]
    q = mps.quantize(net, "w8a8", backend="cpu-pt2e", calib=calib)
    assert isinstance(q, Pt2eModel)
    x = torch.randn(4, 3, 12, 20)
    with torch.no_grad():
        assert float((q(x) - net(x)).norm() / net(x).norm()) < 0.05


def test_a_plan_with_no_pt2e_layer_falls_back_to_its_cpu_kernels_as_they_are() -> None:
    """Every layer on a ``cpu`` kernel (a w8a16 Linear, an int8 LSTM export cannot capture):
    the fallback is the model as built; it used to quantize it again and stop with "no
    quantizable layers"."""
    torch.manual_seed(0)
    net = Tagger().eval()
    calib = [torch.randn(4, 5, 6) for _ in range(2)]
    plan = {"fc": "w8a16", "lstm": "w8a8"}
    with pytest.warns(RuntimeWarning, match="cpu-pt2e: running the plan on the cpu backend"):
        q = mps.quantize(net, plan, backend="cpu-pt2e", calib=calib)
    assert q.mpsearch_compile["mode"] == "cpu"
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(q(x), mps.quantize(net, plan, backend="cpu", calib=calib)(x))


def test_a_saturating_cpu_probes_convolutions_with_the_codes_its_kernels_get() -> None:
    """Capped to AVX2 (no VNNI: oneDNN's u8 x s8 products saturate), the int8 kernels give
    weights 7-bit codes; the geometry probe draws the same, so a plain 3 x 3 convolution is
    exact there. With 8-bit codes it found no geometry exact on an AVX2 EPYC, and every
    w8a8 convolution of a ``cpu-pt2e`` plan went to a kernel export cannot capture."""
    import os
    import subprocess
    import sys

    probe = (
        "from torch import nn; from mpsearch.backends._kernels import onednn_int8_conv_exact, "
        "onednn_u8s8_saturates as s; "
        "print(s(), onednn_int8_conv_exact(nn.Conv2d(64, 64, 3, padding=1)))"
    )
    caps = {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }
    run = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, **caps}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    saturates, exact = run.stdout.split()[-2:]
    assert exact == "True", (saturates, exact)
