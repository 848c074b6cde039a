"""``build_report`` / ``write_report``: a self-contained HTML page and a Markdown summary of a study."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype
from pandas.io.formats.style import Styler

from mpsearch._io import write_text_atomic
from mpsearch._validation import invalid
from mpsearch.report._data import (
    controller_curve_data,
    front_table,
    headline,
    layer_table,
    recovery_table,
    rounding_table,
    speedup_table,
)
from mpsearch.report._record import CONTROLLER_COLUMNS, FILES, StudyRecord

_FIGURE_TITLES = {
    "front_memory": "Pareto front: quality × memory",
    "front_latency": "Pareto front: quality × latency",
    "bits": "Weight bits per layer (front plans and the chosen one)",
    "speedups": "Measured speed-ups over fp32",
    "controller": "Run-time controller: disagreement × latency",
}


def as_record(source: Any) -> StudyRecord:
    """A :class:`StudyRecord` from a record, a study output directory, or a ``SearchResult``.

    >>> as_record("studies/out/digits").name   # doctest: +SKIP
    'digits'
    """
    if isinstance(source, StudyRecord):
        return source
    if isinstance(source, (str, Path)):
        return StudyRecord.load(source)
    if hasattr(source, "trials") and hasattr(source, "pareto") and hasattr(source, "best"):
        try:
            best = source.best()
        except ValueError:
            best = None
        return StudyRecord(
            name=str(getattr(getattr(source, "study", None), "study_name", "study")),
            info={
                "fp32_memory_mb": float(source.fp32_memory_mb),
                "fp32_latency_ms": float(source.fp32_latency_ms),
            },
            trials=source.trials,
            pareto=source.pareto,
            best=best,
        )
    raise invalid("source", source, "a StudyRecord, a study output directory or a SearchResult")


@dataclass
class Report:
    """A study's report: the record, the tables and figures computed from it, and the two renderings.

    >>> report = build_report("studies/out/digits")    # doctest: +SKIP
    >>> report.front.head()                             # doctest: +SKIP
    """

    record: StudyRecord
    headline: dict[str, Any]
    front: pd.DataFrame
    layers: pd.DataFrame
    speedups: pd.DataFrame
    controller: pd.DataFrame | None
    figures: dict[str, bytes] = field(default_factory=dict)
    generated: str = ""
    roundings: pd.DataFrame | None = None
    recovery: pd.DataFrame | None = None

    def html(self) -> str:
        """The report as one self-contained HTML page (figures inlined as base64 PNG, no scripts)."""
        return _render_html(self)

    def markdown(self) -> str:
        """The report as Markdown: the same tables, no figures (they are in the HTML)."""
        return _render_markdown(self)


def build_report(source: Any, *, figures: bool = True) -> Report:
    """Compute a study's report from ``source`` (see :func:`as_record`).

    ``figures=False`` skips drawing (no matplotlib needed) and gives the tables only.

    >>> build_report("studies/out/digits").headline["speedup_vs_fp32"]  # doctest: +SKIP
    """
    record = as_record(source)
    if (record.pareto is None or not len(record.pareto)) and record.summary is None:
        where = record.out_dir or record.name
        raise ValueError(
            f"Nothing to report for study {record.name!r} ({where}): no {FILES['pareto']} nor "
            f"{FILES['summary']}; run `mpsearch search` or `mpsearch run` on its config first."
        )
    figs: dict[str, bytes] = {}
    if figures:
        from mpsearch.report._figures import report_figures

        figs = report_figures(record)
    return Report(
        record=record,
        headline=headline(record),
        front=front_table(record),
        layers=layer_table(record),
        speedups=speedup_table(record),
        controller=controller_curve_data(record.controller)
        if record.controller is not None
        else None,
        figures=figs,
        generated=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        roundings=rounding_table(record),
        recovery=recovery_table(record),
    )


def write_report(source: Any, out_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` for ``source``; return both paths.

    ``out_path`` is the HTML file (the Markdown goes beside it, same stem); default
    ``<study output dir>/report.html``.

    >>> html_path, md_path = write_report("studies/out/digits")   # doctest: +SKIP
    """
    report = source if isinstance(source, Report) else build_report(source)
    if out_path is None:
        if report.record.out_dir is None:
            raise invalid("out_path", out_path, "a file path (the record has no output directory)")
        out_path = report.record.out_dir / "report.html"
    html_path = Path(out_path)
    if html_path.suffix.lower() not in (".html", ".htm"):
        raise invalid("out_path", str(out_path), "a path ending in .html")
    html_path.parent.mkdir(parents=True, exist_ok=True)
    md_path = html_path.with_suffix(".md")
    write_text_atomic(html_path, report.html())
    write_text_atomic(md_path, report.markdown())
    return html_path, md_path


