"""A real causal LM: perplexity x memory x batch-1 decode tokens/s, uniform vs mixed vs speculative.

Run: ``python benchmarks/bench_lm.py`` (``--quick``: the tiny workload, for a smoke run;
``--threads 1,2``; ``--trials N``; ``--rounds N``). Prints a table and writes
``benchmarks/results/lm.md``.

On the ``stdlib_lm`` workload (a 12.6 M-parameter Llama trained on the standard library's
source; quality = held-out perplexity), side by side in one run on this machine's real
kernels (``cpu`` backend):

1. **Uniform plans**: fp32 (the trained model as it is), ``bf16``, int8 weights and
   activations (``w8a8``: per-channel weights, per-tensor activation ranges calibrated on the
   profiled windows), int8 weight-only (``w8a16``), int4 weight-only (``w4a16``, groups of
   32) rounded to nearest and with GPTQ.
2. **llama.cpp-style mix** (``q4_k_m-style``): every ``v_proj`` and ``down_proj`` at 8 bits
   (``w8a16``), the rest at 4 bits (``w4a16+gptq``; the embedding ``w4a16``), the analogue of
   llama.cpp's Q4_K_M.
3. **EXL2-style greedy** (``greedy (exl2-style)``): from the sensitivity profile, every layer
   starts at its costliest choice and the move with the least error added per byte saved is
   taken until the plan fits the bytes of the llama.cpp-style mix
   (:func:`mpsearch.search.baselines.greedy_assignment`).
4. **Searched mixed plans** (``mps.search``; per-layer choice of ``fp32``, ``bf16``,
   ``w8a8``, ``w8a16``, ``w4a16``, ``w4a16+gptq``; quality = ``-log`` perplexity on held-out
   *calibration* windows, never the test windows reported): the front of quality x memory x
   per-token latency (the cost model measured on a decode-shaped input, one token), whose
   smallest plans within 1 % perplexity (decoding reads every weight once per token, so bytes
   lead) are measured for real, the fastest measured one reported as ``mixed <= 1% ppl``;
   and the best quality under ``Budget(memory_fraction=0.3)``
   (``mixed <= 30% mem``).
5. **Speculative controller** (``mps.SpeculativeController``, greedy, lossless): the draft and
   ``k`` (up to 15) tuned on calibration prompts among the uniform int8 (w8a8) and 4-bit
   plans; reference = fp32 and reference =
   the ``mixed <= 1% ppl`` plan. Tokens/s of ``generate`` with the tuned ``k`` vs ``k = 0``
   (the reference decoding alone, same code path), interleaved per prompt, both variants
   compiled on static caches (``compile="max-autotune"``: the draft's kernels autotuned, the
   reference's Inductor's defaults, whose logits do not depend on how many tokens are
   verified at once); ``exact``: every output equals the reference's greedy tokens.

Perplexity is measured on the test windows on the ``cpu`` backend; memory is the cost
model's exact bytes (scales included); decode tokens/s is ``1000 / decode_ms`` of
:func:`mpsearch.cost.measure_decode` (greedy batch 1 with the KV cache, after a prompt), the
median over interleaved rounds (each round times every plan in turn), for each thread count,
each plan decoding eagerly (dynamic cache), compiled by Inductor (static cache) and compiled
with autotuned matrix-product kernels (``max-autotune``); the goals are read on the last, the
fastest engine for fp32 too.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from _tables import md_table  # benchmarks/ is the script's folder
from torch import nn

import mpsearch as mps
from mpsearch.cost import KVDecoder, cpu_model, measure_decode, threads
from mpsearch.search._table import ChoiceTable, resolve_space
from mpsearch.search.baselines import greedy_assignment
from mpsearch.workloads import load_workload
from mpsearch.workloads._stdlib_lm import perplexity

RESULTS = Path(__file__).parent / "results" / "lm.md"
SCHEMES = ["bf16", "w8a8", "w8a16", "w4a16"]
ROUNDED = ["w4a16+gptq"]
PPL_RISE = 0.01  # the quality target: perplexity at most 1 % above fp32
MEMORY_FRACTION = 0.3
UNIFORM = {
    "bf16": "bf16",
    "int8 (w8a8)": "w8a8",
    "int8 (w8a16)": "w8a16",
    "int4 (w4a16)": "w4a16",
    "int4+gptq": "w4a16+gptq",
}
GOAL_FP32_X = 3.0
GOAL_UNIFORM_X = 1.15
GOAL_SPEC_X = 1.4


@dataclass(frozen=True)
class Settings:
    """Sizes of one run (``QUICK``: the tiny workload, seconds)."""

    workload: str = "stdlib_lm"
    batch_size: int = 8
    n_profile: int = 8  # calibration windows profiled (and GPTQ's calibration)
    n_val: int = 8  # calibration windows the search scores plans on
    n_test: int = 32  # test windows perplexity is reported on
    n_trials: int = 30
    max_checked: int = 6  # front plans within 1 % (predicted) measured for real
    prompt_len: int = 64
    new_tokens: int = 32
    rounds: int = 7
    spec_prompts: int = 4
    spec_new_tokens: int = 48
    spec_ks: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 15)
    spec_drafts: tuple[str, ...] = ("w8a8", "w4a16+gptq", "w4a16")  # the tuner picks one
    # the engines timed (keys of DECODE_MODES); the goals and the speculative controller use
    # the last: max-autotune, the fastest for every plan here, fp32 included (on Zen 4 fp32
    # decodes about 2x faster than on Inductor's default kernels)
    modes: tuple[str, ...] = ("eager", "compiled", "max-autotune")

    @property
    def main_mode(self) -> str:
        return self.modes[-1]


QUICK = Settings(
    workload="stdlib_lm_tiny",
    batch_size=4,
    n_profile=4,
    n_val=4,
    n_test=8,
    n_trials=8,
    max_checked=2,
    prompt_len=16,
    new_tokens=8,
    rounds=3,
    spec_prompts=2,
    spec_new_tokens=12,
    spec_ks=(0, 1, 2, 4),
    modes=("eager", "compiled"),  # autotuning every plan's products takes minutes
)


@dataclass
class Row:
    """One plan (or controller) of the table."""

    label: str
    kind: str  # "fp32", "uniform", "mix", "search", "candidate"
    module: nn.Module
    plan: mps.PrecisionPlan | None
    ppl: float = math.nan
    memory_mb: float = math.nan
    tokens_per_s: dict[int, float] | None = None


def ppl_rise(ppl: float, fp32_ppl: float) -> float:
    """Relative perplexity rise over fp32 (0.01 = 1 %)."""
    return ppl / fp32_ppl - 1.0


def mix_label(plan: mps.PrecisionPlan, model: nn.Module) -> str:
    """``"w4a16+gptq x30, w8a16 x14"``: how many layers take each choice."""
    counts: dict[str, int] = {}
    for choice in plan.resolve_choices(model).values():
        counts[choice] = counts.get(choice, 0) + 1
    return ", ".join(f"{c} x{n}" for c, n in sorted(counts.items()))


def q4_k_m_style() -> mps.PrecisionPlan:
    """llama.cpp's Q4_K_M analogue: attention-V and MLP-down projections at 8 bits, the rest
    4-bit with GPTQ (the embedding, which GPTQ does not take, round to nearest)."""
    return mps.PrecisionPlan(
        {"re:.*\\.(v_proj|down_proj)$": "w8a16", "re:.*embed_tokens$": "w4a16"},
        default="w4a16+gptq",
        metadata={"name": "q4_k_m-style"},
    )


DECODE_MODES = {"eager": False, "compiled": True, "max-autotune": "max-autotune"}
"""How each plan decodes (the :class:`mpsearch.cost.KVDecoder` ``compile`` value): its eager
model on a dynamic KV cache, compiled by Inductor on a static one, or compiled with each matrix
product's kernel chosen by measurement."""


