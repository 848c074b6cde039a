from __future__ import annotations

import re

import pandas as pd
import pytest

from mpsearch.cli import EXIT_BAD_INPUT, EXIT_OK, main
from mpsearch.plan import PrecisionPlan


def _config(tmp_path, **extra) -> str:
    lines = {
        "study_name": "cli-mlp",
        "workload": "mlp",
        "schemes": "[bf16, w8a8]",
        "space": "mlp",
        "budget": "{memory_fraction: 0.5}",
        "n_trials": 12,
        "storage": f"sqlite:///{tmp_path}/cli.db",
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    return str(path)


def test_run_end_to_end_writes_plan_and_summary(tmp_path, capsys) -> None:
    assert main(["run", _config(tmp_path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "best plan under the budget" in out and "uniform:w8a8" in out
    plan = PrecisionPlan.load(tmp_path / "out" / "best_plan.json")
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    best = summary[summary["plan"] == "best"].iloc[0]
    assert best["memory_ratio"] <= 0.5 + 1e-9
    assert set(plan.rules.values()) <= {"fp32", "bf16", "w8a8"}
    # a second run resumes the study instead of starting over
    assert main(["run", _config(tmp_path)]) == EXIT_OK


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"workload": "imagenet"}, "'workload' argument must be one of"),
        ({"n_trials": 0}, "'n_trials' argument must be a positive integer"),
        ({"budget": "{memory_mb: -1}"}, "'memory_mb' argument must be a positive number"),
        ({"trials": 3}, r"unknown key\(s\) \['trials'\]"),
    ],
)
def test_bad_configs_give_a_message_and_exit_2(tmp_path, capsys, extra, message) -> None:
    assert main(["run", _config(tmp_path, **extra)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_missing_config_file(tmp_path, capsys) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == EXIT_BAD_INPUT
    assert "Cannot read study config" in capsys.readouterr().err
