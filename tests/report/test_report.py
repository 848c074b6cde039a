from __future__ import annotations

import base64
import io
import re
from dataclasses import replace

import pytest

from mpsearch.report import (
    StudyRecord,
    build_report,
    check_rendering,
    color_boxes,
    find_chromium,
    png_size,
    region_stats,
    screenshot,
    write_report,
)


@pytest.fixture
def full_record(full_report) -> StudyRecord:
    return full_report.record


def test_markdown_lists_every_front_point_and_the_chosen_plan(full_record) -> None:
    report = build_report(full_record, figures=False)
    md = report.markdown()
    front_section = md.split("## Pareto front")[1].split("## Chosen plan")[0]
    rows = [r for r in front_section.splitlines() if r.startswith("| ") and "trial" not in r]
    assert len(rows) == len(full_record.pareto)
    for point in full_record.pareto.itertuples():
        row = next(r for r in rows if r.startswith(f"| {point.trial} |"))
        assert f"{point.quality:.4f}" in row and f"{point.memory_mb:.4f}" in row
    chosen = [r for r in rows if "| yes |" in r]
    assert len(chosen) == 1 and chosen[0].startswith(f"| {full_record.best.metadata['trial']} |")
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
    assert page.count('class="chosen"') == 1


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
        assert row.non_white > 0.05, row
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
