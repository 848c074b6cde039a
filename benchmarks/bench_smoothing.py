"""SmoothQuant folding for w8a8: none vs a fixed alpha vs ``alpha="auto"``, side by side.

For each model: its quality in fp32, and uniform ``w8a8`` on the ``cpu`` backend (real int8
kernels; activation ranges from the calibration batches) on the model as it is,
after ``mps.smooth_activations(alpha=0.5)`` and after ``alpha="auto"`` (per normalisation, the
strength, or no fold, with the lowest w8a8 error of its consumers on held-out calibration rows).
Quality is measured on the test split: perplexity for the language models trained on real text
(``text_transformer``, ``stdlib_lm_tiny``, ``stdlib_lm``), KL divergence from the fp32 model's
softmax for the random-initialised zoo models and the ``bench_architectures`` models (no task;
4 calibration and 4 test batches of 16 random inputs). ``x loss``: the quality lost by w8a8
with smoothing over the loss without (below 1: smoothing helped). Writes
``benchmarks/results/smoothing.md``.

    python benchmarks/bench_smoothing.py [--models text_transformer,hf_llama] [--architectures vit,convnext]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _tables import available_rows, md_table, model_names, write_result
from bench_architectures import ARCHITECTURES, build
from bench_quality import KLToReference, perplexity

import mpsearch as mps
from mpsearch.cost import cpu_model
from mpsearch.workloads import load_workload

OUT = Path(__file__).parent / "results" / "smoothing.md"
TRAINED = ("text_transformer", "stdlib_lm_tiny", "stdlib_lm")
ZOO = ("hf_gpt2", "hf_llama", "hf_qwen2", "hf_bert", "hf_t5", "hf_whisper")
ALPHAS: tuple[float | str, ...] = (0.5, "auto")


@dataclass
class Case:
    """A model to smooth: calibration and test batches, a quality measure (lower is better)."""

    name: str
    model: torch.nn.Module
    calib: list[Any]
    measure: Callable[[torch.nn.Module], float]
    label: str


def workload_case(name: str) -> Case:
    """A shipped workload: perplexity on the text models, KL to fp32 on the zoo models."""
    wl = load_workload(name)
    if wl.name == "text_transformer":  # evaluate is next-character accuracy
        return Case(
            name, wl.model, wl.calib, lambda m: perplexity(m, wl.test, wl.test_labels), "perplexity"
        )
    if wl.name in TRAINED:  # evaluate is -log(perplexity)
        return Case(name, wl.model, wl.calib, lambda m: math.exp(-wl.evaluate(m)), "perplexity")
    unit = "token" if wl.task == "language_model" else "sample"
    measure, label = KLToReference(wl.model, wl.test), f"KL to fp32 (nats/{unit})"
    return Case(name, wl.model, wl.calib, measure, label)


def architecture_case(name: str) -> Case:
    """A ``bench_architectures`` model (random weights, from its config): 4 calibration and
    4 test batches of 16 random inputs, KL to fp32 on the test batches."""
    model, inputs = build(name)
    g = torch.Generator().manual_seed(0)
    calib = [inputs(16, g) for _ in range(4)]
    test = [inputs(16, g) for _ in range(4)]
    return Case(f"hf:{name}", model, calib, KLToReference(model, test), "KL to fp32")


def row(case: Case) -> dict[str, Any]:
    """One model's quality under w8a8 (``cpu`` backend) without and with smoothing."""
    fp32 = case.measure(case.model)
    plan = mps.PrecisionPlan.uniform("w8a8")

    def w8a8(model: torch.nn.Module) -> float:
        return case.measure(mps.quantize(model, plan, backend="cpu", calib=case.calib))

    plain = w8a8(case.model)
    out: dict[str, Any] = {"model": case.name, "measure": case.label, "fp32": fp32, "w8a8": plain}
    for alpha in ALPHAS:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = mps.smooth_activations(case.model, case.calib, alpha=alpha)
        seconds = time.perf_counter() - t0
        quality = w8a8(res.model)
        lost = (quality - fp32) / (plain - fp32) if plain != fp32 else math.nan
        out |= {
            f"w8a8 + {alpha}": quality,
            f"{alpha}: x loss": lost,
            f"{alpha}: layers": f"{int(res.table['smoothed'].sum())}/{len(res.table)}",
            f"{alpha}: s": seconds,
        }
    return out


def _summary(rows: list[dict[str, Any]]) -> str:
    lines = []
    for alpha in ALPHAS:
        ratios = [r[f"{alpha}: x loss"] for r in rows if not math.isnan(r[f"{alpha}: x loss"])]
        better = sum(r[f"w8a8 + {alpha}"] < r["w8a8"] for r in rows)
        worse = sum(r[f"w8a8 + {alpha}"] > r["w8a8"] for r in rows)
        lines.append(
            f"- alpha {alpha}: w8a8's quality loss x{statistics.median(ratios):.3f} (median; "
            f"worst x{max(ratios):.3f}); better on {better}, worse on {worse} of {len(rows)}."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(TRAINED + ZOO))
    parser.add_argument(
        "--architectures",
        default=",".join(ARCHITECTURES),
        help="bench_architectures models ('' for none)",
    )
    args = parser.parse_args()
    names = model_names(parser, args.models, TRAINED + ZOO)
    archs = model_names(parser, args.architectures, list(ARCHITECTURES))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = available_rows(names, lambda n: row(workload_case(n)))
    arch_rows = available_rows(archs, lambda n: row(architecture_case(n)))
    sections = [
        "# SmoothQuant folding for w8a8: none vs alpha 0.5 vs auto",
        f"CPU: {cpu_model()}; torch {torch.__version__}, 1 thread. Generated by "
        f"`python benchmarks/bench_smoothing.py` in {time.perf_counter() - t0:.0f} s.",
        " ".join(__doc__.split("\n\n")[1].split()),
    ]
    for title, table in [("Shipped workloads", rows), ("Hugging Face architectures", arch_rows)]:
        if table:
            sections += [f"## {title}", _summary(table), md_table(table, list(table[0]), digits=4)]
    text = "\n\n".join(sections)
    write_result(OUT, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
