"""The Markdown table the benchmarks write to ``benchmarks/results/``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection
from pathlib import Path

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


def available_rows(names: list[str], row: Callable[[str], dict]) -> list[dict]:
    """``row(name)`` of each workload, printed as it comes; a zoo model whose optional package
    (torchvision, timm, transformers) is not installed is skipped with a line saying so."""
    from mpsearch.workloads import ZOO
    from mpsearch.workloads._zoo import zoo_available

    rows = []
    for name in names:
        if name in ZOO and not zoo_available(name):
            print(f"{name}: skipped ({ZOO[name].needs} is not installed)", flush=True)
            continue
        rows.append(row(name))
        print(rows[-1], flush=True)
    return rows


def write_result(path: Path, text: str) -> None:
    """Write a benchmark's Markdown result (folders made) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")


def model_names(parser: argparse.ArgumentParser, value: str, known: Collection[str]) -> list[str]:
    """The comma-separated ``--models`` value as a list; an unknown name ends the run with the
    known ones listed."""
    names = [n for n in value.split(",") if n]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"--models: unknown names {unknown}; known: {sorted(known)}")
    return names
