"""The digits CNN (scikit-learn's digits, trained here) searched on this CPU's real kernels.

Runs the study of studies/digits_cnn.yaml (seed 0; quality, memory and latency; the whole front,
as bench_search) and prints the figures of benchmarks/bench_search.py for it: hypervolume of mpsearch
vs the uniform, greedy and ILP plans, true evaluations, best quality at each budget, and the
chosen plan's measured speed-up.

    python studies/digits_cnn.py             # the full study (resumes studies/digits_cnn.db)
    python studies/digits_cnn.py --smoke     # a few trials, in a separate study
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import main

if __name__ == "__main__":
    sys.exit(main(Path(__file__).with_name("digits_cnn.yaml"), description=__doc__))
