"""Helpers shared by tests (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import torch


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref``, in dB."""
    ref, out = ref.detach(), out.detach()
    noise = (ref.float() - out.float()).pow(2).mean()
    return float(10 * torch.log10(ref.float().pow(2).mean() / noise))
