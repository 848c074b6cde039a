"""The profiler's float32 emulation of bf16/fp16 simulate layers matches the real kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpsearch.backends import get_backend
from mpsearch.backends._simulate import SimulatedLayer
from mpsearch.profile import _emulate, profile
from mpsearch.profile._emulate import (
    EmulatedLayer,
    compute_paths,
    native_is_faster,
    profile_layer,
)
from mpsearch.schemes import get_scheme


def _layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {
        "conv2d": (nn.Conv2d(16, 32, 3, padding=1).eval(), torch.randn(4, 16, 8, 8, generator=g)),
        "conv1d": (nn.Conv1d(16, 32, 5, bias=False).eval(), torch.randn(4, 16, 20, generator=g)),
        "linear": (nn.Linear(64, 32).eval(), torch.randn(8, 64, generator=g)),
    }


@pytest.mark.parametrize("scheme", ["bf16", "fp16", "w4a16", "w8a16"])
@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "linear"])
def test_emulation_matches_the_real_reduced_precision_kernel(kind: str, scheme: str) -> None:
    layer, x = _layers()[kind]
    s = get_scheme(scheme)
    if s.applicability_error(tuple(layer.weight.shape)):
        pytest.skip("scheme does not apply to this shape")
    real, fast = SimulatedLayer(layer, s), EmulatedLayer(layer, s)
    with torch.inference_mode():
        y_real, y_fast = real(x), fast(x)
    assert y_fast.dtype == y_real.dtype == torch.float32
    # same products, float32 sums in another order: at most one step of the output format
    eps = 2.0**-7 if s.compute_dtype == "bf16" else 2.0**-10
    tol = eps * y_real.abs() + 1e-5 * float(y_real.abs().max())
    assert bool(((y_fast - y_real).abs() <= tol).all())
    # and most outputs are bit-identical
    assert float((y_fast == y_real).float().mean()) > 0.9


@pytest.mark.parametrize(
    ("flags", "bf16", "fp16"),
    [
        ({"avx2", "fma"}, False, False),  # B: no bf16 unit
        ({"avx2", "avx512f", "avx512_bf16"}, True, False),  # C
        ({"avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16"}, True, True),
    ],
)
def test_native_compute_follows_the_cpus_units_in_every_process(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], bf16: bool, fp16: bool
) -> None:
    """The choice is the CPU's, not a timing race: a study's worker processes measured
    different profiles when a loaded machine flipped the race in one of them."""
    monkeypatch.setattr(_emulate, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(_emulate, "_measured_native_is_faster", _never_timed)
    _emulate.native_is_faster.cache_clear()
    try:
        assert native_is_faster(torch.bfloat16) is bf16
        assert native_is_faster(torch.float16) is fp16
    finally:
        _emulate.native_is_faster.cache_clear()


def _never_timed(dtype: torch.dtype) -> bool:
    raise AssertionError("timed although the CPU lists its flags")


def test_native_compute_is_measured_where_the_cpu_lists_no_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_emulate, "cpu_flags", frozenset)
    _emulate.native_is_faster.cache_clear()
    try:
        got = native_is_faster(torch.bfloat16)
        assert isinstance(got, bool)
        assert native_is_faster(torch.bfloat16) is got  # measured once per process
    finally:
        _emulate.native_is_faster.cache_clear()


def test_profile_layer_emulates_only_reduced_precision_compute_this_cpu_runs_slowly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    impl = get_backend("simulate")
    layer = nn.Linear(64, 64)
    native = native_is_faster(torch.bfloat16)
    assert native is native_is_faster(torch.bfloat16)  # decided once per process
    bf16_kind = SimulatedLayer if native else EmulatedLayer
    assert type(profile_layer(impl, layer, get_scheme("bf16"))) is bf16_kind
    assert type(profile_layer(impl, layer, get_scheme("w4a16"))) is bf16_kind
    assert compute_paths(impl, [get_scheme("w4a16")]) == {
        "bf16": "native" if native else "emulated"
    }
    for slow in (True, False):  # either answer on this machine
        monkeypatch.setattr(_emulate, "native_is_faster", lambda dtype, slow=slow: not slow)
        kind = EmulatedLayer if slow else SimulatedLayer
        assert type(profile_layer(impl, layer, get_scheme("bf16"))) is kind
        rnn = profile_layer(impl, nn.LSTM(32, 32), get_scheme("w4a16"))  # loop or fused kernel
        assert (rnn.fused is None) is slow
    assert type(profile_layer(impl, layer, get_scheme("w8a8"))) is SimulatedLayer
    assert type(profile_layer(impl, layer, get_scheme("fp32"))) is SimulatedLayer


def test_native_and_emulated_profiles_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whichever path this CPU takes, the profile's numbers are those of the other path up to
    the order of float32 sums; the path is recorded in ``info`` and the cache key."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10)
    ).eval()
    calib = [torch.randn(16, 32, 8, 8) for _ in range(2)]
    tables = {}
    for native in (True, False):
        monkeypatch.setattr(_emulate, "native_is_faster", lambda dtype, n=native: n)
        prof = profile(model, calib, schemes=["bf16", "w4a16"], progress=False)
        assert prof.info["compute"] == {"bf16": "native" if native else "emulated"}
        tables[native] = prof.table.set_index(["layer", "scheme"])
    for column in ("mse", "e2e"):
        a, b = tables[True][column], tables[False][column]
        assert bool((a > 0).all())
        assert float(((a - b).abs() / b).max()) < 0.01, column  # measured: 3e-4


def test_an_expert_bank_emulates_its_expert_linears_where_bf16_is_slow(monkeypatch) -> None:
    """A bank of Hugging Face's expert interface is profiled as its expert Linear layers, each
    emulated on a CPU without bf16 units (as a Linear is), not run in slow native bf16."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from mpsearch.layers._expert_linears import ExpertLinears

    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_local_experts=4)
    bank = MixtralExperts(cfg).eval()
    monkeypatch.setattr(_emulate, "cpu_flags", lambda: frozenset({"avx2"}))
    _emulate.native_is_faster.cache_clear()
    try:
        q = profile_layer(get_backend("simulate"), bank, get_scheme("w4a16"))
    finally:
        _emulate.native_is_faster.cache_clear()
    assert isinstance(q, ExpertLinears)
    assert {type(m).__name__ for m in [*q.up, *q.down]} == {"EmulatedLayer"}
