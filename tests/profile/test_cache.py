"""The profile cache: resume after a crash or a kill, no stale rows, torn lines ignored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from profile_models import batches, chain

from mpsearch.profile import profile

SCHEMES = ["bf16", "w8a8"]


class FailAt:
    """A KL-like metric that raises on its ``fail_at``-th call (its cache identity is fixed)."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at = fail_at
        self.calls = 0

    def __call__(self, ref: torch.Tensor, out: torch.Tensor) -> float:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return float((ref - out).pow(2).mean())


def _cache_lines(cache: Path) -> list[str]:
    return [line for f in cache.glob("*.jsonl") for line in f.read_text().splitlines()]


def test_resume_after_crash_reuses_rows_and_equals_uninterrupted(tmp_path) -> None:
    model, calib = chain(6), batches(2, 4, 32)
    reference = profile(model, calib, schemes=SCHEMES, metric=FailAt(None), progress=False)
    # calls: 1 probe, then per layer 2 batches x 2 schemes -> the 10th call is layer 2 (0-based)
    with pytest.raises(RuntimeError, match="simulated crash"):
        profile(model, calib, schemes=SCHEMES, metric=FailAt(10), cache_dir=tmp_path)
    assert len(_cache_lines(tmp_path)) == 4  # layers 0 and 2 (names '0', '2'), 2 schemes each
    resumed = profile(model, calib, schemes=SCHEMES, metric=FailAt(None), cache_dir=tmp_path)
    assert resumed.info["cached_rows"] == 4 and resumed.info["computed_rows"] == 8
    pd.testing.assert_frame_equal(resumed.table, reference.table, check_exact=True)
    again = profile(model, calib, schemes=SCHEMES, metric=FailAt(None), cache_dir=tmp_path)
    assert again.info["computed_rows"] == 0 and again.info["cached_rows"] == 12


def test_changed_model_reuses_no_rows(tmp_path) -> None:
    model, calib = chain(3), batches(2, 4, 32)
    profile(model, calib, schemes=SCHEMES, cache_dir=tmp_path)
    with torch.no_grad():
        model[2].weight[0, 0] += 1e-3
    changed = profile(model, calib, schemes=SCHEMES, cache_dir=tmp_path)
    assert changed.info["cached_rows"] == 0 and changed.info["computed_rows"] == 6
    other_data = profile(model, batches(2, 4, 32, seed=9), schemes=SCHEMES, cache_dir=tmp_path)
    assert other_data.info["cached_rows"] == 0
    other_metric = profile(model, calib, schemes=SCHEMES, metric="mse", cache_dir=tmp_path)
    assert other_metric.info["cached_rows"] == 0


def test_torn_line_is_ignored_and_repaired(tmp_path) -> None:
    model, calib = chain(3), batches(2, 4, 32)
    first = profile(model, calib, schemes=SCHEMES, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.jsonl")
    lines = path.read_text().splitlines()
    # drop the last row and leave half of it, as a kill during the write would
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    second = profile(model, calib, schemes=SCHEMES, cache_dir=tmp_path)
    assert second.info["cached_rows"] == 5 and second.info["computed_rows"] == 1
    pd.testing.assert_frame_equal(second.table, first.table, check_exact=True)
    for line in path.read_text().splitlines():
        json.loads(line)  # every line is whole again


SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from profile_models import batches, chain
    from mpsearch.profile import profile

    def slow_mse(ref, out):
        time.sleep(0.05)
        return float((ref - out).pow(2).mean())

    prof = profile(chain(8), batches(2, 4, 32), schemes=["bf16", "w8a8"], metric=slow_mse,
                   cache_dir={cache!r}, progress=False)
    print(prof.info["cached_rows"], prof.info["computed_rows"])
    prof.to_parquet({out!r})
    """
)


@pytest.mark.slow  # two fresh interpreters importing torch: ~10-25 s
def test_sigkill_midway_then_resume(tmp_path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out.parquet"
    script = tmp_path / "run.py"
    script.write_text(
        SCRIPT.format(tests=str(Path(__file__).parent), cache=str(cache), out=str(out))
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.monotonic() + 60
    while len(_cache_lines(cache)) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(_cache_lines(cache))
    assert 4 <= kept < 16, kept
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
    )
    cached, computed = map(int, result.stdout.split())
    assert cached >= 4 and cached + computed == 16 and computed <= 16 - 4
    resumed = pd.read_parquet(out)

    def slow_mse(ref: torch.Tensor, out: torch.Tensor) -> float:
        return float((ref - out).pow(2).mean())

    fresh = profile(chain(8), batches(2, 4, 32), schemes=["bf16", "w8a8"], metric=slow_mse)
    pd.testing.assert_frame_equal(resumed, fresh.table, check_exact=True)
