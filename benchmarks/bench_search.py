"""mpsearch's multi-objective search vs the uniform, greedy and ILP baselines.

For each bundled workload (``digits_cnn``, ``resnet18``, ``text_transformer``): one
multi-objective search (quality, memory, latency; no budget) gives a whole front; then for
memory budgets of 50 / 30 / 20 % of fp32 and a latency budget of 60 % of fp32 (predicted by
the cost model), the best plan of each method that meets the budget, with its true task
quality (``wl.evaluate`` on the simulate backend). Baselines, on the same space and the same
profile / cost model (``ChoiceTable``):

- uniform: every layer in one scheme (the best uniform plan meeting the budget);
- greedy: AIMET-style walk (``baselines.greedy_assignment`` / ``greedy_path``);
- ILP: HAWQ-V3-style minimum summed sensitivity under the budget (``baselines.ilp_assignment``).

Every plan's memory and latency come from the cost model (``cost.memory_bytes`` /
``cost.latency_ms``); baseline plans are checked against the budget under it. Hypervolumes
of each method's front use one reference point per workload: (lowest true quality seen by
any method, fp32 memory MB, fp32 latency ms). Also: the search's true evaluations, wall
time and the true evaluations it needed to reach 99 % of its final hypervolume.

    python benchmarks/bench_search.py [--quick]

Writes ``benchmarks/results/search.md``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import torch
from _tables import md_table  # benchmarks/ is the script's folder

from mpsearch.cost import cpu_model, measure_cost
from mpsearch.profile import profile
from mpsearch.search import Budget, baselines, hypervolume, load_space
from mpsearch.search import search as run_search
from mpsearch.search._quality import PlanRunner
from mpsearch.search._table import ChoiceTable
from mpsearch.workloads import load_workload

SCHEMES = ["bf16", "w8a8", "w8a16", "w4a16"]
# workload -> (calibration batches for the profile, search trials)
WORKLOADS = {"digits_cnn": (4, 60), "resnet18": (1, 40), "text_transformer": (4, 50)}
BUDGETS = {
    "mem 50%": Budget(memory_fraction=0.5),
    "mem 30%": Budget(memory_fraction=0.3),
    "mem 20%": Budget(memory_fraction=0.2),
    "lat 60%": Budget(latency_fraction=0.6),
}
N_GREEDY, N_ILP = 10, 8
OUT = Path(__file__).parent / "results" / "search.md"
STUDIES = Path("studies")


class Evaluator:
    """True quality, memory MB and predicted latency of an assignment, memoised."""

    def __init__(self, wl, cost) -> None:
        self.wl, self.cost = wl, cost
        self.runner = PlanRunner(wl.model)
        self.memo: dict[tuple, tuple[float, float, float]] = {}

    def __call__(self, assignment: dict[str, str]) -> tuple[float, float, float]:
        key = tuple(sorted(assignment.items()))
        if key not in self.memo:
            q = float(self.runner(assignment, self.wl.evaluate))
            mem = self.cost.memory_bytes(assignment) / 1e6
            lat = float(self.cost.latency_ms(assignment))
            self.memo[key] = (q, mem, lat)
        return self.memo[key]


def meets(point: tuple[float, float, float], limits: tuple[float | None, float | None]) -> bool:
    mem_mb, lat_ms = limits
    return (mem_mb is None or point[1] <= mem_mb * (1 + 1e-9)) and (
        lat_ms is None or point[2] <= lat_ms * (1 + 1e-9)
    )


def cell(pt: tuple[float, float, float], limits: tuple[float | None, float | None]) -> str:
    flag = "" if meets(pt, limits) else " OVER"
    return f"{pt[0]:.4f} ({pt[1]:.3g} MB, {pt[2]:.3g} ms){flag}"


def evenly(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    idx = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[i] for i in idx]


def run_workload(name: str, n_batches: int, n_trials: int) -> dict:
    wl = load_workload(name, seed=0)
    model = wl.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        prof = profile(
            model,
            wl.calib[:n_batches],
            schemes=SCHEMES,
            cache_dir=STUDIES / ".cache" / "profile",
            progress=False,
        )
        t1 = time.perf_counter()
        cost = measure_cost(
            model,
            wl.example_input,
            schemes=["fp32", *SCHEMES],
            backend="cpu",
            cache_dir=STUDIES / ".cache" / "cost",
            num_threads=1,
            timer="process",
        )
        t2 = time.perf_counter()
    print(f"[{name}] profile {t1 - t0:.1f} s, cost {t2 - t1:.1f} s", flush=True)

    resolved = load_space(None, model).resolve(model, supported=cost.supported)
    table = ChoiceTable.build(resolved, prof, cost)
    ev = Evaluator(wl, cost)
    # Budgets and the hypervolume reference are relative to the cost model's fp32 figures
    # (what the search uses), not to the all-fp32 plan's additive prediction.
    fp32_mb, fp32_ms = cost.fp32_memory_bytes / 1e6, float(cost.fp32_latency_ms)
    fp32 = (float(ev.runner({}, wl.evaluate)), fp32_mb, fp32_ms)

    db = STUDIES / f"bench_search_{name}.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_search(
            model,
            profile=prof,
            cost=cost,
            evaluate=wl.evaluate,
            n_trials=n_trials,
            storage=f"sqlite:///{db}",
            seed=0,
        )
    print(
        f"[{name}] search {res.wall_time_s:.1f} s, {res.n_true_evaluations} true evaluations",
        flush=True,
    )

    def plan_point(params: dict[str, str]) -> tuple[float, float, float]:
        return ev(resolved.assignment(params))

    # Baseline fronts.
    uniform = {s: plan_point(p) for s, p in baselines.uniform_assignments(table).items()}
    path = baselines.greedy_path(table)
    greedy_pts = [plan_point(p) for p in evenly(path, N_GREEDY)]
    mem_all = [table.totals(p)[1] for p in path]
    levels = np.linspace(min(mem_all), max(mem_all), N_ILP)
    ilp_pts = []
    for level in levels:
        p = baselines.ilp_assignment(table, memory_bytes=float(level) * (1 + 1e-9))
        if p is not None:
            ilp_pts.append(plan_point(p))

    cheapest_mb = min(mem_all) / 1e6
    cheapest_ms = min(table.totals(p)[2] for p in baselines.greedy_path(table, objective="latency"))

    # Per-budget comparison.
    budget_rows = []
    for label, budget in BUDGETS.items():
        limits = budget.limits(fp32_memory_mb=fp32_mb, fp32_latency_ms=fp32_ms)
        row: dict = {"budget": label}
        try:
            plan = res.best(budget)
            pt = ev(plan.resolve(model))
            row["mpsearch"] = cell(pt, limits)
            row["_mps_q"] = pt[0]
        except ValueError as err:
            row["mpsearch"] = "no plan"
            row["_note"] = (
                f"{err} Smallest plan in the space (additive table): {cheapest_mb:.3g} MB; "
                f"fastest: {cheapest_ms:.3g} ms."
            )
        ok = [(q, -mem, s) for s, (q, mem, _lat) in uniform.items() if meets(uniform[s], limits)]
        if ok:
            q, _neg_mem, s = max(ok)
            row["uniform"] = f"{cell(uniform[s], limits)} {s}"
            row["_uni_q"] = q
        else:
            row["uniform"] = "none meets"
        kwargs = {
            "memory_bytes": None if limits[0] is None else limits[0] * 1e6,
            "latency_ms": limits[1],
        }
        for key, fn in (
            ("greedy", baselines.greedy_assignment),
            ("ILP", baselines.ilp_assignment),
        ):
            p = fn(table, **kwargs)
            if p is None:
                row[key] = "infeasible"
                continue
            pt = plan_point(p)
            row[key] = cell(pt, limits)
            row[f"_{key}_q"] = pt[0]
        budget_rows.append(row)

    # Hypervolumes with a common reference.
    evaluated = res.trials[res.trials["quality_source"].isin(["true", "memo"])]
    all_q = [q for q, _, _ in ev.memo.values()] + list(evaluated["quality"])
    # Quality reference: the lowest quality seen minus 1 % of fp32 quality, so that plans
    # tied at the lowest quality (e.g. every plan of an easy task) still add volume.
    ref = (float(min(all_q)) - 0.01 * abs(fp32[0]), fp32_mb, fp32_ms)
    feasible = evaluated[evaluated["feasible"] & (evaluated["state"] == "COMPLETE")]
    mps_pts = feasible[["quality", "memory_mb", "latency_ms"]].to_numpy(dtype=float)
    maximize = [True, False, False]
    hv = {
        "mpsearch": hypervolume(mps_pts, ref, maximize),
        "uniform": hypervolume(np.array(list(uniform.values())), ref, maximize),
        "greedy": hypervolume(np.array(greedy_pts), ref, maximize),
        "ILP": hypervolume(np.array(ilp_pts), ref, maximize),
    }
    hist = res.hypervolume_history(ref)
    final = float(hist["hypervolume"].iloc[-1]) if len(hist) else 0.0
    reached = hist[hist["hypervolume"] >= 0.99 * final]
    evals_99 = int(reached["true_evaluations"].iloc[0]) if len(reached) and final > 0 else None
    return {
        "name": name,
        "fp32": fp32,
        "layers": len(resolved.layers),
        "params": len(resolved.params),
        "n_trials": n_trials,
        "budget_rows": budget_rows,
        "hv": hv,
        "ref": ref,
        "n_points": {
            "mpsearch": len(mps_pts),
            "uniform": len(uniform),
            "greedy": len(greedy_pts),
            "ILP": len(ilp_pts),
        },
        "n_true": res.n_true_evaluations,
        "wall_s": res.wall_time_s,
        "evals_99": evals_99,
        "front": len(res.pareto),
    }


def report(r: dict) -> str:
    q, mb, ms = r["fp32"]
    head = (
        f"### {r['name']}\n\n"
        f"fp32: quality {q:.4f}, {mb:.3g} MB, {ms:.3g} ms predicted (cpu backend, 1 thread); "
        f"{r['layers']} layers, {r['params']} searched parameters; {r['n_trials']} trials, "
        f"{r['n_true']} true evaluations, search wall time {r['wall_s']:.1f} s, "
        f"Pareto front {r['front']} plans.\n"
    )
    budgets = md_table(
        r["budget_rows"], ["budget", "mpsearch", "uniform", "greedy", "ILP"], digits=4
    )
    notes = [f"- {row['budget']}: {row['_note']}" for row in r["budget_rows"] if "_note" in row]
    hv_best = max(r["hv"].values()) or 1.0
    hv_row = {"metric": "hypervolume"} | {k: v for k, v in r["hv"].items()}
    rel_row = {"metric": "relative to best"} | {k: v / hv_best for k, v in r["hv"].items()}
    pts_row = {"metric": "front points"} | r["n_points"]
    hv_table = md_table(
        [hv_row, rel_row, pts_row], ["metric", "mpsearch", "uniform", "greedy", "ILP"], digits=4
    )
    ref = r["ref"]
    tail = (
        f"Reference point: quality {ref[0]:.4f}, {ref[1]:.3g} MB, {ref[2]:.3g} ms. "
        f"True evaluations to reach 99 % of mpsearch's final hypervolume: {r['evals_99']} "
        f"of {r['n_true']}.\n"
    )
    parts = [
        head,
        "Quality at each budget (true task quality, memory under the cost model):\n",
        budgets,
        "",
        *notes,
        "",
        hv_table,
        "",
        tail,
    ]
    return "\n".join(p for p in parts if p is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits_cnn only, 20 trials")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    workloads = {"digits_cnn": (4, 20)} if args.quick else WORKLOADS
    start = time.perf_counter()
    sections = []
    for name, (n_batches, n_trials) in workloads.items():
        r = run_workload(name, n_batches, n_trials)
        text = report(r)
        print("\n" + text, flush=True)
        sections.append(text)
    total = time.perf_counter() - start
    intro = (
        "# Search vs baselines\n\n"
        f"CPU: {cpu_model()}; torch {torch.__version__}.\n\n"
        "`python benchmarks/bench_search.py` (one thread). One multi-objective mpsearch search "
        "per workload (the bundled default space, schemes "
        f"{', '.join(SCHEMES)}), read at each budget with `res.best(budget)`; baselines "
        "(uniform, greedy walk, ILP) on the same profile and cost model. Quality is the "
        "workload's true task quality (simulate backend), memory is cost-model MB; "
        "'OVER' marks a baseline plan whose cost-model memory/latency misses the budget "
        "(the baselines use the additive per-layer table). Hypervolume over (quality up, "
        "memory down, latency down) with one reference point per workload.\n\n"
        f"Total benchmark time: {total:.0f} s.\n"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(intro + "\n" + "\n".join(sections))
    print(f"\nTotal {total:.0f} s; wrote {OUT}")


if __name__ == "__main__":
    main()
