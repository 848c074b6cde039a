from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from helpers import conv_net
from torch import nn

import mpsearch as mps
from mpsearch.backends import get_backend, onednn_u8s8_saturates, storage_bytes
from mpsearch.backends._cpu import CpuBackend
from mpsearch.backends._kernels import FbgemmInt8Linear, Int8Linear, RealLayer, int8_kernel_scheme

# Tolerances of real kernels against the simulation of the same scheme (SQNR in dB).
# fp32/bf16/fp16/w8a8 follow the scheme's arithmetic exactly (same codes and scales);
# w8a16 stores its scales in bf16, w4a16 its zero offsets in bf16 (kernel conventions);
# w4a8_pc runs its 4-bit codes on the int8 kernels (same codes and scales as w8a8's path).
SQNR_MIN = {
    "fp32": 80.0,
    "bf16": 80.0,
    "fp16": 80.0,
    "w8a8": 60.0,
    "w8a16": 35.0,
    "w4a16": 30.0,
    "w4a16_pc": 30.0,
    "w4a8_pc": 60.0,
}
WEIGHT_ONLY = ("w8a16", "w4a16", "w4a16_pc")
STATIC = ("w8a8", "w4a8_pc")


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def _layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "Linear": (nn.Linear(64, 40), torch.randn(3, 5, 64)),
        "Conv1d": (nn.Conv1d(16, 32, 3, padding=1), torch.randn(4, 16, 20)),
        "Conv2d": (nn.Conv2d(8, 32, 3, padding=1, stride=2), torch.randn(2, 8, 12, 12)),
    }


CASES = [
    (kind, scheme, static)
    for kind in ("Linear", "Conv1d", "Conv2d")
    for scheme in SQNR_MIN
    for static in (False, True)
    if (kind == "Linear" or scheme not in WEIGHT_ONLY) and (not static or scheme in STATIC)
]


@pytest.mark.parametrize(("kind", "scheme", "static"), CASES)
def test_real_matches_simulate(kind: str, scheme: str, static: bool) -> None:
    layer, x = _layers()[kind]
    layer.eval()
    s = mps.get_scheme(scheme)
    # the simulation of what the int8 kernels run here (7-bit weight codes on CPUs whose
    # u8 x s8 kernels saturate); the scheme itself elsewhere
    ran = int8_kernel_scheme(s) if s.quantizes_activations else s
    act_range = (-2.5, 3.0) if static else None
    with torch.no_grad():
        real = get_backend("cpu").quantize_layer(layer, s, act_range=act_range)
        sim = get_backend("simulate").quantize_layer(layer, ran, act_range=act_range)
        out, ref = real(x), sim(x)
    # fp32 runs the user's own layer; every other scheme a real low-precision module
    assert real is layer if scheme == "fp32" else isinstance(real, RealLayer)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert sqnr(ref, out) >= SQNR_MIN[scheme]


def test_weights_are_stored_in_low_precision() -> None:
    layer = nn.Linear(64, 32)
    cpu = CpuBackend()
    dtypes = {
        name: {
            t.dtype for t in cpu.quantize_layer(layer, mps.get_scheme(name)).state_dict().values()
        }
        for name in ("bf16", "fp16", "w8a16", "w4a16", "w8a8")
    }
    assert dtypes["bf16"] == {torch.bfloat16}
    assert dtypes["fp16"] == {torch.float16}
    assert torch.int8 in dtypes["w8a16"] and torch.float32 not in dtypes["w8a16"]
    assert torch.uint8 in dtypes["w4a16"]
    assert torch.int8 in dtypes["w8a8"]
    # 4-bit weights: half a byte per weight, plus the bf16 scale/offset pairs per group of 32.
    w4 = cpu.quantize_layer(layer, mps.get_scheme("w4a16"))
    assert storage_bytes(w4) == 32 * 64 // 2 + (64 // 32) * 32 * 2 * 2 + 32 * 2


def test_w4a16_pads_output_rows_to_16() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(64, 10)
    x = torch.randn(3, 64)
    real = CpuBackend().quantize_layer(layer, mps.get_scheme("w4a16"))
    sim = get_backend("simulate").quantize_layer(layer, mps.get_scheme("w4a16"))
    assert real(x).shape == (3, 10)
    assert sqnr(sim(x), real(x)) >= SQNR_MIN["w4a16"]


