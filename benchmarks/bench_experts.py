"""Mixture-of-Experts banks on the ``cpu`` backend: each scheme's bank vs the fp32 bank.

Run: ``python benchmarks/bench_experts.py`` (``--rounds N``, ``--out FILE``). Needs
``transformers``. Prints a table and writes ``benchmarks/results/experts.md``.

One Mixtral expert bank at the size of a small MoE model's layer (8 experts, hidden 1024,
intermediate 2816, top-2 routing; random weights), quantized per scheme on the ``cpu``
backend (each expert's Linear layers on its Linear kernels: ``mpsearch.backends._experts``),
timed interleaved with the user's fp32 bank on 1 token (a decoding step) and on 64 tokens
(a prompt), on the same routing; bytes held and the output's SQNR against fp32. A scheme with
several implementations (``w8a8``: the expert Linear layers on each int8 Linear kernel, which
the cost model's autotuner chooses among) has a row for each.

Then batch-1 greedy decoding of the zoo's Mixtral (``hf_mixtral``: two layers, four experts
each; quantized with calibration data) per scheme, eager, compiled by Inductor on a static
KV cache and compiled with each matrix product's kernel chosen by measurement
(``max-autotune``: Inductor's C++ GEMM templates vs ATen; ``measure_decode``; under
``torch.compile`` a bank runs every expert on every token in one graph), 1 thread: ms per
token and the ratio to fp32 decoding the same way.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from _tables import md_table, write_result  # benchmarks/: the script's folder

import mpsearch as mps
from mpsearch.backends import get_backend, storage_bytes
from mpsearch.cost import cpu_model, measure_decode, median_ms, threads
from mpsearch.cost._decode import COMPILE_CHOICES, compile_label
from mpsearch.schemes import get_scheme
from mpsearch.workloads import load_workload

SCHEMES = ["fp32", "bf16", "w8a8", "w8a16", "w4a16", "w4a16_pc"]
SIZE = {"hidden_size": 1024, "intermediate_size": 2816, "num_local_experts": 8}
RESULTS = Path(__file__).parent / "results" / "experts.md"


def bank() -> torch.nn.Module:
    """The fp32 Mixtral bank (the interface's eager forward)."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = transformers.MixtralConfig(**SIZE, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    experts = MixtralExperts(cfg).eval()
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.02)
    return experts


def routing(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, SIZE["hidden_size"], generator=g)
    weights, index = torch.rand(tokens, SIZE["num_local_experts"], generator=g).topk(2, dim=-1)
    return x, index, weights / weights.sum(-1, keepdim=True)


DECODE_SCHEMES = ["fp32", "w8a8", "w4a16"]


def decode_rows(new_tokens: int = 24, repeats: int = 3) -> list[dict[str, object]]:
    """ms per decoded token of the zoo's Mixtral per scheme, eager, compiled and compiled
    max-autotune (1 thread)."""
    wl = load_workload("hf_mixtral")
    prompt = wl.calib[0]["input_ids"][:1, :16]
    models = {
        s: wl.model if s == "fp32" else mps.quantize(wl.model, s, backend="cpu", calib=wl.calib)
        for s in DECODE_SCHEMES
    }
    rows: list[dict[str, object]] = []
    with threads(1):
        for compiled in COMPILE_CHOICES:
            base = None
            for s, model in models.items():
                t = measure_decode(
                    model, prompt, new_tokens=new_tokens, repeats=repeats, compile=compiled
                )
                base = base or t.decode_ms
                rows.append(
                    {
                        "decoding": compile_label(compiled),
                        "scheme": s,
                        "ms_per_token": t.decode_ms,
                        "x_fp32": base / t.decode_ms,
                        "how": t.compile_info["mode"],
                    }
                )
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    fp32 = bank()
    cpu = get_backend("cpu")
    banks: dict[str, torch.nn.Module] = {"fp32": fp32}
    for s in SCHEMES[1:]:  # each implementation the autotuner chooses among
        for kernel in cpu.candidates(fp32, get_scheme(s)):
            label = s if kernel.name == "default" else f"{s} ({kernel.name})"
            banks[label] = cpu.build(kernel, fp32, get_scheme(s))
    rows = []
    with torch.inference_mode():
        for tokens in (1, 64):
            call = routing(tokens)
            ref = fp32(*call)
            times: dict[str, list[float]] = {s: [] for s in banks}
            for _ in range(args.rounds):  # interleaved: each bank timed in turn
                for s, m in banks.items():
                    times[s].append(median_ms(lambda m=m, c=call: m(*c), repeats=3, warmup=1))
            base = statistics.median(times["fp32"])
            for s, m in banks.items():
                ms = statistics.median(times[s])
                noise = (m(*call) - ref).pow(2).sum().clamp_min(1e-30)
                rows.append(
                    {
                        "tokens": tokens,
                        "scheme": s,
                        "module": type(m).__name__,
                        "mbytes": storage_bytes(m) / 1e6,
                        "ms": ms,
                        "x_fp32": base / ms,
                        "sqnr_db": float(10 * torch.log10(ref.pow(2).sum() / noise)),
                    }
                )
                print(rows[-1], flush=True)
    columns = ["tokens", "scheme", "module", "mbytes", "ms", "x_fp32", "sqnr_db"]
    table = md_table(rows, columns)
    print(table)
    decode = md_table(decode_rows(), ["decoding", "scheme", "ms_per_token", "x_fp32", "how"])
    print(decode)
    text = (
        "# Mixture-of-Experts banks on the cpu backend\n\n"
        f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"a Mixtral bank of {SIZE['num_local_experts']} experts, hidden {SIZE['hidden_size']}, "
        f"intermediate {SIZE['intermediate_size']}, top-2; medians of {args.rounds} interleaved "
        "rounds. Generated by `benchmarks/bench_experts.py`.\n\n"
        "`x_fp32`: the fp32 bank's time over the scheme's (higher is faster); `mbytes`: bytes "
        "held (10**6); `sqnr_db`: the output against the fp32 bank's.\n\n" + table + "\n\n"
        "## Batch-1 decoding of the zoo's Mixtral (1 thread)\n\n"
        "`measure_decode` after a 16-token prompt, 24 new tokens, medians of 3 repeats; "
        "`compiled`: Inductor on a static KV cache (`how`: what the decoder kept after racing "
        "the compiled step against the eager one), `max-autotune` with each matrix product's "
        "kernel chosen by measurement (with its int8 GEMM template, no oneDNN call: oneDNN's "
        "int8 Linear kernel costs about 33 us a call at one token whatever its size on the Xeon "
        "with AMX); `x_fp32`: fp32 decoding the same way over the "
        "scheme's time.\n\n" + decode + "\n"
    )
    write_result(args.out, text)


if __name__ == "__main__":
    main()
