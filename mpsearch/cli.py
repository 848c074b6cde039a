"""The ``mpsearch`` command line: ``mpsearch run studies/digits.yaml`` and friends.

Exit codes: 0 success, 2 bad input (a message, no traceback), 1 an unexpected error,
130 interrupted (what was computed is kept: caches and studies resume).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help_text: str) -> Callable:
    """Register a sub-command: the decorated function adds arguments and returns the runner."""

    def register(setup: Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]) -> Callable:
        def add(parser: argparse.ArgumentParser) -> None:
            parser.set_defaults(_run=setup(parser))

        COMMANDS[name] = (add, lambda ns: ns._run(ns), help_text)
        return setup

    return register


def _study_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="study config YAML (see studies/*.yaml)")
    parser.add_argument("--n-trials", type=int, default=None, help="override the config's n_trials")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (sqlite:///..., postgresql://...)")
    parser.add_argument("--study-name", default=None, help="override the study name")
    parser.add_argument("--seed", type=int, default=None, help="override the seed")


@command("run", "profile, measure, search, quantize and summarise one study end to end")
def _run_setup(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _study_args(parser)
    parser.epilog = "example: mpsearch run studies/digits.yaml --n-trials 60"

    def run(ns: argparse.Namespace) -> int:
        from mpsearch.pipeline import StudyConfig, run_study

        config = StudyConfig.from_yaml(ns.config, n_trials=ns.n_trials, storage=ns.storage, study_name=ns.study_name, seed=ns.seed)
        outcome = run_study(config)
        print()
        print(f"best plan under the budget {config.budget or '(none)'}: {outcome.plan_path}")
        print(outcome.summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        return EXIT_OK

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpsearch",
        description="Adaptive mixed-precision search for PyTorch models.",
        epilog="example: mpsearch run studies/digits.yaml",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, _runner, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return COMMANDS[ns.command][1](ns)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"mpsearch {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"mpsearch {ns.command}: interrupted; caches and the study keep what was finished.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
