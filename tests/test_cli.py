from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from mpsearch.cli import COMMANDS, EXIT_BAD_INPUT, EXIT_ERROR, EXIT_OK, main
from mpsearch.plan import PrecisionPlan


def _config(tmp_path: Path, **extra) -> str:
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


def _call(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def steps_done(tmp_path_factory) -> dict:
    """`profile`, then `cost`, then `search` on one small study (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("cli-steps")
    config = _config(tmp, controller="{epsilons: [0.05], repeats: 1}")
    profile_cache = tmp / "cache" / "profile"
    runs = {"config": config, "tmp": tmp}
    runs["profile"] = _call("profile", config, "--quiet")
    runs["profile_cache"] = {p: p.stat().st_size for p in profile_cache.rglob("*") if p.is_file()}
    runs["cost"] = _call("cost", config, "--quiet")
    runs["search"] = _call("search", config)
    runs["profile_cache_after"] = {
        p: p.stat().st_size for p in profile_cache.rglob("*") if p.is_file()
    }
    return runs


def test_profile_prints_a_table_and_writes_the_profile(steps_done) -> None:
    code, out, err = steps_done["profile"]
    assert code == EXIT_OK, err
    assert "profile (e2e per layer and scheme)" in out
    table = pd.read_csv(steps_done["tmp"] / "out" / "profile.csv")
    assert set(table["scheme"]) == {"bf16", "w8a8"}
    for layer in table["layer"].unique():  # every layer is a row of the printed table
        assert re.search(rf"^\s*{re.escape(layer)}\s", out, re.M), out
    assert "workload" not in out  # --quiet: no step lines


def test_cost_prints_uniform_plans(steps_done) -> None:
    code, out, err = steps_done["cost"]
    assert code == EXIT_OK, err
    assert "uniform plan" in out and "w8a8" in out and "bf16" in out
    cost = pd.read_csv(steps_done["tmp"] / "out" / "cost.csv")
    assert {"layer", "scheme", "memory_bytes", "latency_ms"} <= set(cost.columns)


def test_search_reuses_the_cached_profile_and_prints_the_front(steps_done) -> None:
    code, out, err = steps_done["search"]
    assert code == EXIT_OK, err
    # the profile cache was written by `profile` and only read by `search`
    assert steps_done["profile_cache"], "profile wrote no cache"
    assert steps_done["profile_cache_after"] == steps_done["profile_cache"]
    assert "Pareto front" in out and "chosen:" in out
    assert "search: 12 trials" in out  # the step line (not --quiet)
    out_dir = steps_done["tmp"] / "out"
    front = pd.read_csv(out_dir / "pareto.csv")
    for trial in front["trial"]:
        assert re.search(rf"^\s*{trial}\s", out, re.M)
    assert PrecisionPlan.load(out_dir / "best_plan.json").rules
    info = json.loads((out_dir / "study.json").read_text())
    assert info["config"]["n_trials"] == 12 and info["fp32_memory_mb"] > 0


def test_report_command_writes_html_and_markdown(steps_done) -> None:
    """From the study output directory (`run` below covers the config form)."""
    html = steps_done["tmp"] / "report" / "r.html"
    code, out, err = _call("report", str(steps_done["tmp"] / "out"), "-o", str(html))
    assert code == EXIT_OK, err
    assert f"report: {html}" in out
    assert html.read_text().count("data:image/png;base64,") >= 3
    assert "## Pareto front" in html.with_suffix(".md").read_text()


def test_run_end_to_end_writes_plan_summary_controller_and_report(steps_done) -> None:
    """`run` after the steps: resumes the study, measures, adds the controller curve and report."""
    code, out, err = _call("run", steps_done["config"], "--quiet")
    assert code == EXIT_OK, err
    out_dir = steps_done["tmp"] / "out"
    assert "best plan under the budget" in out and "uniform:w8a8" in out
    assert f"report: {out_dir / 'report.html'}" in out
    assert (
        f"best plan under the budget {{'memory_fraction': 0.5}}: {out_dir / 'best_plan.json'}"
        in out
    )
    plan = PrecisionPlan.load(out_dir / "best_plan.json")
    summary = pd.read_csv(out_dir / "summary.csv")
    best = summary[summary["plan"] == "best"].iloc[0]
    assert best["memory_ratio"] <= 0.5 + 1e-9
    assert set(plan.rules.values()) <= {"fp32", "bf16", "w8a8"}
    curve = pd.read_csv(out_dir / "controller.csv")
    assert {"static:fp32", "ctrl:ratio:0.05"} <= set(curve["method"])
    assert curve["disagreement"].between(0, 1).all() and (curve["latency_ms"] > 0).all()
    assert 'id="fig-controller"' in (out_dir / "report.html").read_text()
    assert "search: 12 trials" not in out  # --quiet


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(name, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert "example:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"workload": "imagenet"}, "'workload' argument must be one of"),
        ({"n_trials": 0}, "'n_trials' argument must be a positive integer"),
        ({"budget": "{memory_mb: -1}"}, "'memory_mb' argument must be a positive number"),
        ({"trials": 3}, r"unknown key\(s\) \['trials'\]"),
        ({"controller": "{epsilons: [2]}"}, r"'controller.epsilons' argument must be"),
        ({"controller": "{scorer: psychic}"}, r"'controller.scorer' argument must be one of"),
        ({"search": "{n_jobs: 0}"}, r"'n_jobs' option must be a positive integer"),
        ({"search": "{screening: false}"}, r"Unknown search option\(s\) \['screening'\]"),
        ({"search": "{seed: 3}"}, r"set them at the top level"),
        ({"workload": "nosuch.module:make"}, r"importable 'module:function' \(No module named"),
    ],
)
@pytest.mark.parametrize("command", ["run", "profile", "search"])
def test_bad_configs_give_one_line_and_exit_2(tmp_path, extra, message, command) -> None:
    code, _, err = _call(command, _config(tmp_path, **extra))
    assert code == EXIT_BAD_INPUT
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_missing_config_file(tmp_path) -> None:
    code, _, err = _call("run", str(tmp_path / "nope.yaml"))
    assert code == EXIT_BAD_INPUT
    assert "Cannot read study config" in err


def test_unknown_profile_metric_is_refused(steps_done) -> None:
    code, _, err = _call("profile", steps_done["config"], "--metric", "vibes", "--quiet")
    assert code == EXIT_BAD_INPUT
    assert "'metric' argument must be one of" in err and "Traceback" not in err


def test_report_without_results_says_what_to_run(tmp_path) -> None:
    code, _, err = _call("report", _config(tmp_path))
    assert code == EXIT_BAD_INPUT
    assert "No study output directory" in err and "mpsearch run" in err
    (tmp_path / "out").mkdir()
    code, _, err = _call("report", _config(tmp_path))
    assert code == EXIT_BAD_INPUT
    assert "run `mpsearch search` or `mpsearch run`" in err


def test_export_without_a_plan_says_what_to_run(tmp_path) -> None:
    code, _, err = _call("export", _config(tmp_path))
    assert code == EXIT_BAD_INPUT
    assert "run `mpsearch search" in err and "--plan" in err


def test_export_writes_the_chosen_plan(steps_done) -> None:
    pytest.importorskip("mpsearch.export", reason="mpsearch.export is not importable yet")
    out = steps_done["tmp"] / "export"
    code, stdout, err = _call(
        "export", steps_done["config"], "--formats", "plan,state_dict", "-o", str(out), "--quiet"
    )
    assert code == EXIT_OK, err
    assert (out / "plan.json").exists()
    assert PrecisionPlan.load(out / "plan.json").rules == (
        PrecisionPlan.load(steps_done["tmp"] / "out" / "best_plan.json").rules
    )
    assert "state_dict" in stdout and "exported" in stdout


def test_export_shows_the_formats_written_when_one_fails(steps_done, monkeypatch) -> None:
    """A format whose writer fails (here one that raises like torch.export on an untraceable
    model) exits 1 with one line naming it, after the table of the formats written."""
    pytest.importorskip("mpsearch.export", reason="mpsearch.export is not importable yet")
    from mpsearch.export import EXPORT_FORMATS

    def untraceable(*_: object) -> None:
        raise RuntimeError("Could not guard on data-dependent expression\n(details)")

    program = EXPORT_FORMATS["program"]
    monkeypatch.setitem(EXPORT_FORMATS, "program", dataclasses.replace(program, write=untraceable))
    out = steps_done["tmp"] / "export-in-part"
    code, stdout, err = _call(
        "export", steps_done["config"], "--formats", "plan,program", "-o", str(out), "--quiet"
    )
    assert code == EXIT_ERROR, err
    assert "in part" in stdout and "plan.json" in stdout
    assert "could not write ['program']" in err and "data-dependent" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]


def test_export_refuses_an_unknown_format_before_work(steps_done) -> None:
    pytest.importorskip("mpsearch.export", reason="mpsearch.export is not importable yet")
    code, _, err = _call("export", steps_done["config"], "--formats", "gif", "--quiet")
    assert code == EXIT_BAD_INPUT
    assert "'formats' argument must be one of" in err


def test_a_type_error_from_a_bug_exits_1_with_its_traceback(tmp_path, monkeypatch) -> None:
    """Only validated bad input exits 2; a TypeError raised by a bug shows where it happened."""
    import mpsearch.pipeline

    def broken(spec: str, **_: object):
        return 1 + "a"  # a bug

    monkeypatch.setattr(mpsearch.pipeline, "build_workload", broken)
    code, _, err = _call("profile", _config(tmp_path), "--quiet")
    assert code == EXIT_ERROR
    assert "Traceback" in err and "TypeError: unsupported operand" in err


def test_a_validated_type_error_is_bad_input(tmp_path, monkeypatch) -> None:
    from mpsearch._validation import InvalidTypeError
    from mpsearch.pipeline import StudySteps

    def refuse(self):
        raise InvalidTypeError("The 'model' argument must be a torch.nn.Module. Got int instead.")

    monkeypatch.setattr(StudySteps, "run", refuse)
    code, _, err = _call("run", _config(tmp_path))
    assert code == EXIT_BAD_INPUT
    assert "Traceback" not in err and "'model' argument must be" in err


def test_run_command_runs_the_pipelines_steps(tmp_path, monkeypatch) -> None:
    """`mpsearch run` is StudySteps.run (the steps run_study runs), not a copy of them."""
    from mpsearch.pipeline import StudySteps

    seen = []

    def spy(self):
        seen.append(self.config.study_name)
        raise ValueError("the pipeline's steps ran")

    monkeypatch.setattr(StudySteps, "run", spy, raising=False)
    code, _, err = _call("run", _config(tmp_path), "--quiet")
    assert seen == ["cli-mlp"]
    assert code == EXIT_BAD_INPUT and "the pipeline's steps ran" in err


def test_export_finds_the_plan_under_the_output_table_name(steps_done, monkeypatch) -> None:
    """The chosen plan's file name comes from mpsearch.report.FILES, not a literal."""
    pytest.importorskip("mpsearch.export", reason="mpsearch.export is not importable yet")
    from mpsearch.report import FILES

    out_dir = steps_done["tmp"] / "renamed"
    out_dir.mkdir()
    (out_dir / "chosen.json").write_text((steps_done["tmp"] / "out" / "best_plan.json").read_text())
    monkeypatch.setitem(FILES, "best", "chosen.json")
    export_dir = steps_done["tmp"] / "export-renamed"
    code, out, err = _call(
        "export",
        steps_done["config"],
        "--output-dir",
        str(out_dir),
        "--formats",
        "plan",
        "-o",
        str(export_dir),
        "--quiet",
    )
    assert code == EXIT_OK, err
    assert f"exported {out_dir / 'chosen.json'}" in out


def test_search_resume_flags(steps_done) -> None:
    """--no-resume refuses an existing study (exit 2, before any trial); --resume continues it."""
    config = steps_done["config"]
    code, _, err = _call("search", config, "--no-resume", "--quiet")
    assert code == EXIT_BAD_INPUT, err
    assert "already holds a study named 'cli-mlp'" in err and "--resume" in err
    code, _, err = _call("search", config, "--resume", "--n-trials", "13", "--quiet")
    assert code == EXIT_OK, err
    info = json.loads((steps_done["tmp"] / "out" / "study.json").read_text())
    assert info["config"]["n_trials"] == 13


def test_search_with_workers_runs_them_in_separate_processes(steps_done) -> None:
    """--workers N runs the study in N processes on a journal file (reusing the cached profile)."""
    import os

    import optuna

    from mpsearch.search import make_storage
    from mpsearch.search._leases import WORKER_ATTR

    tmp = steps_done["tmp"]
    storage = str(tmp / "workers.log")
    code, out, err = _call(
        "search",
        steps_done["config"],
        "--workers",
        "2",
        "--storage",
        storage,
        "--study-name",
        "cli-workers",
        "--output-dir",
        str(tmp / "out-workers"),
        "--n-trials",
        "6",
    )
    assert code == EXIT_OK, err
    assert "in 2 processes" in out
    study = optuna.load_study(study_name="cli-workers", storage=make_storage(storage))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    pids = {t.system_attrs[WORKER_ATTR].rsplit(":", 1)[1] for t in complete}
    assert str(os.getpid()) not in pids


def test_workers_on_sqlite_are_refused_before_any_work(tmp_path) -> None:
    code, _, err = _call("search", _config(tmp_path), "--workers", "2")
    assert code == EXIT_BAD_INPUT
    assert "2 workers need a storage that several processes can share" in err
    assert not (tmp_path / "cache").exists()
