"""The audit log: one row per served input, bounded in memory, optionally mirrored to disk.

Rows arrive in blocks (one block per served call): a list of row tuples, or any compact record
that the log's ``expand`` function turns into rows. The controller appends one tuple per call
and its rows are only expanded when the log is read (``frame()``) or written to a sink, which
keeps the per-call cost of auditing to a tuple and a lock.
"""

from __future__ import annotations

import csv
import json
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from mpsearch._validation import invalid

SINK_FORMATS = (".csv", ".jsonl")

Rows = list[tuple[Any, ...]]


class AuditLog:
    """A thread-safe ring buffer of decision rows with an optional CSV / JSONL sink.

    Only the newest ``max_rows`` rows stay in memory; every row also goes to ``sink`` (a
    ``.csv`` or ``.jsonl`` path, appended to) when one is given. ``expand`` turns a compact
    block appended with :meth:`append_locked` into its rows.

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
        expand: Callable[[Any], Rows] | None = None,
    ) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise invalid("audit_size", max_rows, "a positive integer")
        self.columns = tuple(columns)
        self.max_rows = max_rows
        self._expand = expand
        self._blocks: deque[tuple[int, Any]] = deque()  # (rows in the block, block)
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
        rows = list(rows)
        with self._lock:
            self.append_locked(len(rows), rows)

    def extend_locked(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Append rows (or an object with a ``rows()`` method); the caller holds :attr:`lock`.

        Kept for callers of the first audit API; :meth:`append_locked` appends a compact block.
        """
        block = rows.rows() if hasattr(rows, "rows") else list(rows)
        self.append_locked(len(block), block)

    def append_locked(self, size: int, block: Any) -> None:
        """Append one block of ``size`` rows: a list of row tuples, or a record ``expand``
        turns into them. The caller already holds :attr:`lock`."""
        if not size:
            return
        blocks = self._blocks
        blocks.append((size, block))
        self._kept += size
        self._total += size
        while self._kept - blocks[0][0] >= self.max_rows:
            self._kept -= blocks.popleft()[0]
        if self._file is not None:
            self._write(self._file, self._rows(block))

    def _rows(self, block: Any) -> Rows:
        return block if isinstance(block, list) else self._expand(block)  # type: ignore[misc]

    def _write(self, file: TextIO, rows: Rows) -> None:
        if self._writer is not None:
            self._writer.writerows(rows)
        else:
            for row in rows:
                file.write(json.dumps(dict(zip(self.columns, row, strict=True))) + "\n")
        file.flush()

    def frame(self) -> pd.DataFrame:
        """The newest ``max_rows`` rows as a DataFrame (oldest first)."""
        with self._lock:
            blocks = [block for _, block in self._blocks]
        rows = [row for block in blocks for row in self._rows(block)]
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
