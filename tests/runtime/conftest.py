"""A fake model with known per-input difficulty, run through a tiny plug-in backend.

The model is ``Linear(8, 4)`` reading the class from features 1..4 (one-hot times a
magnitude) and ignoring feature 0, the *marker*. The ``marker`` backend runs a layer exactly,
except that rows whose marker exceeds the scheme's cutoff (``w8a8``: 0.5, ``bf16``: 0.8)
get near-uniform logits pointing at the wrong class: so the cheap variant is wrong, and
unsure, exactly on the marked inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpsearch.backends import BACKENDS, Backend, register_backend
from mpsearch.schemes import Scheme

CUTOFFS = {"w8a8": 0.5, "bf16": 0.8}
N_CLASSES = 4


class MarkerLayer(nn.Module):
    def __init__(self, layer: nn.Linear, cutoff: float) -> None:
        super().__init__()
        self.inner = layer
        self.cutoff = cutoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        marked = x[:, 0] > self.cutoff
        if bool(marked.any()):
            wrong = (out[marked].argmax(-1) + 1) % out.shape[-1]
            out = out.clone()
            out[marked] = 0.01 * nn.functional.one_hot(wrong, out.shape[-1]).to(out.dtype)
        return out


class MarkerBackend(Backend):
    name = "marker"

    def unsupported_reason(self, layer: nn.Module, scheme: Scheme) -> str | None:
        if scheme.name not in CUTOFFS and scheme.name != "fp32":
            return "the marker backend only runs w8a8, bf16 and fp32"
        return None

    def quantize_layer(self, layer, scheme, *, act_range=None):
        return MarkerLayer(layer, CUTOFFS[scheme.name])


@pytest.fixture(autouse=True)
def marker_backend():
    register_backend("marker", MarkerBackend)
    yield
    BACKENDS.pop("marker", None)


def make_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, N_CLASSES, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[:, 1 : 1 + N_CLASSES] = torch.eye(N_CLASSES)
    return model.eval()


def _make_inputs(n: int, *, seed: int, marked: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs and their labels; a ``marked`` share has marker 0.9 (hard for both cheap
    variants), another equal share marker 0.6 (hard for w8a8 only), the rest marker 0."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, N_CLASSES, (n,), generator=g)
    x = torch.zeros(n, 8)
    x[torch.arange(n), 1 + labels] = 4.0 + 6.0 * torch.rand(n, generator=g)
    x[:, 5:] = torch.randn(n, 3, generator=g)
    u = torch.rand(n, generator=g)
    x[u < marked, 0] = 0.9
    x[(u >= marked) & (u < 2 * marked), 0] = 0.6
    return x, labels


@pytest.fixture
def model() -> nn.Module:
    return make_model()


@pytest.fixture
def make_inputs():
    return _make_inputs


@pytest.fixture(params=["c", "portable"])
def ratio_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ratio scorer's path under test: the optional C helper or the portable one."""
    from mpsearch.runtime import _scorers

    if request.param == "portable":
        monkeypatch.setattr(_scorers, "_topgap", None)
    elif _scorers._topgap is None:
        pytest.skip("built without a C compiler: only the portable path exists")
    return request.param
