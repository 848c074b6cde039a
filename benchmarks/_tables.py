"""The Markdown table the benchmarks write to ``benchmarks/results/``."""

from __future__ import annotations

import pandas as pd


def md_table(
    rows: list[dict], columns: list[str], *, digits: int = 3, decimals: int | None = None
) -> str:
    """A GitHub Markdown table of ``rows`` (floats to ``digits`` significant digits, or to
    ``decimals`` places with NaN left empty; a missing cell is left empty). Columns holding
    only numbers are right-aligned, the others left-aligned.

    >>> print(md_table([{"a": 1.23456, "b": "x"}], ["a", "b"]))
    |    a | b   |
    |-----:|:----|
    | 1.23 | x   |
    >>> print(md_table([{"a": 1.23456, "b": float("nan")}], ["a", "b"], decimals=2))
    |    a |   b |
    |-----:|----:|
    | 1.23 |     |
    """

    def fmt(v: object) -> str:
        if not isinstance(v, float):
            return str(v)
        if decimals is None:
            return f"{v:.{digits}g}"
        return "" if v != v else f"{v:.{decimals}f}"

    def numeric(column: str) -> bool:
        values = [r[column] for r in rows if column in r]
        return bool(values) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        )

    cells = pd.DataFrame([[fmt(r.get(c, "")) for c in columns] for r in rows], columns=columns)
    align = ["right" if numeric(c) else "left" for c in columns]
    return cells.to_markdown(index=False, disable_numparse=True, colalign=align)
