"""How much the profile's end-to-end errors lose to ``e2e_samples="auto"``, on the zoo models.

Run: ``python benchmarks/bench_e2e_samples.py`` (``--models hf_llama,tv_resnet18`` for a
subset, ``--out FILE``). Prints a table and writes ``benchmarks/results/e2e_samples.md``.

For each workload (the trained ones of :data:`TRAINED`, then the zoo models; 256 calibration
samples in batches of 32): the exact profile
(``e2e_samples=None``), the ``"auto"`` profile, the profile on as many samples taken first in
order (``e2e_samples=n``), and the profile on the first samples the previous auto rule took (exact up to D = 2 downstream passes per scheme, else one pass, at least 16 samples).
Each side's ``e2e`` column against the exact one: Spearman rho over all (layer, scheme) rows
and the lowest per-scheme rho (the ranking of the layers under one scheme). Timings are in
``bench_models.py``; this only measures what the sample budget costs in ranking.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _tables import md_table  # benchmarks/ is the script's folder
from scipy.stats import spearmanr

import mpsearch as mps
from mpsearch.cost import cpu_model
from mpsearch.workloads import WORKLOADS, ZOO, load_workload
from mpsearch.workloads._zoo import zoo_available

SCHEMES = ["bf16", "w8a8", "w4a16"]
RESULTS = Path(__file__).parent / "results" / "e2e_samples.md"
TRAINED = ["digits_cnn", "digits_resnet18", "text_transformer", "stdlib_lm_tiny"]
"""Workloads trained on real data (cached after the first run), before the random-initialised
zoo models: a trained model's end-to-end errors are carried by fewer, less certain samples."""


def previous_rule(total: int, downstream: float) -> int:
    """The samples the auto rule took before half-pass budgets (exact up to D = 2, else
    ``ceil(total / D)``, at least 16)."""
    return total if downstream <= 2.0 else min(total, max(16, math.ceil(total / downstream)))


def agreement(exact: pd.Series, other: pd.Series) -> tuple[float, float]:
    """(Spearman rho over all finite rows, lowest per-scheme rho)."""
    ok = exact.notna() & other.notna() & exact.abs().lt(math.inf) & other.abs().lt(math.inf)
    schemes = exact.index.get_level_values("scheme")
    per = [spearmanr(exact[ok & (schemes == s)], other[ok & (schemes == s)])[0] for s in SCHEMES]
    return float(spearmanr(exact[ok], other[ok])[0]), float(min(per))


def model_row(name: str) -> dict[str, Any]:
    wl = load_workload(name, n_calib=256, n_test=256, batch_size=32)

    def e2e(samples: Any) -> tuple[pd.Series, dict[str, Any]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prof = mps.profile(
                wl.model, wl.calib, schemes=SCHEMES, progress=False, e2e_samples=samples
            )
        return prof.table.set_index(["layer", "scheme"])["e2e"], prof.info

    exact, info = e2e(None)
    total, downstream = info["calib_samples"], info["downstream_passes"]
    auto, auto_info = e2e("auto")
    n_auto = auto_info["e2e_samples"]
    before = previous_rule(total, downstream)
    rho_auto, min_auto = agreement(exact, auto)
    rho_first, min_first = agreement(exact, e2e(n_auto)[0])
    rho_before, min_before = agreement(exact, e2e(before)[0])
    return {
        "model": name,
        "D": downstream,
        "auto_samples": n_auto,
        "auto_pick": auto_info["e2e_pick"],
        "auto_rho": rho_auto,
        "auto_min_scheme_rho": min_auto,
        "first_rho": rho_first,
        "first_min_scheme_rho": min_first,
        "previous_samples": before,
        "previous_rho": rho_before,
        "previous_min_scheme_rho": min_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join([*TRAINED, *ZOO]), help="comma-separated workload names"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="the markdown table written")
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        parser.error(f"--models: unknown workloads {unknown}; known: {sorted(WORKLOADS)}")
    torch.manual_seed(0)
    started = time.perf_counter()
    rows = []
    for name in names:
        if name in ZOO and not zoo_available(name):
            print(f"{name}: skipped ({ZOO[name].needs} is not installed)", flush=True)
            continue
        rows.append(model_row(name))
        print(rows[-1], flush=True)
    columns = list(rows[0]) if rows else ["model"]
    text = "\n".join(
        [
            "# End-to-end errors on a sample budget vs exact mode",
            "",
            f"CPU: {cpu_model()}; torch {torch.__version__}; schemes {SCHEMES}; 256 "
            "calibration samples in batches of 32; wall time "
            f"{time.perf_counter() - started:.0f} s. Generated by "
            "`benchmarks/bench_e2e_samples.py`.",
            "",
            "`D`: end-to-end work per scheme in exact mode, in fp32 passes; `auto_samples`: "
            'the samples `e2e_samples="auto"` measures on (exact up to D = 2, else half a pass per scheme, at least 8); '
            "`auto_pick`: which (`uncertain`: those of highest fp32 output entropy, for a KL "
            "metric); `first_*`: the first `auto_samples` samples instead; "
            "`previous_samples`: the previous rule's (exact up to D = 2, else one pass, at "
            "least 16). `rho`: Spearman rank correlation of the `e2e` column with exact mode's "
            "over all (layer, scheme) rows; `min_scheme_rho`: the lowest over the schemes of "
            "the rank correlation of the layers under one scheme.",
            "",
            md_table(rows, columns),
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
