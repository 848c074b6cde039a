"""Render a report in headless Chromium and check that its figures really show.

The check: the page is rendered twice at the same size, once as it is and once with every
figure replaced by a solid magenta block of the same pixel size (so the layout is identical).
The magenta blocks give the exact boxes where the figures are drawn; in the real screenshot
those boxes must hold a plot (a share of non-white pixels and pixel variance), not a blank
or broken-image box.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from mpsearch._validation import invalid
from mpsearch.report._report import Report, png_size

MAGENTA = (255, 0, 255)
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome executable (``$MPSEARCH_CHROMIUM`` first), or ``None``.

    >>> find_chromium()   # doctest: +SKIP
    '/usr/bin/chromium'
    """
    env = os.environ.get("MPSEARCH_CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    *,
    width: int = 1200,
    height: int = 2400,
    chromium: str | None = None,
    timeout: float = 120.0,
) -> Path:
    """Screenshot ``html_path`` (a local file) with headless Chromium into ``png_path``.

    Runs with a throw-away profile and no network features; raises ``RuntimeError`` with
    Chromium's last lines of output when no image is written.

    >>> screenshot("studies/out/digits/report.html", "/tmp/report.png")  # doctest: +SKIP
    """
    exe = chromium or find_chromium()
    if exe is None:
        raise RuntimeError(
            "No Chromium found (install it, e.g. `apt-get install chromium`, or set MPSEARCH_CHROMIUM)."
        )
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    if not html_path.is_file():
        raise invalid("html_path", str(html_path), "an existing HTML file")
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 100:
            raise invalid(name, value, "an integer >= 100 (pixels)")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="mpsearch-chromium-") as profile_dir:
        cmd = [
            exe,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile_dir}",
            f"--screenshot={png_path}",
            f"--window-size={width},{height}",
            html_path.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if not png_path.exists() or png_path.stat().st_size == 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}):\n{tail}")
    return png_path


def _solid_png(size: tuple[int, int], color: tuple[int, int, int] = MAGENTA) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def placeholder_report(report: Report) -> Report:
    """The same report with each figure replaced by a magenta block of the same size."""
    return replace(report, figures={k: _solid_png(png_size(v)) for k, v in report.figures.items()})


def _load(png: str | Path | np.ndarray) -> np.ndarray:
    if isinstance(png, np.ndarray):
        return png
    from PIL import Image

    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


def color_boxes(
    png: str | Path | np.ndarray, color: tuple[int, int, int] = MAGENTA, *, min_pixels: int = 400
) -> list[tuple[int, int, int, int]]:
    """Bounding boxes ``(x0, y0, x1, y1)`` of the connected blocks of ``color``, top to bottom.

    >>> img = np.full((50, 60, 3), 255, np.uint8); img[10:30, 5:25] = MAGENTA
    >>> color_boxes(img)
    [(5, 10, 25, 30)]
    """
    from scipy import ndimage

    rgb = _load(png).astype(np.int16)
    mask = np.abs(rgb - np.array(color, dtype=np.int16)).max(axis=2) <= 8
    labels, _ = ndimage.label(mask)
    boxes = []
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or int((labels[sl] == index).sum()) < min_pixels:
            continue
        boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def region_stats(png: str | Path | np.ndarray, box: tuple[int, int, int, int]) -> dict[str, float]:
    """In ``box`` of the image: share of non-white pixels, pixel standard deviation, colour count.

    >>> img = np.full((20, 20, 3), 255, np.uint8); img[:10] = 0
    >>> region_stats(img, (0, 0, 20, 20))["non_white"]
    0.5
    """
    x0, y0, x1, y1 = box
    part = _load(png)[y0:y1, x0:x1].astype(np.int16)
    if part.size == 0:
        return {"non_white": 0.0, "std": 0.0, "colors": 0.0}
    non_white = float((part.min(axis=2) < 235).mean())
    colors = len(np.unique((part // 16).reshape(-1, 3), axis=0))
    return {"non_white": non_white, "std": float(part.std()), "colors": float(colors)}


def check_rendering(
    report: Report,
    html_path: str | Path,
    png_path: str | Path,
    *,
    width: int = 1200,
    height: int = 2400,
    chromium: str | None = None,
) -> pd.DataFrame:
    """Screenshot the report's HTML and measure each visible figure's box in the screenshot.

    Writes ``html_path`` and ``png_path`` (and a placeholder page and screenshot beside them,
    suffixed ``.boxes``). Returns one row per figure box found within the window: ``figure``
    (name, in page order), ``x0, y0, x1, y1``, ``non_white``, ``std``, ``colors``, and
    ``magenta`` (share of the placeholder colour inside the box of the real screenshot: ~0
    when the box shows the figure).

    >>> check_rendering(build_report("studies/out/digits"), "/tmp/r.html", "/tmp/r.png")  # doctest: +SKIP
    """
    html_path, png_path = Path(html_path), Path(png_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(report.html(), encoding="utf-8")
    shot = screenshot(html_path, png_path, width=width, height=height, chromium=chromium)
    boxes_html = html_path.with_suffix(".boxes.html")
    boxes_html.write_text(placeholder_report(report).html(), encoding="utf-8")
    boxes_png = screenshot(
        boxes_html,
        png_path.with_suffix(".boxes.png"),
        width=width,
        height=height,
        chromium=chromium,
    )
    order = [n for n in _figure_order(report.html()) if n in report.figures]
    image = _load(shot)
    rows = []
    for name, box in zip(order, color_boxes(boxes_png), strict=False):
        stats = region_stats(image, box)
        x0, y0, x1, y1 = box
        part = image[y0:y1, x0:x1].astype(np.int16)
        magenta = float((np.abs(part - np.array(MAGENTA, dtype=np.int16)).max(axis=2) <= 8).mean())
        rows.append(
            {"figure": name, "x0": x0, "y0": y0, "x1": x1, "y1": y1, **stats, "magenta": magenta}
        )
    return pd.DataFrame(rows)


def _figure_order(page: str) -> list[str]:
    import re

    return re.findall(r'<figure id="fig-([a-z_]+)"', page)
