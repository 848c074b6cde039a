"""A small character-level transformer trained here on real text (Python's pydoc topics).

Runs the study of studies/text_transformer.yaml (seed 0; whole front of quality, memory and
latency, no budget, 50 trials as in benchmarks/bench_search.py) and prints that benchmark's
figures for it: hypervolume of mpsearch vs the uniform, greedy and ILP plans, true
evaluations, best quality at each budget, and the measured speed-ups.

    python studies/text_transformer.py          # the full study (resumes studies/text_transformer.db)
    python studies/text_transformer.py --smoke  # a few trials, in a separate study
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import main

if __name__ == "__main__":
    sys.exit(main(Path(__file__).with_name("text_transformer.yaml"), description=__doc__))
