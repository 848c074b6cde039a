"""The audit log: one row per served input, bounded in memory, optionally mirrored to disk."""

from __future__ import annotations

import csv
import json
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from mpsearch._validation import invalid

SINK_FORMATS = (".csv", ".jsonl")


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
        self._rows: deque[tuple[Any, ...]] = deque(maxlen=max_rows)
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

    def extend_locked(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Append rows; the caller already holds :attr:`lock`."""
        rows = list(rows)
        self._rows.extend(rows)
        self._total += len(rows)
        if self._file is not None:
            if self._writer is not None:
                self._writer.writerows(rows)
            else:
                for row in rows:
                    self._file.write(json.dumps(dict(zip(self.columns, row, strict=True))) + "\n")
            self._file.flush()

    def frame(self) -> pd.DataFrame:
        """The rows in memory as a DataFrame (oldest first)."""
        with self._lock:
            rows = list(self._rows)
        return pd.DataFrame(rows, columns=list(self.columns))

    def clear(self) -> None:
        """Forget the rows in memory (the sink keeps them)."""
        with self._lock:
            self._rows.clear()

    def close(self) -> None:
        """Close the sink file, if any."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                self._writer = None

    def __len__(self) -> int:
        return len(self._rows)
