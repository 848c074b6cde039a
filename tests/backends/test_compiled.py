"""The ``cpu-inductor`` backend: the quantized model compiled whole by Inductor, or eager with
the reason why not."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn

import mpsearch as mps
from mpsearch.backends import get_backend, storage_bytes
from mpsearch.backends._compiled import (
    CompiledModel,
    CpuInductorBackend,
    _compile_settings,
    check_against,
    rounding_floor,
)
from mpsearch.backends._conv import Im2colInt8Conv
from mpsearch.backends._kernels import (
    FbgemmInt8Linear,
    Int8Conv,
    Int8Linear,
    choice_key,
    onednn_twin,
    onednn_u8s8_saturates,
)
from mpsearch.cost import held_bytes

# Inductor calls the eager model's own kernels; what it fuses around them (casts, activation
# quantization, ReLU) moves outputs by float32 rounding, or by bf16 rounding (2**-8) where
# bf16 values are fused (a cast to bf16 and back skipped, bf16 ops run in float32).
MAX_RELATIVE_ERROR = {"fp32": 1e-5, "w8a8": 1e-5, "bf16": 1e-2, "mixed": 1e-2}

MIXED = {
    "conv": {"conv1": "w8a8", "conv2": "bf16", "fc1": "w8a8", "fc2": "fp32"},
    "mlp": {"0": "w8a8", "2": "w4a16", "4": "bf16"},
}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 10)
    ).eval()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.fixture(autouse=True)
def _always_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled output is checked here, not speed: keep the compiled model even where these
    small models run faster eagerly (test_race_keeps_the_faster_model covers the race)."""
    monkeypatch.setattr(CompiledModel, "race", False)


def _compiled_against_eager(model: nn.Module, plan: object, x: torch.Tensor, **kw: object):
    compiled = mps.quantize(model, plan, backend="cpu-inductor", **kw)
    eager = mps.quantize(model, plan, backend="cpu", **kw)
    return compiled, compiled(x), eager(x)


def test_backend_is_registered_and_keeps_the_cpu_kernels() -> None:
    assert "cpu-inductor" in mps.BACKENDS
    backend = get_backend("cpu-inductor")
    assert isinstance(backend, CpuInductorBackend) and backend.real
    assert backend.kernel_table() == get_backend("cpu").kernel_table()
    assert type(backend.tuned({"k": "v"})) is CpuInductorBackend


def test_quantize_wraps_the_eager_model_and_counts_its_tensors() -> None:
    net = _mlp()
    plan = {"0": "w8a8", "2": "w8a16"}
    compiled = mps.quantize(net, plan, backend="cpu-inductor")
    eager = mps.quantize(net, plan, backend="cpu")
    assert isinstance(compiled, CompiledModel)
    assert compiled.mpsearch_backend == "cpu-inductor"
    assert compiled.mpsearch_assignment == {"0": "w8a8", "2": "w8a16", "4": "fp32"}
    assert compiled.mpsearch_compile["mode"] == "pending"
    assert storage_bytes(compiled) == storage_bytes(eager)
    assert held_bytes(compiled) == held_bytes(eager)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert compiled.get_submodule("0") is compiled.eager.get_submodule("0")


@pytest.mark.parametrize("static", [False, True])
def test_int8_layers_trace_into_one_graph(
    tiny_cnn: nn.Module, tiny_input: torch.Tensor, static: bool
) -> None:
    """The oneDNN int8 layers, the im2col one included, keep a dynamic range's scale and zero
    point as tensors (a fixed range's are constants): Dynamo traces the eager model whole
    (``float(scale)`` broke the graph at each layer)."""
    calib = [tiny_input] if static else None
    eager = mps.quantize(tiny_cnn, "w8a8", backend="cpu", calib=calib)
    assert {Int8Conv, Int8Linear} <= {type(m) for m in eager.modules()}
    act_range = (-1.0, 2.0) if static else None
    im2col = Im2colInt8Conv(
        nn.Conv2d(1, 4, 3, padding=1),
        mps.get_scheme("w8a8"),
        act_range=act_range,
        linear=Int8Linear,
    )
    for model in (eager, nn.Sequential(im2col, nn.ReLU())):
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(tiny_input)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, type(model)


