"""The ``mpsearch`` command line: ``mpsearch run studies/digits.yaml`` and friends.

Commands (each reads a study config YAML; see ``studies/digits.yaml``):

- ``run``: every step below, then the report;
- ``profile``: the sensitivity profile (cached; ``search`` reuses it);
- ``cost``: the cost model on the study's backend (cached);
- ``search``: the Optuna search (resumes the study), the front and the chosen plan;
- ``report``: HTML + Markdown report of what the study wrote to its output directory;
- ``export``: the chosen (or a given) plan's quantized model to ONNX / torch.export / state dict.

Exit codes: 0 success, 2 bad input (a one-line message, no traceback), 1 an unexpected error
(with its traceback), 130 interrupted (what was computed is kept: caches and studies resume).
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mpsearch._validation import InvalidTypeError

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
# what validated bad input raises (one line, exit 2); any other exception is a bug (exit 1)
BAD_INPUT: tuple[type[Exception], ...] = (ValueError, InvalidTypeError, FileNotFoundError)

Runner = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Runner, str]] = {}


def command(name: str, help_text: str) -> Callable:
    """Register a sub-command: the decorated function adds arguments and returns the runner."""

    def register(setup: Callable[[argparse.ArgumentParser], Runner]) -> Callable:
        def add(parser: argparse.ArgumentParser) -> None:
            parser.set_defaults(_run=setup(parser))

        COMMANDS[name] = (add, lambda ns: ns._run(ns), help_text)
        return setup

    return register


# ------------------------------------------------------------------------------ shared parts
def _study_args(parser: argparse.ArgumentParser, *, search: bool = False) -> None:
    parser.add_argument("config", type=Path, help="study config YAML (see studies/*.yaml)")
    if search:
        parser.add_argument(
            "--n-trials", type=int, default=None, help="override the config's n_trials"
        )
        parser.add_argument(
            "--storage",
            default=None,
            help="Optuna storage URL (sqlite:///..., studies/x.log, postgresql://...)",
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=None,
            help="search in N processes (needs a journal-file or PostgreSQL --storage)",
        )
        parser.add_argument(
            "--resume",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="continue the stored study of that name (default: the config's load_if_exists); "
            "--no-resume refuses to touch an existing study",
        )
    parser.add_argument("--study-name", default=None, help="override the study name")
    parser.add_argument("--seed", type=int, default=None, help="override the seed")
    parser.add_argument(
        "--output-dir", default=None, help="override the output directory (studies/out/<study>)"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or step lines, only results"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show Optuna's line per trial"
    )


def _epilog(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def _config(ns: argparse.Namespace) -> Any:
    from mpsearch.pipeline import StudyConfig

    return StudyConfig.from_yaml(
        ns.config,
        n_trials=getattr(ns, "n_trials", None),
        storage=getattr(ns, "storage", None),
        workers=getattr(ns, "workers", None),
        load_if_exists=getattr(ns, "resume", None),
        study_name=ns.study_name,
        seed=ns.seed,
        output_dir=ns.output_dir,
    )


def _steps(ns: argparse.Namespace) -> Any:
    """Config (validated before any work) and the study's steps, with logging as asked."""
    import optuna

    from mpsearch.pipeline import StudySteps

    config = _config(ns)
    if not ns.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if ns.quiet:
        return StudySteps(config, log=None, progress=False)
    return StudySteps(config, log=lambda line: print(line, flush=True), progress=None)


def _table(df: Any, *, title: str) -> None:
    print()
    print(title)
    if not len(df):
        print("  (empty)")
        return
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def _report(steps: Any, out: Path | None = None) -> tuple[Path, Path]:
    from mpsearch.report import write_report

    return write_report(steps.config.out_dir, out)


# ---------------------------------------------------------------------------------- commands
@command("run", "profile, measure, search, quantize, summarise and report one study end to end")
def _run_setup(parser: argparse.ArgumentParser) -> Runner:
    _study_args(parser, search=True)
    parser.add_argument("--no-report", action="store_true", help="do not write the report")
    parser.epilog = _epilog(
        "mpsearch run studies/digits.yaml",
        "mpsearch run studies/digits.yaml --n-trials 100 --quiet",
    )

    def run(ns: argparse.Namespace) -> int:
        steps = _steps(ns)
        outcome = steps.run()
        if outcome.record is not None and outcome.record.controller is not None:
            _table(
                outcome.record.controller,
                title="run-time controller (per-input latency, disagreement with fp32)",
            )
        _table(
            outcome.summary,
            title=f"best plan under the budget {outcome.config.budget or '(none)'}: "
            f"{outcome.plan_path}",
        )
        if not ns.no_report:
            html_path, md_path = _report(steps)
            print(f"\nreport: {html_path} (and {md_path.name})")
        return EXIT_OK

    return run


