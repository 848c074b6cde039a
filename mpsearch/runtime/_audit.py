"""The audit log: one row per served input, bounded in memory, optionally mirrored to disk.

Rows arrive in blocks (one block per served call). A block is a list of row tuples or any
object with ``len()`` and a ``rows()`` method returning them: the controller appends one
compact record per call and its rows are only expanded when the log is read (``frame()``) or
written to a sink, which keeps the per-call cost of auditing to a few microseconds.
"""

from __future__ import annotations

import csv
import json
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

import pandas as pd

from mpsearch._validation import invalid

SINK_FORMATS = (".csv", ".jsonl")


class RowBlock(Protocol):
    """A block of audit rows expanded on demand."""

    def __len__(self) -> int: ...

    def rows(self) -> list[tuple[Any, ...]]: ...


def _rows(block: Any) -> list[tuple[Any, ...]]:
    return block if isinstance(block, list) else block.rows()


class AuditLog:
    """A thread-safe ring buffer of decision rows with an optional CSV / JSONL sink.

    Only the newest ``max_rows`` rows stay in memory; every row also goes to ``sink`` (a
    ``.csv`` or ``.jsonl`` path, appended to) when one is given.

    >>> log = AuditLog(["input_id", "variant"], max_rows=2)
    >>> log.extend([(0, "a"), (1, "b"), (2, "a")])
    >>> log.frame()["input_id"].tolist()
    [1, 2]
    """

    def __init__(
        self,
        columns: Sequence[str],
        *,
        max_rows: int = 100_000,
        sink: str | Path | None = None,
    ) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise invalid("audit_size", max_rows, "a positive integer")
        self.columns = tuple(columns)
        self.max_rows = max_rows
        self._blocks: deque[Any] = deque()
        self._kept = 0  # rows in the blocks kept (the oldest block may hold a few extra)
        self._lock = threading.Lock()
        self._total = 0
        self._file: TextIO | None = None
        self._writer: Any = None
        self.sink = None if sink is None else Path(sink)
        if self.sink is not None:
            if self.sink.suffix not in SINK_FORMATS:
                raise invalid("audit_sink", str(sink), "a path ending in .csv or .jsonl")
            new = not self.sink.exists() or self.sink.stat().st_size == 0
            self._file = self.sink.open("a", encoding="utf-8", newline="")
            if self.sink.suffix == ".csv":
                self._writer = csv.writer(self._file)
                if new:
                    self._writer.writerow(self.columns)

    @property
    def lock(self) -> threading.Lock:
        """The lock guarding appends (callers may hold it to reserve ids with the append)."""
        return self._lock

    @property
    def total(self) -> int:
        """Rows ever appended (in memory or not)."""
        return self._total

    def extend(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Append rows (takes the lock)."""
        with self._lock:
            self.extend_locked(rows)

    def extend_locked(self, rows: Iterable[tuple[Any, ...]] | RowBlock) -> None:
        """Append rows or one :class:`RowBlock`; the caller already holds :attr:`lock`."""
        block = rows if isinstance(rows, list) or hasattr(rows, "rows") else list(rows)
        size = len(block)
        if not size:
            return
        self._blocks.append(block)
        self._kept += size
        self._total += size
        blocks = self._blocks
        while self._kept - len(blocks[0]) >= self.max_rows:
            self._kept -= len(blocks.popleft())
        if self._file is not None:
            expanded = _rows(block)
            if self._writer is not None:
                self._writer.writerows(expanded)
            else:
                for row in expanded:
                    self._file.write(json.dumps(dict(zip(self.columns, row, strict=True))) + "\n")
            self._file.flush()

    def frame(self) -> pd.DataFrame:
        """The newest ``max_rows`` rows as a DataFrame (oldest first)."""
        with self._lock:
            blocks = list(self._blocks)
        rows = [row for block in blocks for row in _rows(block)]
        return pd.DataFrame(rows[-self.max_rows :], columns=list(self.columns))

    def clear(self) -> None:
        """Forget the rows in memory (the sink keeps them)."""
        with self._lock:
            self._blocks.clear()
            self._kept = 0

    def close(self) -> None:
        """Close the sink file, if any."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                self._writer = None

    def __len__(self) -> int:
        return min(self._kept, self.max_rows)