# ---------------------------------------------------------------------------------- formatting
_DIGITS = {
    "quality": 4,
    "quality_before": 4,
    "quality_after": 4,
    "quality_gain": 4,
    "loss_before": 5,
    "loss_after": 5,
    "seconds": 1,
    "fp32_quality": 4,
    "best_quality": 4,
    "quality_drop": 4,
    "accuracy": 4,
    "disagreement": 4,
    "memory_mb": 4,
    "latency_ms": 3,
    "memory_ratio": 3,
    "speedup": 2,
    "best_vs": 2,
    "speedup_vs_fp32": 2,
    "speedup_vs_best_uniform": 2,
    "sensitivity": 3,
    "task_drop": 4,
    "bits_per_weight": 2,
    "memory_kb": 2,
    "epsilon": 4,
}


def _fmt(value: Any, column: str = "") -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if column in ("sensitivity",):
            return f"{value:.3g}"
        if float(value).is_integer() and column not in _DIGITS:
            return str(int(value))
        return f"{value:.{_DIGITS.get(column, 4)}f}"
    return str(value)


def _text_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every cell formatted for display by :func:`_fmt` (numbers per column)."""
    return pd.DataFrame(
        {c: [_fmt(v.item() if hasattr(v, "item") else v, c) for v in df[c]] for c in df.columns},
        columns=df.columns,
    )


def _alignment(column: pd.Series) -> str:
    numeric = is_numeric_dtype(column) and not is_bool_dtype(column)
    return "right" if numeric else "left"


def _md_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table: numbers right-aligned, text left-aligned, ``|`` escaped."""
    text = _text_frame(df).map(lambda cell: cell.replace("|", "\\|"))
    align = [_alignment(df[c]) for c in df.columns]
    return text.to_markdown(index=False, disable_numparse=True, colalign=align)


def _html_table(df: pd.DataFrame, *, name: str, highlight: str | None = None) -> str:
    """An HTML table (cells and headers escaped) with ``id="T_<name>"``; the cells of the rows
    where the ``highlight`` column is true get the class ``chosen``."""
    classes = pd.DataFrame("", index=range(len(df)), columns=df.columns)
    if highlight is not None and highlight in df.columns:
        classes.loc[df[highlight].eq(True).to_numpy()] = "chosen"
    styler = Styler(_text_frame(df), uuid=name, cell_ids=False)
    styler = styler.format(escape="html").format_index(escape="html", axis=1)
    return styler.hide(axis="index").set_td_classes(classes).to_html()


def _headline_lines(report: Report) -> list[str]:
    h = report.headline
    lines = [
        f"workload `{h['workload'] or '?'}` on backend `{h['backend'] or '?'}`; "
        f"{h['trials']} trials, {h['true_evaluations']} true evaluations, "
        f"{h['front_size']} plans on the Pareto front",
    ]
    if not math.isnan(h["speedup_vs_fp32"]):
        lines.append(
            f"chosen plan: quality {_fmt(h['best_quality'], 'quality')} "
            f"(fp32 {_fmt(h['fp32_quality'], 'quality')}, drop {_fmt(h['quality_drop'], 'quality_drop')}), "
            f"memory {_fmt(h['memory_ratio'], 'memory_ratio')}× fp32, "
            f"measured **{h['speedup_vs_fp32']:.2f}×** faster than fp32"
        )
    if h["best_uniform"] is not None:
        lines.append(
            f"vs the best uniform plan ({h['best_uniform']}): "
            f"**{h['speedup_vs_best_uniform']:.2f}×** (its latency / the chosen plan's)"
        )
    if report.record.best is not None:
        lines.append(f"chosen plan: `{_plan_text(report)}`")
    if report.record.info.get("coverage"):
        lines.append(report.record.info["coverage"])
    return lines