def test_w8a8_linear_takes_inductors_int8_gemm_template_under_max_autotune() -> None:
    """Inductor's int8 GEMM template takes only a frozen constant weight zero point: one
    module-level 0-d zero (a graph input to Dynamo) left every int8 Linear on oneDNN's kernel,
    batch-1 Llama decoding at 2.4x the time. With the template the only GEMM backend, no
    oneDNN call is left at run time."""
    net = _mlp()
    x = torch.randn(1, 64)
    eager = mps.quantize(net, "w8a8", backend="cpu", calib=[torch.randn(16, 64)])
    torch._dynamo.reset()
    with (
        _compile_settings(autotune=True),
        inductor_config.patch(max_autotune_gemm_backends="CPP"),
        torch.no_grad(),
    ):
        compiled = torch.compile(eager)
        compiled(x)
        with torch.profiler.profile() as prof:
            got = compiled(x)
        want = eager(x)
    assert not [e.key for e in prof.key_averages() if "qlinear" in e.key]
    assert _relative_error(got, want) < MAX_RELATIVE_ERROR["w8a8"] * 10


needs_twins = pytest.mark.skipif(
    onednn_u8s8_saturates() or "fbgemm" not in torch.backends.quantized.supported_engines,
    reason="oneDNN's u8 x s8 products saturate here, or fbgemm is missing",
)


@needs_twins
@pytest.mark.parametrize("act_range", [None, (-2.0, 3.0)])
def test_onednn_twin_computes_the_fbgemm_layer_with_the_same_bytes(act_range: object) -> None:
    torch.manual_seed(0)
    fbgemm = FbgemmInt8Linear(nn.Linear(64, 48), mps.get_scheme("w8a8"), act_range=act_range)
    twin = onednn_twin(fbgemm)
    x = torch.randn(5, 64)
    assert type(twin) is Int8Linear and torch.equal(twin._dense(), fbgemm._dense())
    torch.testing.assert_close(twin(x), fbgemm(x), rtol=1e-5, atol=1e-5)
    assert storage_bytes(twin) == storage_bytes(fbgemm)
    assert list(twin.state_dict()) == list(fbgemm.state_dict())


@needs_twins
def test_fbgemm_layers_compile_as_their_onednn_twins_and_come_back_eagerly() -> None:
    """The autotuner's eager pick (fbgemm) breaks Inductor's graph at each layer: the compiled
    model runs oneDNN twins, and puts the fbgemm layers back where it runs eagerly."""
    net, x = _mlp(), torch.randn(4, 64)
    choices = {
        choice_key(m, mps.get_scheme("w8a8")): "fbgemm"
        for m in net.modules()
        if isinstance(m, nn.Linear)
    }
    impl = get_backend("cpu-inductor").tuned(choices)
    compiled = mps.quantize(net, "w8a8", backend=impl, calib=[x])
    eager = mps.quantize(net, "w8a8", backend=get_backend("cpu").tuned(choices), calib=[x])
    assert {type(m) for m in eager.modules()} >= {FbgemmInt8Linear}
    assert FbgemmInt8Linear not in {type(m) for m in compiled.modules()}
    got = compiled(x)
    assert compiled.mpsearch_compile["mode"] == "inductor", compiled.mpsearch_compile
    assert "3 fbgemm int8 Linear layer(s) on oneDNN's kernel" in compiled.mpsearch_compile["reason"]
    assert _relative_error(got, eager(x)) < 1e-5
    with pytest.warns(RuntimeWarning, match="running the quantized model eagerly"):
        compiled._fall_back("for the test")
    assert [type(m) for m in compiled.eager.modules()] == [type(m) for m in eager.modules()]


def test_no_cpp_compiler_falls_back_to_eager_with_the_reason() -> None:
    net = _mlp()
    compiled = mps.quantize(net, "w8a8", backend="cpu-inductor")
    x = torch.randn(4, 64)
    no_compiler = inductor_config.patch({"cpp.cxx": ("mpsearch-no-such-compiler",)})
    with no_compiler, pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        got = compiled(x)
    assert compiled.mpsearch_compile["mode"] == "eager"
    assert "mpsearch-no-such-compiler" in compiled.mpsearch_compile["reason"]
    assert torch.equal(got, mps.quantize(net, "w8a8", backend="cpu")(x))


@torch.library.custom_op("mpsearch_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:  # no fake kernel: Dynamo cannot trace it
    return x.clone()


class _Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _opaque(x) * 2


class _ComputesOtherwiseWhenCompiled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1 if torch.compiler.is_compiling() else x


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (_Untraceable(), "compilation failed"),
        pytest.param(
            _ComputesOtherwiseWhenCompiled(), "differs from eager", marks=pytest.mark.slow
        ),
    ],
)
def test_failed_compilation_or_check_falls_back_to_eager(module: nn.Module, reason: str) -> None:
    compiled = CompiledModel(module)
    x = torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match=reason):
        compiled(x)
    assert compiled.mpsearch_compile["mode"] == "eager"
    assert reason in compiled.mpsearch_compile["reason"]
    assert torch.equal(compiled(x), module(x))  # eager from now on


