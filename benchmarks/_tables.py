"""The Markdown table the benchmarks write to ``benchmarks/results/``."""

from __future__ import annotations


def md_table(rows: list[dict], columns: list[str], *, digits: int = 3) -> str:
    """A GitHub Markdown table of ``rows`` (floats to ``digits`` significant digits; a missing
    cell is left empty).

    >>> print(md_table([{"a": 1.23456, "b": "x"}], ["a", "b"]))
    | a | b |
    |---|---|
    | 1.23 | x |
    """

    def fmt(v: object) -> str:
        return f"{v:.{digits}g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
