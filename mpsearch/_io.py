"""Atomic file writes: a killed or failed write never leaves a half-written file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed onto ``path`` when the block succeeds.

    A failed or killed write leaves no file at ``path`` (an interrupted one at most leaves
    the hidden temporary, removed here on any exception).

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_path(target) as t:
    ...     _ = t.write_text("done")
    >>> target.read_text()
    'done'
    """
    stem, dot, ext = path.name.partition(".")
    tmp = path.with_name(f".{stem}.{os.getpid()}.tmp{dot}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
