"""Smoke test of ``benchmarks/bench_lm.py`` on the tiny stdlib LM (tiny settings), its
llama.cpp-style mix, and the ``decode`` settings a study config takes for it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from helpers import benchmark_module

from mpsearch.pipeline import StudyConfig, StudyDecode


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_lm") as module:
        yield module


def test_q4_k_m_style_keeps_v_and_down_at_8_bits(bench) -> None:
    from mpsearch.workloads import load_workload

    wl = load_workload("stdlib_lm_tiny", n_calib=1, n_test=1, batch_size=1)
    choices = bench.q4_k_m_style().resolve_choices(wl.model)
    eight = sorted(name for name, c in choices.items() if c == "w8a16")
    assert eight == [
        f"model.layers.{i}.{part}" for i in (0, 1) for part in ("mlp.down_proj", "self_attn.v_proj")
    ]
    assert choices["model.embed_tokens"] == "w4a16"
    assert choices["lm_head"] == "w4a16+gptq"
    assert bench.mix_label(bench.q4_k_m_style(), wl.model) == "w4a16 x1, w4a16+gptq x11, w8a16 x4"


def test_quick_run_measures_every_row(bench) -> None:
    # eager decoding only: compiled decoding is tested in tests/cost/test_decode.py (here it
    # compiled a graph per plan)
    s = replace(
        bench.QUICK, n_trials=3, rounds=1, spec_prompts=1, max_checked=1, spec_ks=(0, 2),
        spec_drafts=("w4a16",), modes=("eager",),
    )  # fmt: skip
    rows, info = bench.run(s, [1])
    by_label = {r["plan"]: r for r in rows}
    for label in ("fp32", "bf16", "int8 (w8a16)", "int4 (w4a16)", "int4+gptq", "q4_k_m-style"):
        assert label in by_label
    fp32 = by_label["fp32"]
    assert fp32["ppl"] == info["fp32_ppl"]
    assert fp32["ppl_rise_%"] == 0.0 and fp32["memory_%"] == 100.0 and fp32["x fp32 1t"] == 1.0
    # exact bytes: int8 below bf16 below fp32, int4 below int8
    assert by_label["int4 (w4a16)"]["memory_mb"] < by_label["int8 (w8a16)"]["memory_mb"]
    assert by_label["int8 (w8a16)"]["memory_mb"] < by_label["bf16"]["memory_mb"] < fp32["memory_mb"]
    assert by_label["int4+gptq"]["memory_mb"] == by_label["int4 (w4a16)"]["memory_mb"]
    if "greedy (exl2-style)" in by_label:  # fits the llama.cpp-style mix's bytes
        assert by_label["greedy (exl2-style)"]["memory_mb"] <= by_label["q4_k_m-style"]["memory_mb"]
    for r in rows:
        assert math.isfinite(r["ppl"]) and r["tok/s 1t"] > 0 and "tok/s 1t compiled" not in r
    assert info["spec"][0]["reference"] == "fp32"
    for sp in info["spec"]:
        assert sp["exact"] is True  # lossless: the reference's greedy tokens
        assert 0.0 <= sp["acceptance"] <= 1.0
    text = bench.summary(info)
    assert "speculative controller, reference fp32" in text


def test_decode_settings_are_checked() -> None:
    config = StudyConfig(workload="stdlib_lm_tiny", decode={"ks": [0, 2], "drafts": ["w4a16"]})
    assert config.decode_settings() == StudyDecode(ks=[0, 2], drafts=["w4a16"])
    assert StudyConfig(workload="stdlib_lm_tiny").decode_settings() is None
    with pytest.raises(ValueError, match=r"decode: unknown key\(s\) \['k'\]"):
        StudyConfig(workload="stdlib_lm_tiny", decode={"k": 2})
    with pytest.raises(ValueError, match="decode.ks"):
        StudyDecode(ks=[-1])
    with pytest.raises(ValueError, match="decode.references"):
        StudyDecode(references=["w4a16"])
    with pytest.raises(ValueError, match="'decode.compile' argument must be False, True or 'max"):
        StudyDecode(compile="yes")
    assert StudyDecode(compile="max-autotune").compile == "max-autotune"
    with pytest.raises(ValueError, match="workload_options"):
        StudyConfig(workload="pkg.mod:fn", workload_options={"n_test": 4})