@pytest.mark.parametrize("scheme", ["fp8", "fp4", "w2a16", "w4a8", "w4a4", "w4a4_pc"])
def test_scheme_without_kernel_is_refused_before_any_work(scheme: str) -> None:
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Conv1d(1, 4, 3)).eval()
    calls = []
    net[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError) as info:
        mps.quantize(net, {"0": scheme}, backend="cpu", calib=[torch.randn(2, 64)])
    message = str(info.value)
    assert "0 (Linear)" in message and repr(scheme) in message
    assert "'bf16'" in message and "'w8a8'" in message  # what it can run instead
    assert calls == []  # refused before calibration ran


def test_weight_only_conv_runs_where_the_scheme_does() -> None:
    """Weight-only convolutions run (grouped ones included); w4a16 needs its groups of 32."""
    for layer in (nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2)):
        assert CpuBackend().unsupported_reason(layer, mps.get_scheme("w4a16_pc")) is None
    reason = CpuBackend().unsupported_reason(nn.Conv2d(1, 4, 3), mps.get_scheme("w4a16"))
    assert reason is not None and "group_size=32 does not divide" in reason


@pytest.mark.parametrize(("k", "group"), [(9, 32), (40, 64), (64, 64), (96, 32), (512, 256)])
def test_w4a16_pc_runs_any_fan_in_on_the_int4_kernel(k: int, group: int) -> None:
    """Per-channel int4 on the grouped kernel: fan-in zero-padded to a multiple of 32, the
    channel's scale and offset repeated over the largest group the kernel takes."""
    torch.manual_seed(k)
    layer, x = nn.Linear(k, 24), torch.randn(3, 5, k)
    s = mps.get_scheme("w4a16_pc")
    with torch.no_grad():
        real = CpuBackend().quantize_layer(layer, s)
        ref = get_backend("simulate").quantize_layer(layer, s)(x)
        out = real(x)
    assert real.group_size == group and real.k_pad == -k % 32
    assert out.shape == ref.shape == (3, 5, 24)
    assert sqnr(ref, out) >= SQNR_MIN["w4a16_pc"]
    kp, n_rows = k + -k % 32, 32  # 24 output rows padded to 32
    assert storage_bytes(real) == n_rows * kp // 2 + (kp // group) * n_rows * 2 * 2 + 24 * 2


def test_w4a8_pc_stores_int8_and_says_so() -> None:
    """The 4-bit codes run on the int8 kernels: 8-bit storage, counted as such, and the kernel
    table says so."""
    layer = nn.Conv2d(1, 16, 3)  # fan-in 9: no group of 32 fits
    real = CpuBackend().quantize_layer(layer, mps.get_scheme("w4a8_pc"))
    assert real.state_dict()["weight_int8"].dtype == torch.int8
    assert int(real.state_dict()["weight_int8"].abs().max()) <= 7
    rows = {
        (r["layer_type"], r["scheme"], r["implementation"]): r["kernel"]
        for r in CpuBackend().kernel_table()
    }
    assert "4-bit codes held in int8" in rows[("Conv2d", "w4a8_pc", "default")]


def test_flag_net_uniform_w4a8_runs_per_channel_on_cpu() -> None:
    """flag_net's convolutions (fan-in 9, grouped 36, depthwise 9) and its Linear (16) take no
    group of 32: a uniform w4a8 plan runs w4a8_pc on every layer, on the real kernels, and
    agrees with the simulation of the same plan."""
    from mpsearch.workloads import load_workload

    wl = load_workload("flag_net", n_calib=16, n_test=16)
    real = mps.quantize(wl.model, "w4a8", backend="cpu")
    sim = mps.quantize(wl.model, "w4a8", backend="simulate")
    assert set(real.mpsearch_assignment.values()) == {"w4a8_pc"}
    x = wl.test[0]
    with torch.no_grad():
        assert sqnr(sim(x), real(x)) >= 40.0
    assert wl.evaluate(real) >= 0.9


def _net() -> nn.Module:
    return conv_net(10)


