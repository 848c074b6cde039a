"""Shared command line of the search-run scripts in ``studies/``: run one fixed-seed study
through the pipeline and print the figures ``benchmarks/bench_search.py`` reports for it.

Each script names its YAML config; this module parses the options, runs
:func:`mpsearch.pipeline.run_study` (which resumes a stored study instead of starting over)
and prints: the summary measured on the real backend (fp32, uniform plans and the chosen plan,
with speed-ups), the hypervolume of mpsearch's plans and of the uniform / greedy / ILP
warm-start plans with one reference point, the true evaluations (and how many reached 99 % of
the final hypervolume), and the best plan of each method at the benchmark's budgets. The same
tables are written to ``<output_dir>/benchmark.md``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

BUDGETS = {
    "mem 50%": {"memory_fraction": 0.5},
    "mem 30%": {"memory_fraction": 0.3},
    "mem 20%": {"memory_fraction": 0.2},
    "lat 60%": {"latency_fraction": 0.6},
}
SMOKE_TRIALS = 8


def parse_args(description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-trials", type=int, help="trials of the study (default: the config's)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a quick check: {SMOKE_TRIALS} trials (unless --n-trials), in a separate "
        "'<name>-smoke' study and output folder, no deploy backends (the digits CNN's "
        "cpu-pt2e rows took 95 of its 105 s)",
    )
    parser.add_argument(
        "--storage", help="Optuna storage URL (default: sqlite:///studies/<name>.db)"
    )
    parser.add_argument("--study-name", help="study name (default: the config's)")
    parser.add_argument("--output-dir", help="output folder (default: studies/out/<name>)")
    parser.add_argument("--cache-dir", help="profile / cost cache (default: studies/.cache)")
    args = parser.parse_args(argv)
    if args.n_trials is not None and args.n_trials < 1:
        parser.error(f"--n-trials must be a positive integer. Got {args.n_trials} instead.")
    return args


def table(df: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (4 significant digits)."""

    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(config_path: Path, *, description: str, argv: Sequence[str] | None = None) -> int:
    """Run the study of ``config_path`` with the command-line options; print its figures."""
    args = parse_args(description, argv)
    # imported after the options are parsed, so that --help and bad options answer at once
    import optuna

    from mpsearch.pipeline import StudyConfig, run_study
    from mpsearch.viz.data import (
        evaluations_to_reach,
        hypervolume_data,
        hypervolume_reference,
        method_budget_data,
        method_hypervolume_data,
    )

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = StudyConfig.from_yaml(config_path)
    name = args.study_name or base.study_name
    if args.smoke:
        name = f"{name}-smoke"
    n_trials = args.n_trials or (SMOKE_TRIALS if args.smoke else None)
    config = StudyConfig.from_yaml(
        config_path,
        study_name=name,
        n_trials=n_trials,
        storage=args.storage,
        output_dir=args.output_dir,
        cache_dir=args.cache_dir,
        deploy=[] if args.smoke else None,
    )
    print(
        f"study {config.study_name!r}: {config.workload}, {config.n_trials} trials, seed {config.seed}, storage {config.storage_url}"
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = run_study(config, progress=False)
    res = outcome.result

    summary = outcome.summary[
        ["plan", "quality", "memory_mb", "latency_ms", "memory_ratio", "speedup", "quality_drop"]
    ]
    # the benchmark's reference (fp32 memory and latency), and one raised to the costliest plan
    # (on a busy machine quantized plans can be predicted slower than fp32 and add no volume)
    reference = hypervolume_reference(res)
    covering = hypervolume_reference(res, cover_all=True)
    hv = method_hypervolume_data(res, reference=reference)
    hv_all = method_hypervolume_data(res, reference=covering)
    hv["hypervolume (all plans)"] = hv_all["hypervolume"]
    hv["relative (all plans)"] = hv_all["relative"]
    history = hypervolume_data(res, reference)
    if not len(history) or not history["hypervolume"].iloc[-1] > 0:
        history = hypervolume_data(res, covering)
    budgets = method_budget_data(res, BUDGETS)
    budget_quality = budgets.pivot(index="budget", columns="method", values="quality")
    budget_quality = budget_quality.reindex(index=list(BUDGETS), columns=list(hv["method"]))
    budget_quality = budget_quality.reset_index()
    evals = res.n_true_evaluations
    reached = evaluations_to_reach(history, 0.99)
    sections = [
        f"# {config.study_name}\n",
        f"{config.workload}, seed {config.seed}, {len(res.trials)} trials, {evals} true evaluations "
        f"(99 % of the final hypervolume after {reached}), {len(res.pareto)} plans on the front; "
        f"fp32 {res.fp32_memory_mb:.4g} MB, {res.fp32_latency_ms:.4g} ms (cost model); "
        f"budget limits (MB, ms) {res.limits}; wall time {time.perf_counter() - started:.0f} s.\n",
        f"Measured on the {config.backend!r} backend (quality on the test split):\n",
        table(summary),
        "",
        "Hypervolume over (quality up, memory down, latency down), reference "
        f"({reference[0]:.4f}, {reference[1]:.4g} MB, {reference[2]:.4g} ms) as in the benchmark, "
        f"and ({covering[0]:.4f}, {covering[1]:.4g} MB, {covering[2]:.4g} ms) covering all plans; "
        "a baseline's points are the evaluated plans it proposes:\n",
        table(hv),
        "",
        "Best quality of each method at each budget (fractions of fp32; NaN: no plan meets it):\n",
        table(budget_quality),
        "",
    ]
    text = "\n".join(sections)
    print("\n" + text)
    out = config.out_dir / "benchmark.md"
    out.write_text(text)
    print(f"wrote {out}")
    return 0