@command("profile", "profile each layer's sensitivity to each scheme (cached)")
def _profile_setup(parser: argparse.ArgumentParser) -> Runner:
    _study_args(parser)
    parser.add_argument(
        "--metric",
        default="e2e",
        help="column shown in the summary table (e2e, mse, sqnr_db; default e2e)",
    )
    parser.epilog = _epilog("mpsearch profile studies/digits.yaml --metric sqnr_db")

    def run(ns: argparse.Namespace) -> int:
        from mpsearch._validation import unknown
        from mpsearch.profile._result import METRICS

        if ns.metric not in METRICS:
            raise unknown("metric", ns.metric, METRICS)
        steps = _steps(ns)
        prof = steps.profile
        wide = prof.pivot(ns.metric).reset_index()
        steps.save()
        sizes = prof.table.drop_duplicates("layer").set_index("layer")["params"]
        wide.insert(1, "params", wide["layer"].map(sizes))
        _table(wide, title=f"profile ({ns.metric} per layer and scheme): {steps.config.out_dir}")
        return EXIT_OK

    return run


@command("cost", "measure memory and latency of every layer in every scheme (cached)")
def _cost_setup(parser: argparse.ArgumentParser) -> Runner:
    _study_args(parser)
    parser.epilog = _epilog("mpsearch cost studies/digits.yaml")

    def run(ns: argparse.Namespace) -> int:
        import pandas as pd

        steps = _steps(ns)
        cost = steps.cost
        steps.save()
        rows = []
        for scheme in cost.schemes:
            plan = {n: scheme if cost.supported(n, scheme) else "fp32" for n in cost.layers}
            memory, latency = cost.memory_mb(plan), cost.latency_ms(plan)
            if any(s != scheme for s in plan.values()):
                scheme = f"{scheme} (where supported)"
            rows.append(
                {
                    "uniform plan": scheme,
                    "memory_mb": memory,
                    "predicted_ms": latency,
                    "memory_ratio": memory * 1e6 / cost.fp32_memory_bytes,
                }
            )
        _table(
            pd.DataFrame(rows),
            title=f"cost model on {steps.config.backend!r}: {steps.config.out_dir}",
        )
        return EXIT_OK

    return run


@command("search", "search per-layer schemes under the budget (resumes the study)")
def _search_setup(parser: argparse.ArgumentParser) -> Runner:
    _study_args(parser, search=True)
    parser.epilog = _epilog(
        "mpsearch profile studies/digits.yaml && mpsearch search studies/digits.yaml --n-trials 80"
    )

    def run(ns: argparse.Namespace) -> int:
        from mpsearch.report import front_table

        steps = _steps(ns)
        steps.result  # noqa: B018  (runs the search)
        record = steps.save()
        front = front_table(record)
        chosen = "none meets the budget" if record.best is None else str(steps.best.rules)
        _table(front, title=f"Pareto front ({len(front)} plans); chosen: {chosen}")
        return EXIT_OK

    return run


