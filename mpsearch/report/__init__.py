"""Study reports: a self-contained HTML page and a Markdown summary of a study's results.

``mpsearch report studies/digits.yaml`` (or :func:`write_report`) reads the files a study
wrote to its output directory (:class:`StudyRecord`; the file formats, ``controller.csv``
included, are listed in ``mpsearch/report/_record.py``) and shows the Pareto front, the
chosen plan per layer, the measured speed-ups and the run-time controller's curve.
Tables come from tested data functions; figures are matplotlib PNGs embedded as base64.
"""

from mpsearch.report._browser import (
    check_rendering,
    color_boxes,
    find_chromium,
    region_stats,
    screenshot,
)
from mpsearch.report._data import (
    best_uniform,
    controller_curve_data,
    front_table,
    headline,
    layer_table,
    plan_label,
    speedup_table,
)
from mpsearch.report._record import (
    CONTROLLER_COLUMNS,
    FILES,
    StudyRecord,
    check_controller_frame,
)
from mpsearch.report._report import Report, as_record, build_report, png_size, write_report

__all__ = [
    "CONTROLLER_COLUMNS",
    "FILES",
    "Report",
    "StudyRecord",
    "as_record",
    "best_uniform",
    "build_report",
    "check_controller_frame",
    "check_rendering",
    "color_boxes",
    "controller_curve_data",
    "find_chromium",
    "front_table",
    "headline",
    "layer_table",
    "plan_label",
    "png_size",
    "region_stats",
    "screenshot",
    "speedup_table",
    "write_report",
]
