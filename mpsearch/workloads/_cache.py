"""On-disk cache of trained workload weights: keyed, validated on read, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpsearch._validation import invalid
from mpsearch.cost._timing import threads

CACHE_VERSION = 1
"""Bumped whenever a change to a builder would make previously cached weights wrong."""

TRAIN_THREADS = 1
"""Intra-op threads used while training: results do not depend on the machine's thread count,
and tiny models train many times faster on one thread when other processes load the CPU."""

_FORMAT = "mpsearch.workload-weights"
_ENV_VAR = "MPSEARCH_CACHE"


class CacheWarning(RuntimeWarning):
    """A cache file could not be read or written; the workload was (re)built without it."""


def default_cache_dir() -> Path:
    """Where trained workload weights are kept unless ``cache_dir`` is given.

    ``$MPSEARCH_CACHE/workloads`` when the ``MPSEARCH_CACHE`` environment variable is set,
    else ``~/.cache/mpsearch/workloads``.

    >>> default_cache_dir().name
    'workloads'
    """
    root = os.environ.get(_ENV_VAR, "").strip()
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "mpsearch"
    return base / "workloads"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` as a ``Path``, or the default when it is ``None``.

    >>> resolve_cache_dir("/tmp/x")
    PosixPath('/tmp/x')
    """
    if cache_dir is None:
        return default_cache_dir()
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise invalid("cache_dir", cache_dir, "a path (str or os.PathLike) or None")
    return Path(cache_dir).expanduser()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable ``parts`` (hyperparameters, data digests).

    >>> fingerprint({"lr": 0.01}) == fingerprint({"lr": 0.01})
    True
    """
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cache_path(cache_dir: Path, name: str, *, seed: int, key: str) -> Path:
    """The cache file of workload ``name`` trained with ``seed`` under hyperparameter key ``key``.

    >>> cache_path(Path("/c"), "mlp", seed=0, key="abc").name
    'mlp-seed0-v1-abc.pt'
    """
    return cache_dir / f"{name}-seed{seed}-v{CACHE_VERSION}-{key}.pt"


def _read(path: Path, model: nn.Module, *, name: str, seed: int, key: str) -> dict[str, Any]:
    """Load and check a cache file against ``model``; raise ``ValueError`` if anything is off."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError(f"payload is a {type(payload).__name__}, not a dict")
    expected = {"format": _FORMAT, "version": CACHE_VERSION, "name": name, "seed": seed, "key": key}
    for field, value in expected.items():
        if payload.get(field) != value:
            raise ValueError(f"field {field!r} is {payload.get(field)!r}, expected {value!r}")
    state = payload.get("state_dict")
    info = payload.get("info")
    if not isinstance(state, dict) or not isinstance(info, dict):
        raise ValueError("missing 'state_dict' or 'info'")
    reference = model.state_dict()
    if set(state) != set(reference):
        missing = sorted(set(reference) - set(state))
        extra = sorted(set(state) - set(reference))
        raise ValueError(f"state_dict keys differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for param_name, expected_tensor in reference.items():
        tensor = state[param_name]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{param_name!r} is not a tensor")
        if tensor.shape != expected_tensor.shape or tensor.dtype != expected_tensor.dtype:
            raise ValueError(
                f"{param_name!r} is {tuple(tensor.shape)} {tensor.dtype}, expected "
                f"{tuple(expected_tensor.shape)} {expected_tensor.dtype}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{param_name!r} holds non-finite values")
    return payload


def _write(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(payload), handle)
            handle.flush()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), 0o644)  # mkstemp makes 0600; the cache may be shared
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_or_train(
    name: str,
    *,
    seed: int,
    cache_dir: Path,
    key: str,
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], dict[str, Any]],
) -> tuple[nn.Module, dict[str, Any]]:
    """Return ``(model, info)``: from the cache when a valid file exists, else trained and cached.

    ``build`` makes a fresh model and ``train`` trains it in place, returning JSON-like facts
    about the run; both run under ``torch.manual_seed(seed)`` inside a forked RNG, so the
    caller's random state is untouched and a retrained model equals the cached one; training
    runs on ``TRAIN_THREADS`` intra-op threads (restored afterwards). A cache
    file that cannot be read or does not match the model is reported with a ``CacheWarning``
    and replaced.

    >>> model, info = load_or_train("m", seed=0, cache_dir=tmp, key="k",
    ...                             build=lambda: nn.Linear(2, 2),
    ...                             train=lambda m: {})  # doctest: +SKIP
    """
    key = fingerprint(key, TRAIN_THREADS)
    path = cache_path(cache_dir, name, seed=seed, key=key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    if path.exists():
        try:
            payload = _read(path, model, name=name, seed=seed, key=key)
        except Exception as error:  # any unreadable or mismatched file is rebuilt, never trusted
            warnings.warn(
                f"Ignoring the unusable workload cache file {str(path)!r} ({error}); retraining.",
                CacheWarning,
                stacklevel=3,
            )
        else:
            model.load_state_dict(payload["state_dict"], strict=True)
            model.eval()
            info = dict(payload["info"])
            info.update(from_cache=True, cache_file=str(path))
            return model, info

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), threads(TRAIN_THREADS):
        torch.manual_seed(seed)
        model = build()
        info = dict(train(model))
    model.eval()
    info.update(train_seconds=round(time.perf_counter() - start, 3), train_threads=TRAIN_THREADS)
    payload = {
        "format": _FORMAT,
        "version": CACHE_VERSION,
        "name": name,
        "seed": seed,
        "key": key,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "info": info,
    }
    try:
        _write(path, payload)
    except OSError as error:
        warnings.warn(
            f"Could not write the workload cache file {str(path)!r} ({error}); "
            "the model will be retrained next time.",
            CacheWarning,
            stacklevel=3,
        )
    info = dict(info)
    info.update(from_cache=False, cache_file=str(path))
    return model, info