@command("report", "write the HTML + Markdown report of a study's results")
def _report_setup(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("config", type=Path, help="study config YAML, or a study output directory")
    parser.add_argument("--study-name", default=None, help="override the study name")
    parser.add_argument("--output-dir", default=None, help="override the output directory")
    parser.add_argument(
        "-o", "--out", type=Path, default=None, help="HTML path (default <output dir>/report.html)"
    )
    parser.epilog = _epilog(
        "mpsearch report studies/digits.yaml",
        "mpsearch report studies/out/digits -o /tmp/digits.html",
    )

    def run(ns: argparse.Namespace) -> int:
        from mpsearch.report import build_report, write_report

        if ns.config.is_dir():
            source = ns.config
        else:
            ns.seed = None
            source = _config(ns).out_dir
        report = build_report(source)
        html_path, md_path = write_report(report, ns.out or Path(source) / "report.html")
        h = report.headline
        import pandas as pd

        keys = (
            "study",
            "trials",
            "front_size",
            "best_quality",
            "memory_ratio",
            "speedup_vs_fp32",
            "best_uniform",
            "speedup_vs_best_uniform",
        )
        _table(pd.DataFrame([{k: h[k] for k in keys}]), title="report")
        print(f"\nreport: {html_path} (and {md_path.name})")
        return EXIT_OK

    return run


@command("export", "export the chosen plan's quantized model (ONNX, torch.export, state dict)")
def _export_setup(parser: argparse.ArgumentParser) -> Runner:
    _study_args(parser)
    parser.add_argument(
        "--plan", type=Path, default=None, help="plan JSON (default: the study's chosen plan)"
    )
    parser.add_argument(
        "--formats", default=None, help="comma-separated formats (default: the exporter's)"
    )
    parser.add_argument("--backend", default=None, help="override the config's backend")
    parser.add_argument(
        "-o", "--out", type=Path, default=None, help="directory (default <output dir>/export)"
    )
    parser.epilog = _epilog(
        "mpsearch export studies/digits.yaml --formats onnx,state_dict",
        "mpsearch export studies/digits.yaml --plan my_plan.json -o /tmp/digits_export",
    )

    def run(ns: argparse.Namespace) -> int:
        from mpsearch.plan import PrecisionPlan
        from mpsearch.report import FILES

        config = _config(ns)
        plan_path = ns.plan or config.out_dir / FILES["best"]
        if not plan_path.exists():
            raise ValueError(
                f"No plan at {plan_path}: run `mpsearch search {ns.config}` first or pass --plan."
            )
        plan = PrecisionPlan.load(plan_path)
        formats = None
        if ns.formats is not None:
            formats = [f.strip() for f in ns.formats.split(",") if f.strip()]
            if not formats:
                raise ValueError(f"--formats: no format named in {ns.formats!r}.")
        from mpsearch._validation import unknown
        from mpsearch.export import EXPORT_FORMATS, ExportError, export_plan

        for name in formats or ():
            if name not in EXPORT_FORMATS:
                raise unknown("formats", name, EXPORT_FORMATS)
        steps = _steps(ns)
        wl = steps.workload
        options: dict[str, Any] = {
            "example_input": wl.example_input,
            "backend": ns.backend or config.backend,
        }
        if formats is not None:
            options["formats"] = formats
        out_dir = ns.out or config.out_dir / "export"
        model, plan = steps.rounded(plan)  # a plan with calibrated roundings: rounded weights
        try:
            exported = export_plan(model, plan, out_dir, **options)
        except ExportError as err:  # the formats that worked are written: show them
            if err.result.records:
                _table(err.result.to_frame(), title=f"exported {plan_path} to {out_dir} in part")
            print(f"mpsearch export: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_ERROR
        _table(exported.to_frame(), title=f"exported {plan_path} to {out_dir}")
        return EXIT_OK

    return run


# -------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered command."""
    parser = argparse.ArgumentParser(
        prog="mpsearch",
        description="Adaptive mixed-precision search for PyTorch models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(
            "mpsearch run studies/digits.yaml          # everything, then the report",
            "mpsearch profile studies/digits.yaml      # one step at a time; later steps reuse it",
            "mpsearch search studies/digits.yaml --n-trials 80",
            "mpsearch report studies/digits.yaml",
            "mpsearch COMMAND --help                   # each command's options",
        )
        + "\n\nexit codes: 0 done, 1 unexpected error, 2 bad input (a one-line message), "
        "130 interrupted (caches and studies keep what was finished; rerun to resume)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, _runner, help_text) in COMMANDS.items():
        add(
            sub.add_parser(
                name,
                help=help_text,
                description=help_text,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    print(f"mpsearch: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mpsearch`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    >>> main(["report", "studies/out/digits"])   # doctest: +SKIP
    0
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            warnings.filterwarnings("ignore", message=r".*is experimental \(supported from")
            return COMMANDS[ns.command][1](ns)
    except BAD_INPUT as exc:
        print(f"mpsearch {ns.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"mpsearch {ns.command}: interrupted; caches and the study keep what was finished.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception:  # a bug, not the user's input: show where
        traceback.print_exc()
        print(f"mpsearch {ns.command}: unexpected error (traceback above).", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
