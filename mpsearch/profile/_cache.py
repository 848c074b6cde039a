"""The profile's row cache: append-only JSONL, keyed by hashes of model, data and settings."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

CODE_VERSION = "profile-3"
"""Bumped whenever the profiler's numbers change for the same inputs (old rows are not reused)."""


def _update_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    h.update(t.numpy().tobytes())


def hash_model(model: nn.Module) -> str:
    """sha256 of the model's class, structure and every state_dict entry's bytes."""
    h = hashlib.sha256()
    h.update(type(model).__qualname__.encode())
    h.update(repr(model).encode())
    for key, value in model.state_dict().items():
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            _update_tensor(h, value)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def hash_batches(batches: Iterable[Any]) -> str:
    """sha256 of calibration batches (structure, dtypes, shapes and bytes of every tensor)."""
    h = hashlib.sha256()
    for batch in batches:
        leaves, spec = pytree.tree_flatten(batch)
        h.update(str(spec).encode())
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                _update_tensor(h, leaf)
            else:
                h.update(repr(leaf).encode())
    return h.hexdigest()


def hash_text(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return value


class RowCache:
    """One JSONL file of profile rows; each line ``{"key": ..., "row": {...}}``.

    Rows are appended and flushed (``fsync``) one by one, so a killed run loses at most the row
    being written. A torn or corrupt line is ignored when reading, and the file is rewritten
    without it (temp file + ``os.replace``) before anything is appended.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        self.dropped = 0
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        good: list[str] = []
        raw = self.path.read_bytes()
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key, row = record["key"], record["row"]
                if not isinstance(key, str) or not isinstance(row, dict):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                self.dropped += 1
                continue
            self.rows[key] = {k: _decode(v) for k, v in row.items()}
            good.append(line.decode())
        if self.dropped or (raw and not raw.endswith(b"\n")):
            self._rewrite(good)

    def _rewrite(self, lines: list[str]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict[str, Any]) -> None:
        record = {"key": key, "row": {k: _encode(v) for k, v in row.items()}}
        line = json.dumps(record, allow_nan=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.rows[key] = dict(row)
