"""The search-run scripts in studies/: options, and one smoke run end to end (slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[2] / "studies"
SCRIPTS = ["digits_cnn.py", "resnet18.py", "text_transformer.py"]


def run(script: str, *args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STUDIES / script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_names_the_options_and_the_config_loads(script: str, tmp_path: Path) -> None:
    out = run(script, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for option in ("--n-trials", "--smoke", "--storage", "--output-dir"):
        assert option in out.stdout
    from mpsearch.pipeline import StudyConfig

    config = StudyConfig.from_yaml(STUDIES / script.replace(".py", ".yaml"))
    # the benchmark's settings (benchmarks/bench_search.py): whole front, its profile batches
    assert config.seed == 0 and config.workload == script.replace(".py", "")
    assert config.budget == {} and config.profile_batches == BENCH_PROFILE_BATCHES[script]


BENCH_PROFILE_BATCHES = {"digits_cnn.py": 4, "resnet18.py": 1, "text_transformer.py": 4}


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "4"])
def test_bad_profile_batches_is_refused(value: object) -> None:
    from mpsearch.pipeline import StudyConfig

    with pytest.raises(ValueError, match="'profile_batches'"):
        StudyConfig(workload="digits_cnn", profile_batches=value)


def test_bad_trial_count_is_refused_before_any_work(tmp_path: Path) -> None:
    out = run("digits_cnn.py", "--n-trials", "0", cwd=tmp_path)
    assert out.returncode == 2
    assert "--n-trials must be a positive integer. Got 0 instead." in out.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_digits_smoke_run_prints_the_benchmark_figures(tmp_path: Path) -> None:
    out = run(
        "digits_cnn.py",
        "--smoke",
        "--n-trials",
        "5",
        "--storage",
        f"sqlite:///{tmp_path / 's.db'}",
        "--output-dir",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "study 'digits_cnn-smoke': digits_cnn, 5 trials, seed 0" in text
    assert "| mpsearch |" in text and "| uniform |" in text and "| mem 30% |" in text
    assert (tmp_path / "out" / "benchmark.md").read_text() in text
    assert (tmp_path / "out" / "best_plan.json").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_config_gives_its_search_options(script: str) -> None:
    from mpsearch.pipeline import StudyConfig

    config = StudyConfig.from_yaml(STUDIES / script.replace(".py", ".yaml"))
    options = config.search_options()
    assert (options.n_trials, options.seed, options.sampler) == (
        config.n_trials,
        config.seed,
        config.sampler,
    )
    assert options.study_name == config.study_name and options.storage == config.storage_url
    assert options.load_if_exists  # a rerun resumes the stored study
