"""The cost cache: one JSON file per (device, model layer shapes, schemes, backend, settings),
written atomically (temp file + ``os.replace``) and checked on reading (format, key, checksum)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

CACHE_FORMAT = 1


class CostCacheWarning(UserWarning):
    """A cost cache file was found but not trusted (torn, stale or edited); it is re-measured."""


def cache_key(fields: dict[str, Any]) -> str:
    """A stable hash of everything the measurements depend on."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _checksum(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def write_cache(path: Path, key: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` under ``key`` to ``path`` atomically: readers see the old file or the
    whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "format": CACHE_FORMAT,
        "key": key,
        "checksum": _checksum(payload),
        "payload": payload,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The payload stored at ``path`` for ``key``; ``None`` (with a warning when a file exists)
    if it is missing, torn, of another format, for another key or fails its checksum."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        problem = None
        if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT:
            problem = "it has another format version"
        elif record.get("key") != key:
            problem = "it was measured for another device, model, scheme list or backend"
        elif record.get("checksum") != _checksum(record.get("payload")):
            problem = "its checksum does not match its content"
    except (OSError, ValueError) as exc:
        problem = f"it cannot be read ({type(exc).__name__}: {exc})"
    if problem:
        warnings.warn(
            f"Ignoring cost cache {path}: {problem}; measuring again.",
            CostCacheWarning,
            stacklevel=3,
        )
        return None
    return record["payload"]