@pytest.mark.slow
def test_mixed_mlp_compiles_and_matches_eager() -> None:
    compiled, got, want = _compiled_against_eager(_mlp(), MIXED["mlp"], torch.randn(8, 64))
    assert compiled.mpsearch_compile["mode"] == "inductor", compiled.mpsearch_compile
    assert _relative_error(got, want) <= MAX_RELATIVE_ERROR["mixed"]
    again = pickle.loads(pickle.dumps(compiled))  # the eager model travels, not the graphs
    assert again.mpsearch_compile["mode"] == "pending"
    assert torch.equal(again.eager(torch.ones(2, 64)), compiled.eager(torch.ones(2, 64)))


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["fp32", "bf16", "w8a8", "mixed"])
@pytest.mark.parametrize("static", [False, True])
def test_compiled_conv_net_matches_eager(
    tiny_cnn: nn.Module, tiny_input: torch.Tensor, plan: str, static: bool
) -> None:
    calib = [tiny_input] if static else None
    plan_ = MIXED["conv"] if plan == "mixed" else plan
    compiled, got, want = _compiled_against_eager(tiny_cnn, plan_, tiny_input, calib=calib)
    assert compiled.mpsearch_compile["mode"] == "inductor", compiled.mpsearch_compile
    assert _relative_error(got, want) <= MAX_RELATIVE_ERROR[plan]
    assert torch.equal(compiled(tiny_input), got)


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["fp32", "bf16", "w8a8"])
def test_compiled_mlp_matches_eager_on_two_shapes(plan: str) -> None:
    net = _mlp()
    compiled = mps.quantize(net, plan, backend="cpu-inductor")
    eager = mps.quantize(net, plan, backend="cpu")
    for batch in (8, 3):
        x = torch.randn(batch, 64)
        assert _relative_error(compiled(x), eager(x)) <= MAX_RELATIVE_ERROR[plan]
    assert compiled.mpsearch_compile == {
        "mode": "inductor",
        "reason": "compiled by Inductor for 2 input signature(s)",
    }


@pytest.mark.slow
def test_a_guard_failing_beyond_the_signature_compiles_again_frozen() -> None:
    net = _mlp()
    compiled = mps.quantize(net, "w8a8", backend="cpu-inductor")
    x = torch.randn(4, 64)
    want = mps.quantize(net, "w8a8", backend="cpu")(x)
    compiled(x)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(not before)  # Dynamo guards on it: a new graph, unfrozen
    try:
        got = compiled(x)
    finally:
        torch.use_deterministic_algorithms(before)
    assert compiled.mpsearch_compile["mode"] == "inductor", compiled.mpsearch_compile
    assert _relative_error(got, want) <= MAX_RELATIVE_ERROR["w8a8"]


@pytest.mark.slow
def test_race_keeps_the_faster_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CompiledModel, "race", True)
    net, x = _mlp(), torch.randn(4, 64)
    compiled = mps.quantize(net, "fp32", backend="cpu-inductor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        state = compiled.warmup(x)
    timed = compiled.timings_ms
    assert timed["compiled"] > 0 and timed["eager"] > 0
    kept = "inductor" if timed["compiled"] < timed["eager"] else "eager"
    assert state["mode"] == kept
    assert f"{timed['compiled']:.3g} ms vs" in state["reason"]


def _threshold(x: torch.Tensor) -> torch.Tensor:
    """1 + (x > 0.5): at x = 0.5, any upward nudge flips an output from 1 to 2."""
    return 1 + (x > 0.5).float()


def test_rounding_floor_is_how_far_the_eager_output_moves_under_input_noise() -> None:
    at_edge = torch.full((4000,), 0.5)
    moved = rounding_floor(_threshold, (at_edge,), {}, _threshold(at_edge))
    assert moved == pytest.approx((2000 / 4000) ** 0.5, abs=0.05)  # about half flip up
    smooth = torch.randn(4000)
    assert rounding_floor(lambda x: 2 * x, (smooth,), {}, 2 * smooth) < 3e-5
    ids = torch.arange(10)
    assert rounding_floor(lambda t: t.float(), (ids,), {}, ids.float()) == 0.0  # no float input


def test_the_compiled_check_allows_the_eager_plans_own_rounding_noise() -> None:
    x = torch.full((4000,), 0.5)
    expected = _threshold(x)
    # 0.3 apart: beyond CHECK_RTOL, within the eager function's own move (about 0.7)
    assert check_against(_threshold, expected * 1.3, expected, (x,), {}) is None
    reason = check_against(_threshold, expected * 2, expected, (x,), {})
    assert reason is not None and "(relative L2 > the eager output's own move 0." in reason
    # a smooth function moves by about 1e-5: the plain tolerance decides
    reason = check_against(lambda t: 2 * t, 2 * x * 1.02, 2 * x, (x,), {})
    assert reason == "compiled output differs from eager by 0.02 (relative L2 > 0.01)"
