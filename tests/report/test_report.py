from __future__ import annotations

import base64
import io
import re
from dataclasses import replace

import pandas as pd
import pytest

from mpsearch.report import StudyRecord, build_report, check_rendering, find_chromium, write_report
from mpsearch.report._browser import color_boxes, region_stats, screenshot
from mpsearch.report._report import _html_table, _md_table, png_size


def _md_cells(line: str) -> list[str]:
    """The cells of one Markdown table row (``\\|`` inside a cell is not a separator)."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


@pytest.fixture
def full_record(full_report) -> StudyRecord:
    return full_report.record


def test_markdown_lists_every_front_point_and_the_chosen_plan(full_record) -> None:
    report = build_report(full_record, figures=False)
    md = report.markdown()
    front_section = md.split("## Pareto front")[1].split("## Chosen plan")[0]
    header, rule, *rows = [_md_cells(r) for r in front_section.splitlines() if r.startswith("|")]
    assert header[:3] == ["trial", "origin", "quality"] and set("".join(rule)) <= set("-:")
    assert len(rows) == len(full_record.pareto)
    by_trial = {int(row[0]): dict(zip(header, row, strict=True)) for row in rows}
    for point in full_record.pareto.itertuples():
        row = by_trial[point.trial]
        assert (
            row["quality"] == f"{point.quality:.4f}"
            and row["memory_mb"] == f"{point.memory_mb:.4f}"
        )
    chosen = [trial for trial, row in by_trial.items() if row["chosen"] == "yes"]
    assert chosen == [full_record.best.metadata["trial"]]
    assert "uniform:w8a8" in md and "**2.50×** faster than fp32" in md
    assert "ctrl:max_softmax" in md.split("## Run-time controller")[1]


def test_html_is_self_contained_with_embedded_figures(full_report) -> None:
    report = full_report
    assert set(report.figures) == {
        "front_memory",
        "front_latency",
        "bits",
        "speedups",
        "controller",
    }
    page = report.html()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 5
    for data in images:
        png = base64.b64decode(data)
        width, height = png_size(png)
        assert width > 300 and height > 100
        from PIL import Image

        with Image.open(io.BytesIO(png)) as image:
            assert image.convert("L").getextrema()[0] < 100  # something dark is drawn
    assert not re.search(r"https?://|<script|<link|@import|src=\"(?!data:)", page)
    front = page.split('<table id="T_front">')[1].split("</table>")[0]
    chosen_rows = [r for r in front.split("<tr>") if re.search(r'<td class="[^"]*\bchosen\b', r)]
    assert (
        len(chosen_rows) == 1 and f">{full_report.record.best.metadata['trial']}<" in chosen_rows[0]
    )
    assert "td.chosen{" in page


def test_missing_parts_are_said_not_drawn(fake_record, tmp_path) -> None:
    report = build_report(fake_record)
    assert "speedups" not in report.figures and "controller" not in report.figures
    assert "No controller curve: write controller.csv" in report.markdown()
    with pytest.raises(ValueError, match="Nothing to report"):
        build_report(StudyRecord(name="empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="run `mpsearch search` or `mpsearch run`"):
        build_report(tmp_path / "empty")


def test_write_report_writes_html_and_markdown_side_by_side(full_record, tmp_path) -> None:
    replace(full_record).save(tmp_path / "study")  # a copy: the shared record keeps no out_dir
    report = build_report(tmp_path / "study", figures=False)  # as loaded from the directory
    html_path, md_path = write_report(report)
    assert html_path == tmp_path / "study" / "report.html" and md_path.suffix == ".md"
    assert html_path.read_text().startswith("<!DOCTYPE html>")
    assert md_path.read_text() == report.markdown()
    with pytest.raises(ValueError, match="'out_path' argument must be a path ending in .html"):
        write_report(report, tmp_path / "report.txt")


def test_color_boxes_and_region_stats_find_and_measure_blocks() -> None:
    import numpy as np

    img = np.full((100, 120, 3), 255, np.uint8)
    img[10:40, 5:50] = (255, 0, 255)
    img[60:90, 70:110] = (255, 0, 255)
    assert color_boxes(img) == [(5, 10, 50, 40), (70, 60, 110, 90)]
    assert region_stats(img, (0, 0, 120, 100))["non_white"] == pytest.approx(
        (30 * 45 + 30 * 40) / 12000
    )
    assert region_stats(img, (0, 45, 60, 55)) == {"non_white": 0.0, "std": 0.0, "colors": 1.0}


CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium at /usr/bin/chromium (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def rendered(full_report, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chromium")
    stats = check_rendering(full_report, tmp / "r.html", tmp / "r.png", height=2400)
    return stats, tmp


@needs_chromium
def test_chromium_renders_every_figure(full_report, rendered) -> None:
    stats, tmp = rendered
    assert (tmp / "r.png").stat().st_size > 10_000
    # the layout puts the five figures within the 1200 x 2400 window, in page order
    assert list(stats["figure"]) == [
        "front_memory",
        "front_latency",
        "bits",
        "speedups",
        "controller",
    ]
    for row in stats.itertuples():
        width, height = png_size(full_report.figures[row.figure])
        # drawn at natural size (the window may cut the last one at its bottom edge)
        assert row.x1 - row.x0 == width
        assert row.y1 - row.y0 == height or (row.y1 == 2400 and row.y1 - row.y0 > 100)
        # a blank region reads < 0.01 (below); the controller's thin lines read 0.044 at times
        assert row.non_white > 0.02, row
        assert row.std > 20, row
        assert row.colors >= 8, row
        assert row.magenta < 0.01, row


@needs_chromium
def test_the_check_fails_for_blank_figures(full_report, rendered, tmp_path) -> None:
    """The check can fail: all-white images of the same size leave the same boxes blank."""
    from PIL import Image

    stats, _ = rendered
    blank = {}
    for name, png in full_report.figures.items():
        buf = io.BytesIO()
        Image.new("RGB", png_size(png), (255, 255, 255)).save(buf, format="PNG")
        blank[name] = buf.getvalue()
    page = tmp_path / "blank.html"
    page.write_text(replace(full_report, figures=blank).html())
    shot = screenshot(page, tmp_path / "blank.png", height=2400)
    for row in stats.itertuples():
        blank_stats = region_stats(shot, (row.x0, row.y0, row.x1, row.y1))
        assert blank_stats["non_white"] < 0.01 and blank_stats["std"] < 5, (row.figure, blank_stats)


def test_tables_escape_their_cells_and_show_missing_values_as_a_dash() -> None:
    """HTML cells and headers are escaped, a ``|`` in a Markdown cell does not split it, NaN
    and None read as ``–`` in both renderings, and only a true ``chosen`` (not NaN) is marked."""
    frame = pd.DataFrame(
        {
            "plan": ["a<b>&c", "x|y", "z"],
            "quality": [0.5, float("nan"), 1.0],
            "chosen": [False, True, float("nan")],
            "note<i>": [None, "ok", "-"],
        }
    )
    page = _html_table(frame, name="t", highlight="chosen")
    assert "<b>" not in page and "<i>" not in page
    assert ">a&lt;b&gt;&amp;c<" in page and ">note&lt;i&gt;<" in page
    cells = re.findall(r"<td[^>]*>(.*?)</td>", page)
    assert cells[:8] == ["a&lt;b&gt;&amp;c", "0.5000", "", "–", "x|y", "–", "yes", "ok"]
    rows = page.split("<tbody>")[1].split("</tr>")
    assert [row.count(" chosen") for row in rows[:3]] == [0, 4, 0]

    lines = _md_table(frame).splitlines()
    assert [_md_cells(line) for line in lines[2:]] == [
        ["a<b>&c", "0.5000", "", "–"],
        ["x|y", "–", "yes", "ok"],
        ["z", "1.0000", "–", "-"],
    ]
    assert _md_cells(lines[0]) == ["plan", "quality", "chosen", "note<i>"]
    assert _md_cells(lines[1])[1].endswith(":") and _md_cells(lines[1])[0].startswith(":")
