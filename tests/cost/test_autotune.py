"""The autotuner: every implementation of a (layer, scheme) timed on its real input, the
fastest kept, the picks cached per machine and torch version."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from mpsearch.backends import Kernel
from mpsearch.backends._kernels import KernelBackend, RealLayer, choice_key
from mpsearch.cost import measure_cost
from mpsearch.cost._autotune import TuneCache, Tuned, fastest, machine_key
from mpsearch.schemes import get_scheme

CALLS: dict[str, int] = {}


def _busy(seconds: float) -> None:
    """Spin for ``seconds`` of wall time (a kernel of known cost)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _Sleeper(RealLayer):
    """A real-layer stand-in that costs a known time per call (and counts its calls)."""

    def __init__(self, layer: nn.Module, label: str, seconds: float) -> None:
        super().__init__()
        self.inner, self.label, self.seconds = layer, label, seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS[self.label] = CALLS.get(self.label, 0) + 1
        _busy(self.seconds)
        return self.inner(x)


def _kernel(label: str, seconds: float) -> Kernel:
    return Kernel(
        lambda layer, scheme, *, act_range=None: _Sleeper(layer, label, seconds), label, name=label
    )


_DEFAULT = {(nn.Linear, "fp32"): _kernel("slow", 0.004)}
_OTHERS = {(nn.Linear, "fp32"): (_kernel("fast", 0.001),)}


class _FakeBackend(KernelBackend):
    name = "fake-tuned"
    kernels = _DEFAULT
    implementations = _OTHERS


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def _cost(cache_dir: Path | None = None, **options: object):
    return measure_cost(
        _net(), torch.randn(2, 8), schemes=["fp32"], backend=_FakeBackend(), repeats=5,
        warmup=1, cache_dir=cache_dir, **options,
    )  # fmt: skip


def test_the_faster_of_two_fake_kernels_with_known_costs_wins() -> None:
    cost = _cost()
    assert set(cost.table["kernel"]) == {"fast"}
    tuning = cost.tuning.set_index(["layer", "kernel"])
    for layer in ("0", "2"):
        slow, fast = (
            tuning.loc[(layer, "slow"), "latency_ms"],
            tuning.loc[(layer, "fast"), "latency_ms"],
        )
        assert slow >= 4.0 and fast >= 1.0 and fast < slow  # busy-waits: never shorter
        assert bool(tuning.loc[(layer, "fast"), "chosen"])
    layer = nn.Linear(8, 8)
    built = cost.backend.quantize_layer(layer, get_scheme("fp32"))
    assert built.label == "fast"  # the cost model's backend builds what it timed
    assert _FakeBackend().quantize_layer(layer, get_scheme("fp32")).label == "slow"


def test_autotune_off_keeps_the_default() -> None:
    cost = _cost(autotune=False)
    assert set(cost.table["kernel"]) == {"slow"} and cost.tuning.empty


def test_picks_are_reused_from_the_machine_cache(tmp_path: Path) -> None:
    first = _cost(tmp_path)
    files = list(tmp_path.glob("autotune-*.json"))
    assert len(files) == 1
    CALLS.clear()
    # a new cost measurement (other model bytes: no cost-cache hit) on the same machine
    wider = measure_cost(
        nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).eval(), torch.randn(2, 8),
        schemes=["fp32"], backend=_FakeBackend(), repeats=5, warmup=1, cache_dir=tmp_path,
    )  # fmt: skip
    assert set(wider.table["kernel"]) == {"fast"} == set(first.table["kernel"])
    # the slow kernel ran in the one pass that records each layer's input, and was not timed
    # again (a timing is warmup + repeats = 6 calls per layer)
    assert CALLS.get("slow", 0) == 2


def test_cache_is_keyed_by_machine_and_torch_version(tmp_path: Path) -> None:
    meta = {
        "device": "cpu A",
        "torch": "2.13.0",
        "backend": "cpu",
        "num_threads": 2,
        "timer": "wall",
    }
    cache = TuneCache(tmp_path, meta)
    cache.put("k", Tuned("fast", {"slow": 2.0, "fast": 1.0}, {}))
    cache.save()
    assert TuneCache(tmp_path, meta).get("k") == Tuned("fast", {"slow": 2.0, "fast": 1.0}, {})
    for field, value in (("torch", "2.14.0"), ("device", "cpu B"), ("num_threads", 1)):
        other = {**meta, field: value}
        assert machine_key(other) != machine_key(meta)
        assert TuneCache(tmp_path, other).get("k") is None


def test_fastest_keeps_the_default_on_a_tie_and_skips_failures() -> None:
    assert fastest(["a", "b"], {"a": 1.0, "b": 0.99}.__getitem__).choice == "a"

    def broken(name: str) -> float:
        if name == "b":
            raise RuntimeError("no kernel for this shape")
        return 1.0

    tuned = fastest(["a", "b"], broken)
    assert tuned.choice == "a" and "no kernel" in tuned.errors["b"]
    assert tuned.times_ms["b"] == float("inf")


def test_choice_key_names_scheme_and_geometry() -> None:
    a = choice_key(nn.Conv1d(1, 8, 512, stride=4), get_scheme("w8a8"))
    assert a.startswith("w8a8 ") and "512" in a and "stride=(4,)" in a
    assert a != choice_key(nn.Conv1d(1, 8, 512, stride=2), get_scheme("w8a8"))


def test_tuning_summary_counts_the_switches() -> None:
    line = _cost().tuning_summary()
    assert "2 (layer, scheme) pairs" in line and "2 run a faster one" in line and "fast x2" in line
    assert "nothing to choose" in _cost(autotune=False).tuning_summary()


class _WarmOnly(RealLayer):
    """Fast only on the input it saw last (a warm cache), slow on a new one: it wins timed
    alone (one input over and over) and loses inside the model (a new input every call)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.inner, self.last = layer, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _busy(0.0005 if x is self.last else 0.008)
        self.last = x
        return self.inner(x)


_WARM = {
    (nn.Linear, "fp32"): (
        Kernel(lambda layer, scheme, *, act_range=None: _WarmOnly(layer), "warm", name="warm"),
    )
}
_STEADY = {(nn.Linear, "fp32"): _kernel("steady", 0.003)}


class _WarmBackend(KernelBackend):
    name = "fake-warm"
    kernels = _STEADY
    implementations = _WARM


def test_picks_that_lose_end_to_end_are_dropped() -> None:
    cost = measure_cost(
        _net(), torch.randn(2, 8), schemes=["fp32"], backend=_WarmBackend(), repeats=5, warmup=1
    )
    # timed alone the warm kernel won (0.5 ms vs 3 ms); in the model it costs 8 ms a call
    alone = cost.tuning.set_index(["layer", "kernel"])["latency_ms"]
    assert alone[("0", "warm")] < alone[("0", "steady")]
    assert set(cost.table["kernel"]) == {"steady"} and not cost.backend.choices
    assert set(cost.tuning.loc[cost.tuning["chosen"].astype(bool), "kernel"]) == {"steady"}
