"""Study reports: a self-contained HTML page and a Markdown summary of a study's results.

``mpsearch report studies/digits.yaml`` (or :func:`write_report`) reads the files a study
wrote to its output directory (:class:`StudyRecord`; the file names are :data:`FILES`, their
formats, ``controller.csv`` included, are listed in ``mpsearch/report/_record.py``) and shows
the Pareto front, the chosen plan per layer, the measured speed-ups, the run-time
controller's curve and, where the study has them, its calibrated rounding methods and recovery
fine-tune (quality before and after). Tables come from tested data functions (:func:`front_table`,
:func:`layer_table`, :func:`speedup_table`, :func:`controller_curve_data`); figures are
matplotlib PNGs embedded as base64; :func:`check_rendering` screenshots the page in Chromium.

>>> from mpsearch.report import write_report
>>> html_path, md_path = write_report("studies/out/digits")  # doctest: +SKIP
"""

from mpsearch.report._browser import check_rendering, find_chromium
from mpsearch.report._data import (
    controller_curve_data,
    front_table,
    layer_table,
    recovery_table,
    rounding_table,
    speedup_table,
)
from mpsearch.report._record import FILES, StudyRecord
from mpsearch.report._report import Report, build_report, write_report

__all__ = [
    "FILES",
    "Report",
    "StudyRecord",
    "build_report",
    "check_rendering",
    "controller_curve_data",
    "find_chromium",
    "front_table",
    "layer_table",
    "recovery_table",
    "rounding_table",
    "speedup_table",
    "write_report",
]