def speed_key(n_threads: int, mode: str) -> str:
    """The table's column for ``n_threads`` and a decode mode: ``"1t"``, ``"1t compiled"``,
    ``"1t max-autotune"``."""
    return f"{n_threads}t" + ("" if mode == "eager" else f" {mode}")


def decode_rounds(rows: list[Row], prompt: torch.Tensor, s: Settings, n_threads: int) -> None:
    """Each row's median decode tokens/s in every mode over ``s.rounds`` interleaved rounds
    (compiled decoders are built, and compile, once, before the first round)."""
    decoders = {
        (r.label, mode): KVDecoder(r.module, compile=DECODE_MODES[mode])
        for r in rows
        for mode in s.modes
    }
    per: dict[tuple[str, str], list[float]] = {key: [] for key in decoders}
    with threads(n_threads):
        for round_ in range(s.rounds + 1):  # round 0 compiles and warms up
            for key, decoder in decoders.items():
                t = measure_decode(decoder, prompt, new_tokens=s.new_tokens, repeats=1)
                if round_:
                    per[key].append(t.decode_ms)
    for r in rows:
        for mode in s.modes:
            ms = statistics.median(per[(r.label, mode)])
            r.tokens_per_s = {**(r.tokens_per_s or {}), speed_key(n_threads, mode): 1000.0 / ms}
            info = decoders[(r.label, mode)].compile_info
            if mode != "eager" and info["mode"] != "inductor":
                print(f"{r.label}: decoded eagerly: {info['reason']}", flush=True)


