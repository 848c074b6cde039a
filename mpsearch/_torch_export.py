"""``torch.export.export`` without the partial graph it prints when it fails."""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any

import torch
from torch import nn


def quiet_export(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, **options: Any
) -> torch.export.ExportedProgram:
    """``torch.export.export(model, args, kwargs, **options)``; where it fails on a
    data-dependent value, the partial graph torch prints to stderr stays on the exception
    (``partial_fx_graph``) and is not printed. Callers that try an export and fall back say why
    in one line; torch printed a detection model's (SSDlite) 650 lines twice per attempt.
    Everything else written to stderr meanwhile is written after the call."""
    buffer, printed = io.StringIO(), ""
    try:
        with contextlib.redirect_stderr(buffer):
            return torch.export.export(model, args, kwargs, **options)
    except Exception as exc:
        graph = getattr(exc, "partial_fx_graph", None)
        printed = f"{graph}\n" if isinstance(graph, str) and graph else ""
        raise
    finally:
        rest = buffer.getvalue().replace(printed, "") if printed else buffer.getvalue()
        if rest:
            sys.stderr.write(rest)
