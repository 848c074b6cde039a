"""How studies scale: trials per second with 1, 2, 4 worker processes, and a 5,000-trial study.

Part 1 runs mpsearch's own search (the fake 5-layer model of tests/fake_search.py, a cheap
evaluate) through ``run_workers`` on a journal file with 1, 2 and 4 processes, and through
``search`` on SQLite in one process. Throughput is COMPLETE trials over the span from the
first trial's start to the last one's end (process start-up, ~2 s for torch, excluded).

Part 2 measures a 5,000-trial study with 60 categorical parameters (4 choices each, the
shape of a 60-layer model) and a cheap objective, in a fresh process each: time per trial
(first and last 500) and peak RSS, for the random sampler (5,000 trials) and TPE (fewer
trials: its cost per trial grows with the history, so it is measured on 1,000).

    python benchmarks/bench_scale.py            # writes benchmarks/results/scale.md
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import optuna  # noqa: E402

from mpsearch.cost import cpu_model  # noqa: E402
from mpsearch.search import SearchSpace, search  # noqa: E402
from mpsearch.search._leases import LeasePolicy  # noqa: E402
from mpsearch.search._workers import WorkerPool, WorkerSpec  # noqa: E402

N_TRIALS = 240


def make_setup(work_ms: float = 0.0) -> dict:
    from fake_search import SCHEMES, FakeCost, FakeProfile, fake_model, known_quality

    def evaluate(model):
        end = time.perf_counter() + work_ms / 1e3
        while time.perf_counter() < end:  # CPU-bound work, like a real evaluation
            pass
        return known_quality(model)

    return {
        "model": fake_model(),
        "profile": FakeProfile(),
        "cost": FakeCost(),
        "evaluate": evaluate,
        "space": SearchSpace(schemes=SCHEMES),
        "sampler": "random",
        "screen": False,
    }


def _span(study: optuna.Study) -> tuple[int, float]:
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    start = min(t.datetime_start for t in done)
    end = max(t.datetime_complete for t in done)
    return len(done), (end - start).total_seconds()


def throughput(tmp: Path) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    res = search(
        **make_setup(), storage=f"sqlite:///{tmp}/one.db", study_name="one", n_trials=N_TRIALS
    )
    n, span = _span(res.study)
    rows.append(
        {
            "setup": "search, SQLite, 1 process",
            "workers": 1,
            "evaluate_ms": 0,
            "trials": n,
            "span_s": span,
            "wall_s": time.perf_counter() - t0,
        }
    )
    for (work_ms, n_trials), workers in itertools.product(((0, N_TRIALS), (50, 80)), (1, 2, 4)):
        t0 = time.perf_counter()
        pool = WorkerPool(
            WorkerSpec(f"{__file__}:make_setup", {"work_ms": work_ms}),
            workers=workers,
            storage=f"journal:///{tmp}/w{workers}-{work_ms}.log",
            study_name=f"w{workers}",
            n_trials=n_trials,
            lease=LeasePolicy(lease_s=30),
            log_dir=tmp / f"logs{workers}",
        )
        res = pool.run()
        n, span = _span(res.study)
        rows.append(
            {
                "setup": f"run_workers, journal, {workers} process(es)",
                "workers": workers,
                "evaluate_ms": work_ms,
                "trials": n,
                "span_s": span,
                "wall_s": time.perf_counter() - t0,
            }
        )
    for r in rows:
        r["trials_per_s"] = r["trials"] / r["span_s"]
    return rows


_BIG = r"""
import json, resource, sys, time, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
sampler_name, n, storage = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, sys.argv[4])
from mpsearch.search._storage import make_storage
sampler = {"random": optuna.samplers.RandomSampler(seed=0),
           "tpe": optuna.samplers.TPESampler(seed=0, multivariate=True, n_startup_trials=8)}[sampler_name]
study = optuna.create_study(storage=make_storage(storage), sampler=sampler,
                            directions=["maximize", "minimize"])
choices = ["fp32", "bf16", "w8a8", "w4a16"]
bits = {"fp32": 32, "bf16": 16, "w8a8": 8, "w4a16": 4}
def objective(trial):
    plan = {f"layer{i}": trial.suggest_categorical(f"layer{i}", choices) for i in range(60)}
    mem = sum(bits[s] * (i + 1) for i, s in enumerate(plan.values())) / 8e3
    trial.set_user_attr("plan", plan); trial.set_user_attr("memory_mb", mem)
    return -sum(1 / bits[s] for s in plan.values()), mem
times = []
for _ in range(n):
    t = time.perf_counter(); study.optimize(objective, n_trials=1); times.append(time.perf_counter() - t)
first, last = times[:500], times[-500:]
print(json.dumps({"sampler": sampler_name, "trials": n, "storage": storage.split(":")[0],
                  "first_500_ms": 1e3 * sum(first) / len(first), "last_500_ms": 1e3 * sum(last) / len(last),
                  "total_s": sum(times), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def big_study(tmp: Path) -> list[dict]:
    rows = []
    for sampler, n, storage in [
        ("random", 5000, f"sqlite:///{tmp}/big-random.db"),
        ("tpe", 1000, f"sqlite:///{tmp}/big-tpe.db"),
    ]:
        out = subprocess.run(
            [sys.executable, "-c", _BIG, sampler, str(n), storage, str(ROOT)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = throughput(tmp)
        for r in rows:
            print(r, flush=True)
        big = big_study(tmp)
    base = {r["evaluate_ms"]: r["trials_per_s"] for r in reversed(rows[1:]) if r["workers"] == 1}
    lines = [
        "# Study scaling",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores. Generated by "
        "`python benchmarks/bench_scale.py`.",
        "",
        "## Trials per second (fake 5-layer model, random sampler)",
        "",
        "`evaluate` is free (0 ms: storage and sampler overhead only) or 50 ms of CPU work.",
        "",
        "| setup | evaluate (ms) | trials | span (s) | trials/s | vs 1 journal worker | wall incl. start-up (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['evaluate_ms']} | {r['trials']} | {r['span_s']:.1f} | "
            f"{r['trials_per_s']:.1f} | {r['trials_per_s'] / base[r['evaluate_ms']]:.2f}x | "
            f"{r['wall_s']:.1f} |"
        )
    lines += [
        "",
        "## A 5,000-trial study, 60 categorical parameters (cheap objective, one process)",
        "",
        "| sampler | storage | trials | ms/trial (first 500) | ms/trial (last 500) | total (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in big:
        lines.append(
            f"| {r['sampler']} | {r['storage']} | {r['trials']} | {r['first_500_ms']:.1f} | "
            f"{r['last_500_ms']:.1f} | {r['total_s']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    out = ROOT / "benchmarks" / "results" / "scale.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