def speculative(
    model: nn.Module,
    reference: mps.PrecisionPlan | str,
    drafts: list[mps.PrecisionPlan | str],
    *,
    rounder: Any,
    calib: list[Any],
    tune_prompts: list[torch.Tensor],
    test_prompts: list[torch.Tensor],
    s: Settings,
    n_threads: int,
) -> dict[str, Any]:
    """Tune a speculative controller (draft among ``drafts``, ``k``) and time its ``generate``
    against ``k = 0`` (the reference alone), interleaved per prompt (wall clock)."""
    ctrl = mps.SpeculativeController(
        model, drafts[0], reference=reference, backend="cpu", rounder=rounder, calib=calib,
        compile=DECODE_MODES[s.main_mode],
    )  # fmt: skip
    with threads(n_threads):
        tuning = ctrl.tune(
            tune_prompts, ks=s.spec_ks, drafts=drafts, max_new_tokens=s.spec_new_tokens
        )
        chosen = tuning[tuning["chosen"]].iloc[0]
        k_tuned = int(ctrl.k)
        k = max(k_tuned, 1)  # k = 0 (the tuner's "do not speculate") is timed as k = 1
        spec_s: list[float] = []
        ref_s: list[float] = []
        exact = True
        for _ in range(max(1, s.rounds // 3)):
            for prompt in test_prompts:
                t0 = time.perf_counter()
                out_spec = ctrl.generate(prompt, max_new_tokens=s.spec_new_tokens, k=k)
                t1 = time.perf_counter()
                out_ref = ctrl.generate(prompt, max_new_tokens=s.spec_new_tokens, k=0)
                t2 = time.perf_counter()
                exact &= bool(torch.equal(out_spec, out_ref))
                spec_s.append(t1 - t0)
                ref_s.append(t2 - t1)
    audit = ctrl.audit  # the timed generate calls only (tune records none)
    timed = audit[audit["k"] > 0]
    drafted = int(timed["drafted"].sum())
    n = s.spec_new_tokens
    return {
        "draft": str(chosen["draft"]),
        "k_tuned": k_tuned,
        "k": k,
        "acceptance": int(timed["accepted"].sum()) / drafted if drafted else math.nan,
        "tokens_per_s": n / statistics.median(spec_s),
        "ref_tokens_per_s": n / statistics.median(ref_s),
        "exact": exact,
    }


def speculative_rows(
    model: nn.Module,
    refs: dict[str, mps.PrecisionPlan | str],
    *,
    rounder: Any,
    calib: list[Any],
    prompts: tuple[list[torch.Tensor], list[torch.Tensor]],
    s: Settings,
    thread_counts: list[int],
) -> list[dict[str, Any]]:
    """The speculative controller for each reference and thread count (:func:`speculative`),
    drafted by uniform int8 or 4-bit plans, tuned on the first ``prompts`` and timed on the
    second."""
    drafts = [mps.PrecisionPlan.uniform(x) for x in s.spec_drafts]
    spec_rows = []
    for ref_label, ref in refs.items():
        for n in thread_counts:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = speculative(
                    model, ref, drafts, rounder=rounder, calib=calib, tune_prompts=prompts[0],
                    test_prompts=prompts[1], s=s, n_threads=n,
                )  # fmt: skip
            spec_rows.append({"reference": ref_label, "threads": n, **out})
            print(spec_rows[-1], flush=True)
    return spec_rows


def table_rows(
    rows: list[Row],
    model: nn.Module,
    *,
    fp32_ppl: float,
    fp32_mb: float,
    thread_counts: list[int],
    modes: tuple[str, ...],
) -> list[dict[str, Any]]:
    """The table: perplexity, memory, tokens/s in every mode and thread count, the ratios to
    fp32 decoding the same way and (the last mode, main thread count) to the eager fp32
    model."""
    fp32 = rows[0]
    main = speed_key(thread_counts[0], modes[-1])
    eager_fp32 = fp32.tokens_per_s[speed_key(thread_counts[0], "eager")]
    out_rows = []
    for r in rows:
        row: dict[str, Any] = {
            "plan": r.label,
            "ppl": r.ppl,
            "ppl_rise_%": 100 * ppl_rise(r.ppl, fp32_ppl),
            "memory_mb": r.memory_mb,
            "memory_%": 100 * r.memory_mb / fp32_mb,
        }
        for n in thread_counts:
            for mode in modes:
                key = speed_key(n, mode)
                row[f"tok/s {key}"] = r.tokens_per_s[key]
                row[f"x fp32 {key}"] = r.tokens_per_s[key] / fp32.tokens_per_s[key]
        row["x eager fp32"] = r.tokens_per_s[main] / eager_fp32
        row["choices"] = "" if r.plan is None else mix_label(r.plan, model)
        out_rows.append(row)
    return out_rows


def profile_and_cost(
    model: nn.Module, batches: list[Any], prompt: torch.Tensor, info: dict[str, Any]
) -> tuple[Any, Any]:
    """The sensitivity profile (with GPTQ rows) and the decode-shaped cost model (one token,
    one thread, layers timed cold); their seconds go to ``info``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        prof = mps.profile(
            model, batches, schemes=[*SCHEMES, *ROUNDED], progress=False,
            rounding=mps.RoundingOptions(),
        )  # fmt: skip
        info["profile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cost = mps.measure_cost(
            model,
            {"input_ids": prompt[:, :1]},  # decode-shaped: the latency of one token
            schemes=["fp32", *SCHEMES],
            backend="cpu",
            options=mps.CostOptions(num_threads=1, cold="auto"),  # weights read from memory
        )
        info["cost_s"] = time.perf_counter() - t0
    print(f"profile {info['profile_s']:.0f} s, cost model {info['cost_s']:.0f} s", flush=True)
    return prof, cost


def plan_rows(
    model: nn.Module,
    prof: Any,
    cost: Any,
    val_quality: Any,
    calib: list[Any],
    min_val_quality: float,
    s: Settings,
    info: dict[str, Any],
) -> list[Row]:
    """fp32, the uniform plans, the llama.cpp-style and EXL2-style mixes, the smallest front
    plans within 1 % on the validation windows (``candidate``) and the best plan under the
    memory budget, each quantized on the ``cpu`` backend (``w8a8`` activation ranges
    calibrated on ``calib``: static, as compiled decoding needs for Inductor's int8
    micro-kernels; the profile and the search score ranges measured per call)."""
    rounder = getattr(prof, "rounder", None)
    space = {"name": "bench_lm", "schemes": ["fp32", *SCHEMES]}

    def quantized(plan: mps.PrecisionPlan) -> nn.Module:
        return mps.quantize(model, plan, backend="cpu", calib=calib, rounder=rounder).eval()

    rows: list[Row] = [Row("fp32", "fp32", model, None)]
    for label, scheme in UNIFORM.items():
        plan = mps.PrecisionPlan.uniform(scheme)
        rows.append(Row(label, "uniform", quantized(plan), plan))
    q4km = q4_k_m_style()
    rows.append(Row("q4_k_m-style", "mix", quantized(q4km), q4km))
    table = ChoiceTable.build(
        resolve_space(space, model, profile=prof, cost=cost), prof, cost, metric="e2e"
    )
    greedy = greedy_assignment(table, memory_bytes=cost.memory_bytes(q4km))
    if greedy is not None:
        plan = mps.PrecisionPlan.from_assignment(table.space.assignment(greedy))
        rows.append(Row("greedy (exl2-style)", "mix", quantized(plan), plan))

    # the searches (scored on held-out calibration windows, not the test windows)
    opts = mps.SearchOptions(seed=0, space=space, verify=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        front = mps.search(
            model, profile=prof, cost=cost, evaluate=val_quality, n_trials=s.n_trials,
            options=replace(opts, objectives=("quality", "memory", "latency")),
        )  # fmt: skip
        budget = mps.Budget(memory_fraction=MEMORY_FRACTION)
        budgeted = mps.search(
            model, profile=prof, cost=cost, evaluate=val_quality, n_trials=s.n_trials,
            budget=budget, options=replace(opts, objectives=("quality",)),
        )  # fmt: skip
        info["search_s"] = time.perf_counter() - t0
    print(f"searches {info['search_s']:.0f} s", flush=True)
    pareto = front.pareto
    # decoding one token reads every weight: bytes first, then the predicted per-token latency
    near = pareto[pareto["quality"] >= min_val_quality]
    near = near.sort_values(["memory_mb", "latency_ms"], kind="stable")
    for i, plan in enumerate(list(near["plan"])[: s.max_checked]):
        rows.append(Row(f"candidate {i}", "candidate", quantized(plan), plan))
    try:
        plan = budgeted.best(budget)
    except ValueError as err:
        print(f"no plan within {MEMORY_FRACTION:.0%} of fp32 memory: {err}")
    else:
        rows.append(Row(f"mixed <= {MEMORY_FRACTION:.0%} mem", "search", quantized(plan), plan))
    return rows


def run(s: Settings, thread_counts: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    started = time.perf_counter()
    n_calib = s.n_profile + s.n_val
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wl = load_workload(s.workload, n_calib=n_calib, n_test=s.n_test, batch_size=s.batch_size)
    model = wl.model
    windows = torch.cat([b["input_ids"] for b in wl.calib])
    profile_batches = list(torch.split(windows[: s.n_profile], s.batch_size))
    profile_batches = [{"input_ids": b} for b in profile_batches]
    val = [{"input_ids": b} for b in torch.split(windows[s.n_profile :], s.batch_size)]
    test_ids = torch.cat([b["input_ids"] for b in wl.test])
    prompt = test_ids[:1, : s.prompt_len]
    fp32_ppl = perplexity(model, wl.test)
    fp32_val_q = -math.log(perplexity(model, val))
    target_drop = math.log1p(PPL_RISE)  # quality = -log ppl: a 1 % rise is a drop of log(1.01)
    info: dict[str, Any] = {"fp32_ppl": fp32_ppl, "n_params": wl.info["n_params"]}
    print(f"{wl.name}: {wl.info['n_params']:,} parameters, fp32 test perplexity {fp32_ppl:.3f}")

    def val_quality(m: nn.Module) -> float:
        return -math.log(perplexity(m, val))

    prof, cost = profile_and_cost(model, profile_batches, prompt, info)
    rounder = getattr(prof, "rounder", None)
    fp32_mb = cost.fp32_memory_bytes / 1e6
    rows = plan_rows(
        model, prof, cost, val_quality, profile_batches, fp32_val_q - target_drop, s, info
    )

    # -- perplexity, memory, decode speed (interleaved)
    for r in rows:
        r.ppl = perplexity(r.module, wl.test)
        r.memory_mb = fp32_mb if r.plan is None else cost.memory_bytes(r.plan) / 1e6
    print(f"perplexity of {len(rows)} plans measured", flush=True)
    for n in thread_counts:
        decode_rounds(rows, prompt, s, n)
    main_t = thread_counts[0]
    main_key = speed_key(main_t, s.main_mode)

    def speed(r: Row) -> float:
        return r.tokens_per_s[main_key] if r.tokens_per_s else math.nan

    def meets(r: Row) -> bool:
        return ppl_rise(r.ppl, fp32_ppl) <= PPL_RISE

    candidates = [r for r in rows if r.kind == "candidate"]
    checked = [r for r in candidates if meets(r)]
    info["checked"] = f"{len(checked)} of {len(candidates)}"
    best = max(checked, key=speed, default=None)
    if best is not None:
        best.label, best.kind = f"mixed <= {PPL_RISE:.0%} ppl", "search"
    rows = [r for r in rows if r.kind != "candidate"]
    fp32 = rows[0]
    uniform_ok = [r for r in rows if r.kind == "uniform" and meets(r)]
    best_uniform = max(uniform_ok, key=speed, default=None)
    small = [r for r in rows if r.memory_mb <= MEMORY_FRACTION * fp32_mb]
    info["small"] = [
        (r.label, 100 * ppl_rise(r.ppl, fp32_ppl), speed(r) / speed(fp32)) for r in small
    ]

    # -- the speculative controller
    refs: dict[str, mps.PrecisionPlan | str] = {"fp32": "fp32"}
    if best is not None and best.plan is not None:
        refs[best.label] = best.plan
    tune_prompts = [w[: s.prompt_len] for w in windows[s.n_profile :][: s.spec_prompts]]
    test_prompts = [w[: s.prompt_len] for w in test_ids[1 : 1 + s.spec_prompts]]
    spec_rows = speculative_rows(
        model, refs, rounder=rounder, calib=profile_batches,
        prompts=(tune_prompts, test_prompts), s=s, thread_counts=thread_counts,
    )  # fmt: skip

    out_rows = table_rows(
        rows, model, fp32_ppl=fp32_ppl, fp32_mb=fp32_mb, thread_counts=thread_counts,
        modes=s.modes,
    )  # fmt: skip
    info.update(
        best=best.label if best else "",
        best_x_fp32=speed(best) / speed(fp32) if best else math.nan,
        best_x_eager_fp32=(
            speed(best) / fp32.tokens_per_s[speed_key(main_t, "eager")] if best else math.nan
        ),
        best_uniform=best_uniform.label if best_uniform else "",
        best_x_uniform=(speed(best) / speed(best_uniform)) if best and best_uniform else math.nan,
        spec=spec_rows,
        main_threads=main_t,
        main_mode=s.main_mode,
        wall_s=time.perf_counter() - started,
    )
    return out_rows, info


def summary(info: dict[str, Any]) -> str:
    """The goals, each with its figure (met or not)."""
    t = info["main_threads"]
    lines = []
    if info["best"]:
        bx, ux = info["best_x_fp32"], info["best_x_uniform"]
        lines.append(
            f"- best plan meeting <= {PPL_RISE:.0%} perplexity rise vs fp32 ({t} thread, both "
            f"decoding {info['main_mode']}): **{bx:.2f}x** tokens/s (goal >= {GOAL_FP32_X}x: "
            f"{'met' if bx >= GOAL_FP32_X else 'NOT met'}; {info['best_x_eager_fp32']:.2f}x the "
            "user's fp32 model decoding eagerly); vs the best uniform plan meeting it "
            f"({info['best_uniform'] or 'none'}): **{ux:.2f}x** (goal >= {GOAL_UNIFORM_X}x: "
            f"{'met' if ux >= GOAL_UNIFORM_X else 'NOT met'}); {info['checked']} front plans "
            "within 1 % on the validation windows also met it on the test windows"
        )
    else:
        lines.append(f"- no searched plan met <= {PPL_RISE:.0%} perplexity rise (goal NOT met)")
    small = "; ".join(f"{label}: {rise:+.2f} %, {x:.2f}x" for label, rise, x in info["small"])
    lines.append(
        f"- plans within {MEMORY_FRACTION:.0%} of fp32 memory (perplexity rise, tokens/s vs "
        f"fp32): {small}"
    )
    for sp in info["spec"]:
        x = sp["tokens_per_s"] / sp["ref_tokens_per_s"]
        verdict = f"goal >= {GOAL_SPEC_X}x: {'met' if x >= GOAL_SPEC_X else 'NOT met'}"
        if sp["k_tuned"] == 0:  # the tuner declined: no draft is cheap enough for this reference
            verdict = (
                "the tuner declined to speculate (k = 0: the controller decodes with the "
                f"reference alone, 1.00x); timed at k = {sp['k']} for the record"
            )
        lines.append(
            f"- speculative controller, reference {sp['reference']}, draft {sp['draft']}, "
            f"k={sp['k']} (tuned {sp['k_tuned']}), {sp['threads']} thread(s): acceptance {sp['acceptance']:.1%}, "
            f"{sp['tokens_per_s']:.0f} vs {sp['ref_tokens_per_s']:.0f} tokens/s = **{x:.2f}x** "
            f"({verdict}); output identical to the reference's greedy tokens: "
            f"{'yes' if sp['exact'] else 'NO'}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny workload (smoke run)")
    parser.add_argument("--threads", default="1", help="comma-separated thread counts")
    parser.add_argument("--trials", type=int, default=None, help="trials per search")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the Markdown table's path")
    args = parser.parse_args()
    s = QUICK if args.quick else Settings()
    if args.trials is not None:
        s = replace(s, n_trials=args.trials)
    if args.rounds is not None:
        s = replace(s, rounds=args.rounds)
    thread_counts = [int(n) for n in args.threads.split(",") if n]
    torch.manual_seed(0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows, info = run(s, thread_counts)
    columns = list(rows[0])
    spec_rows = [
        {**sp, "x_reference": sp["tokens_per_s"] / sp["ref_tokens_per_s"]} for sp in info["spec"]
    ]
    spec_columns = [
        "reference", "threads", "draft", "k_tuned", "k", "acceptance", "tokens_per_s",
        "ref_tokens_per_s", "x_reference", "exact",
    ]  # fmt: skip
    text = "\n".join(
        [
            "# A real causal LM: perplexity x memory x decode tokens/s",
            "",
            f"CPU: {cpu_model()}; torch {torch.__version__}; workload `{s.workload}` "
            f"({info['n_params']:,} parameters), fp32 test perplexity {info['fp32_ppl']:.3f} "
            f"on {s.n_test} windows; {s.n_trials} trials per search; wall time "
            f"{info['wall_s']:.0f} s. Generated by `benchmarks/bench_lm.py`"
            f"{' --quick' if args.quick else ''}.",
            "",
            "`ppl`: test perplexity on the `cpu` backend's real kernels; `memory_%`: exact "
            "bytes (scales included) vs fp32; `tok/s Nt`: batch-1 greedy decode tokens/s with "
            f"the KV cache after a {s.prompt_len}-token prompt, N threads, median of "
            f"{s.rounds} interleaved rounds of {s.new_tokens} tokens, the eager model on a "
            "dynamic cache; `Nt compiled`: the same compiled by Inductor on a static cache "
            "(`KVDecoder(compile=True)`); `Nt max-autotune`: compiled with each matrix "
            'product\'s kernel chosen by measurement (`KVDecoder(compile="max-autotune")`: '
            "Inductor's C++ GEMM templates vs ATen); `x fp32`: the ratio to fp32 decoding the "
            f"same way in the same run; `x eager fp32`: {s.main_mode} vs the user's fp32 model "
            f"decoding eagerly. The goals are read on {s.main_mode} decoding, fp32's too. "
            "`mixed <= 1% ppl`: the fastest measured of the search's "
            "front plans (quality x memory x per-token latency, scored on held-out calibration "
            f"windows; the {s.max_checked} smallest within 1 % measured) whose test perplexity "
            "rises at most 1 %; `mixed <= 30% mem`: the search's best "
            "quality under `Budget(memory_fraction=0.3)`; `q4_k_m-style`: v_proj and "
            "down_proj at w8a16, the rest w4a16+gptq; `greedy (exl2-style)`: least profiled "
            "error added per byte saved, down to the q4_k_m-style mix's bytes.",
            "",
            summary(info),
            "",
            md_table(rows, columns, decimals=2),
            "",
            "Speculative controller (tokens/s of `generate` with the tuned k vs k = 0, the "
            f"reference decoding alone, {s.spec_new_tokens} new tokens after each of "
            f"{s.spec_prompts} test prompts, medians; `SpeculativeController(compile="
            f"{DECODE_MODES[s.main_mode]!r})`: the draft decodes {s.main_mode}, the reference "
            "compiled on Inductor's default kernels, whose logits are the same whether tokens "
            "are verified one at a time or in a block; autotuned ones differ, up to 7e-3 on "
            "int8 weights, enough to change a greedy token):",
            "",
            md_table(spec_rows, spec_columns, decimals=2),
            "",
        ]
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
