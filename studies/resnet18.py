"""A ResNet-18-shaped CNN (seeded weights, 64x64 inputs, judged by agreement with fp32).

Runs the study of studies/resnet18.yaml (seed 0; whole front of quality, memory and latency,
no budget, 40 trials as in benchmarks/bench_search.py) and prints that benchmark's figures for
it: hypervolume of mpsearch vs the uniform, greedy and ILP plans, true evaluations, best
quality at each budget, and the measured speed-ups.

    python studies/resnet18.py               # the full study (resumes studies/resnet18.db)
    python studies/resnet18.py --smoke       # a few trials, in a separate study
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import main

if __name__ == "__main__":
    sys.exit(main(Path(__file__).with_name("resnet18.yaml"), description=__doc__))
