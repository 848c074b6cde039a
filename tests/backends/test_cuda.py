from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import mpsearch as mps
from mpsearch.backends._cuda import CudaBackend

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine: cuda backend not run"
)


def test_import_does_not_touch_cuda() -> None:
    code = "import torch, mpsearch, mpsearch.cost; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cuda_backend_is_registered() -> None:
    assert "cuda" in mps.BACKENDS
    assert isinstance(mps.get_backend("cuda"), CudaBackend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_the_backend_says_why() -> None:
    reason = CudaBackend().unavailable_reason()
    assert reason is not None and "CUDA" in reason
    with pytest.raises(ValueError, match="no CUDA device"):
        mps.quantize(nn.Sequential(nn.Linear(8, 8)), "bf16", backend="cuda")


@needs_cuda
@pytest.mark.parametrize("scheme", ["bf16", "fp16", "w8a8", "fp8", "w4a16"])
def test_cuda_linear_runs(scheme: str) -> None:
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    qnet = mps.quantize(net, scheme, backend="cuda")
    x = torch.randn(16, 256)
    ref = net(x)
    out = qnet(x.cuda()).cpu()
    noise = (ref - out).pow(2).sum()
    assert float(10 * torch.log10(ref.pow(2).sum() / noise)) >= 20.0