def _plan_text(report: Report) -> str:
    plan = report.record.best
    if plan is None:
        return ""
    return json.dumps(dict(plan.rules)) + (f" (default {plan.default})" if plan.rules else "")


def _no_controller_text(report: Report) -> str:
    where = report.record.out_dir or "the study output directory"
    return (
        f"No controller curve: write {FILES['controller']} to {where} with the columns "
        f"{', '.join(CONTROLLER_COLUMNS)} (one row per method: static:<variant> or "
        "ctrl:<scorer>:<eps>) to show it here."
    )


def _rounding_sections(report: Report) -> list[tuple[str, str, pd.DataFrame]]:
    """``(title, text, table)`` of the calibrated rounding and recovery sections (those the
    study has)."""
    sections = []
    if report.roundings is not None and len(report.roundings):
        sections.append(
            (
                "Rounding methods",
                "Calibrated rounding (`<scheme>+<method>`) profiled and searched next to round "
                "to nearest; `chosen_layers`: the chosen plan's layers that use it.",
                report.roundings,
            )
        )
    spec = report.record.speculative
    if spec is not None and len(spec):
        sections.append(
            (
                "Speculative decoding",
                "Lossless speculative controller (`decode`): the draft and `k` tuned on "
                "calibration prompts, then greedy `generate` timed on test prompts with that `k` "
                "vs `k = 0` (the reference alone); `acceptance_rate`: accepted / drafted tokens; "
                "`exact`: every output equals the reference's own greedy tokens.",
                spec,
            )
        )
    if report.recovery is not None:
        sections.append(
            (
                "Recovery",
                "Recovery fine-tune (`recover`) of each plan, distilled from fp32 on the "
                "calibration data: quality on the test split before (the plan as chosen) and "
                "after (the recovered weights, rounded to nearest) on `backend`; loss: the "
                "held-out distillation loss.",
                report.recovery,
            )
        )
    return sections