PLAN = mps.PrecisionPlan({"0": "w8a8", "3": "bf16", "5": "w4a16", "7": "w8a16"})


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8_pc"])
@pytest.mark.parametrize("kind", ["Linear", "Conv2d"])
def test_int8_kernels_do_exact_integer_arithmetic_on_extreme_codes(kind: str, scheme: str) -> None:
    """Full-scale activations times full-scale weights: the products that saturate int16 pair
    sums on CPUs without VNNI. The output must equal the integer arithmetic of the codes
    (``w4a8_pc``: 4-bit codes on the same kernels, never reduced)."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 16) if kind == "Linear" else nn.Conv2d(16, 8, 3, padding=1)
    with torch.no_grad():
        layer.weight.copy_(torch.sign(torch.randn_like(layer.weight)))  # all codes +-qmax
        layer.bias.zero_()
    x = torch.full((2, 64) if kind == "Linear" else (2, 16, 5, 5), 3.0)  # all codes 255
    real = get_backend("cpu").quantize_layer(layer, mps.get_scheme(scheme), act_range=(0.0, 3.0))
    state = real.state_dict()
    codes, w_scale = state["weight_int8"].double(), state["w_scale"].double()
    with torch.no_grad():
        q, scale, zero = real.act(x)
        x_hat = (q.double() - zero) * scale
        w_hat = codes * w_scale.reshape(-1, *[1] * (codes.dim() - 1))
        ref = (
            nn.functional.linear(x_hat, w_hat)
            if kind == "Linear"
            else nn.functional.conv2d(x_hat, w_hat, padding=1)
        )
        out = real(x)
    assert int(q.max()) == 255
    w8 = 63 if onednn_u8s8_saturates() else 127
    assert int(codes.abs().max()) == {"w8a8": w8, "w4a8_pc": 7}[scheme]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("module", [Int8Linear, FbgemmInt8Linear])
def test_each_int8_linear_kernel_matches_simulate_and_round_trips(
    module: type[nn.Module], static: bool
) -> None:
    """Both w8a8 Linear kernels (the backend picks one per CPU) are exact and serialisable."""
    if module is FbgemmInt8Linear and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no fbgemm engine in this torch build")
    torch.manual_seed(0)
    layer, x = nn.Linear(64, 40).eval(), torch.randn(3, 5, 64) * 2
    s = mps.get_scheme("w8a8")
    act_range = (-2.5, 3.0) if static else None
    with torch.no_grad():
        real = module(layer, s, act_range=act_range)
        sim = get_backend("simulate").quantize_layer(
            layer, int8_kernel_scheme(s), act_range=act_range
        )
        y = real(x)
        assert sqnr(sim(x), y) >= SQNR_MIN["w8a8"]
        buffer = io.BytesIO()
        torch.save(real, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x), y)
        other = module(nn.Linear(64, 40), s, act_range=act_range)
        other.load_state_dict(real.state_dict())
        assert torch.equal(other(x), y)
        earlier = {**real.state_dict(), "w_zero": torch.zeros(40, dtype=torch.long)}
        other.load_state_dict(earlier)  # per-channel zeros saved by earlier versions
        assert torch.equal(other(x), y)
    state_bytes = sum(t.numel() * t.element_size() for t in real.state_dict().values())
    assert storage_bytes(real) == state_bytes


def test_quantized_model_matches_simulate_end_to_end() -> None:
    net = _net()
    x = torch.randn(4, 3, 8, 8)
    real = mps.quantize(net, PLAN, backend="cpu")
    sim = mps.quantize(net, PLAN, backend="simulate")
    with torch.no_grad():
        assert sqnr(sim(x), real(x)) >= 30.0


@pytest.mark.parametrize("calib", [False, True])
def test_save_and_load_give_identical_outputs(calib: bool) -> None:
    net = _net()
    x = torch.randn(4, 3, 8, 8)
    batches = [torch.randn(4, 3, 8, 8)] if calib else None
    qnet = mps.quantize(net, PLAN, backend="cpu", calib=batches)
    with torch.no_grad():
        y = qnet(x)
        buffer = io.BytesIO()
        torch.save(qnet, buffer)
        buffer.seek(0)
        whole = torch.load(buffer, weights_only=False)
        assert torch.equal(whole(x), y)
        skeleton = mps.quantize(_net().apply(_perturb), PLAN, backend="cpu", calib=batches)
        assert not torch.equal(skeleton(x), y)
        skeleton.load_state_dict(qnet.state_dict())
        assert torch.equal(skeleton(x), y)


def _perturb(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        with torch.no_grad():
            module.weight.mul_(1.5)


def test_storage_bytes_equals_state_dict_bytes() -> None:
    qnet = mps.quantize(_net(), PLAN, backend="cpu")
    state = qnet.state_dict()
    expected = sum(t.numel() * t.element_size() for t in state.values())
    assert storage_bytes(qnet) == expected
    assert storage_bytes(qnet) < storage_bytes(_net())


def test_given_activation_ranges_equal_observed_ones() -> None:
    net = _net()
    batches = [torch.randn(4, 3, 8, 8)]
    x = torch.randn(4, 3, 8, 8)
    observed = mps.quantize(net, PLAN, backend="cpu", calib=batches)
    static = [n for n, s in PLAN.resolve(net).items() if mps.get_scheme(s).quantizes_activations]
    ranges = mps.backends.collect_activation_ranges(net, batches, static)
    given = mps.quantize(net, PLAN, backend="cpu", act_ranges=ranges)
    with torch.no_grad():
        assert torch.equal(given(x), observed(x))
    with pytest.raises(ValueError, match="'act_ranges'"):
        mps.quantize(net, PLAN, backend="cpu", calib=batches, act_ranges=ranges)


def test_a_plan_carrying_kernel_choices_is_built_with_them() -> None:
    """``plan.metadata["kernels"]`` (what a search's cost model chose) decides the kernel
    ``quantize(..., backend="cpu")`` builds; another backend, or one given its own choices,
    ignores it."""
    from mpsearch.backends._kernels import choice_key
    from mpsearch.schemes import get_scheme

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16)).eval()
    w8a8 = get_scheme("w8a8")
    found = CpuBackend().candidates(net[0], w8a8)
    if len(found) < 2:
        pytest.skip("one int8 Linear kernel on this machine: nothing to choose")
    other = found[1]  # not the default
    choice = {choice_key(net[0], w8a8): other.name}
    plan = mps.PrecisionPlan(
        {"0": "w8a8"}, metadata={"kernels": {"backend": "cpu", "choices": choice}}
    )
    plan = mps.PrecisionPlan.from_json(plan.to_json())
    default = type(mps.quantize(net, "w8a8", backend="cpu")[0])
    assert other.build is not default
    assert type(mps.quantize(net, plan, backend="cpu")[0]) is other.build
    assert type(mps.quantize(net, plan, backend=CpuBackend(choices={"x": "y"}))[0]) is default
    assert type(mps.quantize(net, plan, backend="simulate")[0]).__name__ == "SimulatedLayer"


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(16, 64, 16, padding=8),
        nn.Conv1d(16, 64, 8),
        nn.Conv1d(64, 64, 128, padding=64, groups=16),  # wav2vec2's positional conv
        nn.Conv1d(4, 32, 32, stride=2, padding=16),
    ],
    ids=lambda c: f"in{c.in_channels}-k{c.kernel_size[0]}-g{c.groups}",
)
def test_w8a8_conv1d_is_the_integer_convolution_of_its_codes(conv: nn.Conv1d) -> None:
    """oneDNN's int8 conv run as a Conv2d of height 1 (a 1 x K kernel) gave wrong sums on an
    AMX Xeon for 4 to 16 input channels per group and K = 8, 12, 16, 32, 128 (relative error
    about 1; wav2vec2's positional conv in w8a8 ran 0.74 away from fp32). Such geometries now
    run as a K x 1 kernel (``conv1d_as_2d_dim`` probes each): the output is the float64
    convolution of the dequantized codes."""
    torch.manual_seed(0)
    conv = conv.eval()
    x = torch.randn(4, conv.in_channels, 50)
    layer = get_backend("cpu").quantize_layer(conv, mps.get_scheme("w8a8"))
    with torch.inference_mode():
        codes, scale, zero = layer.act(x)
        xd = (codes.double() - float(zero)) * float(scale)
        wd = layer._dense().double() * layer.w_scale.double().reshape(-1, 1, 1, 1)
        expected = F.conv1d(
            xd.reshape(x.shape), wd.reshape(conv.weight.shape), layer.bias.double(),
            conv.stride, conv.padding, conv.dilation, conv.groups,
        )  # fmt: skip
        got = layer(x).double()
    assert float((got - expected).norm() / expected.norm()) < 1e-5

    # a state dict saved by earlier versions holds the 1 x K codes: loaded, the same layer
    old = {k: v.transpose(2, 3) if k == "weight_int8" else v for k, v in layer.state_dict().items()}
    again = get_backend("cpu").quantize_layer(conv, mps.get_scheme("w8a8"))
    again.load_state_dict(old)
    with torch.inference_mode():
        assert torch.equal(again(x), layer(x))


@pytest.mark.parametrize("kernel", [(1, 8), (2, 8), (8, 8), (1, 16)])
def test_w8a8_conv2d_with_wide_kernels_is_close_to_fp32(kernel: tuple[int, int]) -> None:
    """oneDNN's int8 conv gave wrong sums (relative error about 3.5) for these kernels on 16
    input channels on an AMX Xeon; where its probe finds that (``onednn_int8_conv_exact``) the
    layer takes the im2col implementation, and the scheme's own error is left (about 1%)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, kernel, padding=(kernel[0] // 2, kernel[1] // 2)).eval()
    x = torch.randn(2, 16, 12, 30)
    layer = get_backend("cpu").quantize_layer(conv, mps.get_scheme("w8a8"))
    with torch.inference_mode():
        assert float((layer(x) - conv(x)).norm() / conv(x).norm()) < 0.03


def _linear_kernels() -> list[tuple[str, str, object]]:
    """Every kernel the cpu backend has for a Linear layer: (scheme, name, kernel)."""
    from mpsearch.backends._cpu import CPU_IMPLEMENTATIONS, CPU_KERNELS

    found = [(s, k.name, k) for (t, s), k in CPU_KERNELS.items() if t is nn.Linear]
    found += [
        (s, k.name, k) for (t, s), ks in CPU_IMPLEMENTATIONS.items() if t is nn.Linear for k in ks
    ]
    return found


@pytest.mark.parametrize(("scheme", "name", "kernel"), _linear_kernels(), ids=lambda v: str(v)[:20])
def test_every_linear_kernel_takes_a_transposed_input(scheme: str, name: str, kernel) -> None:
    """Mamba's ``x_proj`` is called on ``hidden_states.transpose(1, 2)``: the int8 weight-only
    kernel refused it ("A must be contiguous on the last dimension")."""
    from mpsearch.schemes import get_scheme

    torch.manual_seed(0)
    layer = nn.Linear(64, 24)
    s = get_scheme(scheme)
    if kernel.check is not None and kernel.check(layer, s) is not None:
        pytest.skip(kernel.check(layer, s))
    q = kernel.build(layer, s).eval()
    x = torch.randn(1, 64, 7).transpose(1, 2)  # [1, 7, 64]: its rows a strided view
    assert x.stride(-1) != 1
    with torch.inference_mode():  # the same values (a float GEMM may block them otherwise)
        torch.testing.assert_close(q(x), q(x.contiguous()), rtol=1e-2, atol=1e-2)


def test_a_layer_no_batch_reaches_is_quantized_and_one_read_directly_stays_fp32() -> None:
    """An expert no calibration token reaches is never called but not read either: it is
    quantized as the plan says (it stayed fp32 before, as if read directly); ``gate``'s
    weight is read by the model's own code: it stays fp32."""
    from helpers import ReadsWeights

    from mpsearch.backends._quantize import read_directly

    class WithIdleExpert(ReadsWeights):
        def __init__(self) -> None:
            super().__init__()
            self.idle = nn.Linear(64, 64)  # routed to by no token of these batches

    model = WithIdleExpert().eval()
    x = torch.randn(8, 64)
    assert read_directly(model, [x], ["proj", "gate", "idle", "head"], warn=False) == ["gate"]
    with pytest.warns(UserWarning, match=r"1 layer\(s\) stay fp32.*'gate'"):
        q = mps.quantize(model, "w8a8", backend="cpu", calib=[x])
    assert type(q.gate) is nn.Linear and isinstance(q.idle, RealLayer)