def _render_markdown(report: Report) -> str:
    rec = report.record
    out = [f"# Study report: {rec.name}", "", f"Generated {report.generated} by mpsearch.", ""]
    out += [f"- {line}" for line in _headline_lines(report)]
    out += ["", "## Pareto front", ""]
    if len(report.front):
        out += [
            "Latency here is the cost model's prediction; measured latencies are below. "
            f"`chosen` marks the plan in {FILES['best']}.",
            "",
            _md_table(report.front),
        ]
    else:
        out.append("No search results.")
    out += ["", "## Chosen plan, per layer", ""]
    out.append(_md_table(report.layers) if len(report.layers) else "No chosen plan.")
    out += ["", "## Measured speed-ups", ""]
    if len(report.speedups):
        out += [
            "Measured on the real backend in this run (quality on the test split, median "
            "end-to-end latency). `best_vs` = the row's latency / the chosen plan's.",
            "",
            _md_table(report.speedups),
        ]
    else:
        out.append(
            "Not measured: `mpsearch run` measures fp32, the uniform plans and the chosen one."
        )
    out += ["", "## Run-time controller", ""]
    if report.controller is not None:
        out.append(_md_table(report.controller))
    else:
        out.append(_no_controller_text(report))
    for title, text, table in _rounding_sections(report):
        out += ["", f"## {title}", "", text, "", _md_table(table)]
    out += ["", "Figures: see the HTML report beside this file.", ""]
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1150px;color:#222;padding:0 16px}
h1{font-size:26px;margin-bottom:4px}h2{font-size:20px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
.meta{color:#666;font-size:13px}ul.headline li{margin:3px 0}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}td.chosen{background:#ffe9e9;font-weight:600}
.figs{display:flex;flex-wrap:wrap;gap:14px}figure{margin:0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:12px;color:#555}code{background:#f5f5f5;padding:1px 4px}.note{color:#666;font-size:13px}
"""


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of PNG bytes, from the IHDR header.

    >>> png_size(bytes.fromhex("89504e470d0a1a0a0000000d49484452000000030000000208020000"))
    (3, 2)
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise invalid("data", data[:16], "PNG bytes")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _figure(report: Report, name: str) -> str:
    data = report.figures.get(name)
    if data is None:
        return ""
    b64 = base64.b64encode(data).decode("ascii")
    w, h = png_size(data)
    title = html.escape(_FIGURE_TITLES.get(name, name))
    return (
        f'<figure id="fig-{name}"><img alt="{title}" width="{w}" height="{h}" '
        f'src="data:image/png;base64,{b64}">'
        f"<figcaption>{title}</figcaption></figure>"
    )


def _md_inline(text: str) -> str:
    """Escape, then turn `code` and **bold** into tags (only what the headline uses)."""
    import re

    text = html.escape(text)
    text = re.sub(r"`([^`]*)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", text)


def _render_html(report: Report) -> str:
    rec = report.record
    name = html.escape(rec.name)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mpsearch report: {name}</title><style>{_CSS}</style></head><body>",
        f"<h1>Study report: {name}</h1>",
        f'<p class="meta">Generated {html.escape(report.generated)} by mpsearch.</p>',
        '<ul class="headline">',
        *[f"<li>{_md_inline(line)}</li>" for line in _headline_lines(report)],
        "</ul>",
        '<h2 id="front">Pareto front</h2>',
        f'<div class="figs">{_figure(report, "front_memory")}{_figure(report, "front_latency")}</div>',
    ]
    if len(report.front):
        parts += [
            '<p class="note">Latency is the cost model\'s prediction; measured latencies are '
            "below. The highlighted row is the chosen plan.</p>",
            _html_table(report.front, name="front", highlight="chosen"),
        ]
    else:
        parts.append('<p class="note">No search results.</p>')
    parts += ['<h2 id="plan">Chosen plan, per layer</h2>']
    if len(report.layers):
        parts += [
            f"<p><code>{html.escape(_plan_text(report))}</code></p>",
            _html_table(report.layers, name="layers"),
        ]
    else:
        parts.append('<p class="note">No chosen plan.</p>')
    parts.append(f'<div class="figs">{_figure(report, "bits")}</div>')
    parts.append('<h2 id="speedups">Measured speed-ups</h2>')
    if len(report.speedups):
        parts += [
            f'<div class="figs">{_figure(report, "speedups")}</div>',
            '<p class="note">Measured on the real backend (quality on the test split, median '
            "end-to-end latency); <code>best_vs</code> = the row's latency / the chosen plan's.</p>",
            _html_table(report.speedups, name="speedups"),
        ]
    else:
        parts.append(
            '<p class="note">Not measured: <code>mpsearch run</code> measures fp32, the uniform '
            "plans and the chosen one.</p>"
        )
    parts.append('<h2 id="controller">Run-time controller</h2>')
    if report.controller is not None:
        parts += [
            f'<div class="figs">{_figure(report, "controller")}</div>',
            _html_table(report.controller, name="controller"),
        ]
    else:
        parts.append(f'<p class="note">{html.escape(_no_controller_text(report))}</p>')
    for title, text, table in _rounding_sections(report):
        anchor = title.split()[0].lower()
        parts += [
            f'<h2 id="{anchor}">{html.escape(title)}</h2>',
            f'<p class="note">{_md_inline(text)}</p>',
            _html_table(table, name=anchor),
        ]
    parts.append("</body></html>")
    return "\n".join(parts)
