"""Batch-1 decoding time: prefill and per-token steps with the model's own KV cache."""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from helpers import tiny_llama as _llama

import mpsearch as mps
from mpsearch.backends import get_backend
from mpsearch.backends._compiled import _cpp_compiler_missing
from mpsearch.backends._kernels import FbgemmInt8Linear, choice_key, onednn_u8s8_saturates
from mpsearch.cost import KVDecoder, measure_decode
from mpsearch.cost import _decode as decode_module
from mpsearch.cost._attention import decoding_attention
from mpsearch.cost._decode import MIN_STATIC_CAPACITY, DecodeTimer, _native_gqa

transformers = pytest.importorskip("transformers")


def test_decode_is_the_models_greedy_generation_and_is_timed() -> None:
    model = _llama()
    prompt = torch.tensor([[5, 17, 42, 8]])
    t = measure_decode(model, prompt, new_tokens=12, repeats=2)
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert t.tokens == expected[0, 4:].tolist()
    assert (
        t.prefill_ms > 0 and t.decode_ms > 0 and t.tokens_per_s == pytest.approx(1000 / t.decode_ms)
    )


def test_a_quantized_plan_decodes_on_the_cpu_kernels() -> None:
    model = _llama()
    qm = mps.quantize(model, "w8a16", backend="cpu")
    t = measure_decode(qm, torch.tensor([[1, 2, 3]]), new_tokens=6, repeats=1)
    assert len(t.tokens) == 6 and t.decode_ms > 0


def test_decode_refuses_what_it_cannot_time() -> None:
    model = _llama()
    with pytest.raises(
        ValueError, match="'input_ids' argument must be a LongTensor of shape \\[1, T\\]"
    ):
        measure_decode(model, torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="'new_tokens'"):
        measure_decode(model, torch.tensor([[1, 2]]), new_tokens=0)

    class NoCache(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
            return torch.nn.functional.one_hot(input_ids, 8).float()

    with pytest.raises(ValueError, match="forward takes a KV cache"):
        measure_decode(NoCache(), torch.tensor([[1, 2]]))


REAL_RACE = decode_module._race


@pytest.fixture(autouse=True)
def compiled_wins_the_race(monkeypatch) -> None:
    """A compiled step counts as faster than the eager one (1 ms against 2): tests of what compiled
    decoding does must not hang on a timing, which a loaded machine flipped once (5.3 vs
    2.3 ms). The race itself is tested on a step really slower compiled (``REAL_RACE``)."""
    monkeypatch.setattr(decode_module, "_race", lambda *args, **kwargs: (1.0, 2.0))


needs_compiler = pytest.mark.skipif(
    _cpp_compiler_missing() is not None, reason="Inductor needs a C++ compiler"
)


@needs_compiler
def test_compiled_decode_equals_eager_decode() -> None:
    # the graph is compiled, checked and run for real; only its race against the eager step
    # is decided for the compiled one (compiled_wins_the_race)
    model = _llama()
    prompt = torch.tensor([[5, 17, 42, 8]])
    eager = measure_decode(model, prompt, new_tokens=10, repeats=1)
    decoder = KVDecoder(model, compile=True)
    compiled = measure_decode(decoder, prompt, new_tokens=10, repeats=1)
    assert compiled.tokens == eager.tokens
    assert compiled.compile_info["mode"] == "inductor", compiled.compile_info
    again = measure_decode(decoder, prompt[:, :2], new_tokens=5, repeats=1)  # graphs reused
    assert again.tokens == measure_decode(model, prompt[:, :2], new_tokens=5, repeats=1).tokens
    assert len(decoder._checked) == 1  # one graph: one token at a time, one cache size
    assert eager.compile_info["mode"] == "eager"


@pytest.mark.slow  # Inductor times its candidate kernels for each matrix product shape
@needs_compiler
def test_max_autotune_decoding_equals_eager_decoding_for_two_models_of_one_architecture(
    monkeypatch,
) -> None:
    # the second model once got the first one's prepacked weights from Inductor's graph cache
    switched: list[bool] = []

    def switch():  # max-autotune traces one-query attention (tests/cost/test_attention.py)
        switched.append(True)
        return decoding_attention()

    monkeypatch.setattr(decode_module, "decoding_attention", switch)
    prompt = torch.tensor([[5, 17, 42, 8]])
    for seed in (0, 1):  # one layer, every product 64 wide: few shapes to autotune
        model = _llama(seed, intermediate_size=64, num_hidden_layers=1)
        qm = mps.quantize(model, "w8a16", backend="cpu")
        eager = measure_decode(qm, prompt, new_tokens=8, repeats=1)
        tuned = measure_decode(qm, prompt, new_tokens=8, repeats=1, compile="max-autotune")
        assert tuned.compile_info["mode"] == "inductor", (seed, tuned.compile_info)
        assert "compiled by Inductor (max-autotune)" in tuned.compile_info["reason"]
        assert tuned.tokens == eager.tokens
    assert switched


@needs_compiler
@pytest.mark.skipif(
    onednn_u8s8_saturates() or "fbgemm" not in torch.backends.quantized.supported_engines,
    reason="oneDNN's u8 x s8 products saturate here, or fbgemm is missing",
)
def test_fbgemm_int8_layers_decode_compiled_as_onednn_twins_on_a_copy() -> None:
    """A plan tuned eagerly (fbgemm, which breaks Inductor's graph at each layer) decodes
    compiled on oneDNN twins of its int8 layers, in a copy of the module tree: the user's
    model keeps its fbgemm layers."""
    model = _llama()
    scheme = mps.get_scheme("w8a8")
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    cpu = get_backend("cpu").tuned({choice_key(m, scheme): "fbgemm" for m in lin})
    calib = [{"input_ids": torch.randint(0, 96, (2, 12))}]
    qm = mps.quantize(model, "w8a8", backend=cpu, calib=calib)
    fbgemm = [n for n, m in qm.named_modules() if type(m) is FbgemmInt8Linear]
    assert len(fbgemm) == len(lin)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    eager = measure_decode(qm, prompt, new_tokens=6, repeats=1)
    compiled = measure_decode(qm, prompt, new_tokens=6, repeats=1, compile=True)
    assert compiled.compile_info["mode"] == "inductor", compiled.compile_info
    said = f"{len(fbgemm)} fbgemm int8 Linear layer(s) on oneDNN's kernel"
    assert said in compiled.compile_info["reason"]
    assert compiled.tokens == eager.tokens
    assert [n for n, m in qm.named_modules() if type(m) is FbgemmInt8Linear] == fbgemm


@needs_compiler
def test_static_cache_rollback_equals_a_fresh_run() -> None:
    model = _llama()
    decoder = KVDecoder(model, compile=True)
    with torch.inference_mode():
        decoder.reset(capacity=12)
        assert decoder.capacity == MIN_STATIC_CAPACITY
        decoder.feed([3, 1, 4, 1, 5], keep=1)
        decoder.feed([9, 2], keep=2)
        decoder.rollback(6)  # keep the prompt and token 9
        assert int(decoder.cache.get_seq_length()) == decoder.seen == 6
        cached = decoder.feed([12], keep=1)[0]
        fresh = model(input_ids=torch.tensor([[3, 1, 4, 1, 5, 9, 12]])).logits[0, -1]
    torch.testing.assert_close(cached, fresh, atol=1e-4, rtol=0)
    assert decoder.compile_info["mode"] == "inductor"


@needs_compiler
def test_a_sliding_window_model_decodes_compiled_and_rolls_back_exactly() -> None:
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=4,
    )  # fmt: skip
    model = transformers.MistralForCausalLM(config).eval()
    decoder = KVDecoder(model, compile=True)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]  # longer than the window
    with torch.inference_mode():
        decoder.reset(capacity=16)
        decoder.feed(prompt, keep=1)
        decoder.feed([7], keep=1)
        decoder.feed([8, 9, 10], keep=3)  # a block past the window, then rejected
        decoder.rollback(len(prompt) + 1)
        cached = decoder.feed([11], keep=1)[0]
        fresh = model(input_ids=torch.tensor([[*prompt, 7, 11]])).logits[0, -1]
    torch.testing.assert_close(cached, fresh, atol=1e-4, rtol=0)
    assert decoder.compile_info["mode"] == "inductor", decoder.compile_info


def _fed(decoder: KVDecoder, tokens: list[int]) -> torch.Tensor:
    decoder.reset(capacity=len(tokens))
    return decoder.feed(tokens, keep=1)[0]


@pytest.mark.parametrize("compile", [False, True])
def test_a_decoder_adopting_anothers_prompt_decodes_as_if_fed_it(compile: bool) -> None:
    if compile and _cpp_compiler_missing():
        pytest.skip("no C++ compiler for Inductor")
    model = _llama()
    prompt, rest = [3, 1, 4, 1, 5, 9], [2, 6]
    source, target = KVDecoder(model), KVDecoder(model, compile=compile)
    with torch.inference_mode():
        expected = _fed(KVDecoder(model), prompt + rest)
        _fed(source, [*prompt, 7])  # holds one position more than is adopted
        target.reset(capacity=16)
        assert target.can_adopt(source) and target.adopt(source, len(prompt))
        assert target.seen == int(target.cache.get_seq_length()) == len(prompt)
        got = target.feed(rest, keep=1)[0]
        assert not target.adopt(source, len(prompt))  # a sequence already started
    # the same weights: the adopted keys and values are the ones it would have computed (up
    # to float rounding: the matrix products ran over other numbers of rows)
    torch.testing.assert_close(got, expected, atol=1e-4 if compile else 1e-5, rtol=0)
    assert source.seen == len(prompt) + 1  # the source is only read


def test_adopted_keys_and_values_take_the_adopting_models_dtype() -> None:
    model = _llama()
    half = _llama().to(torch.bfloat16)
    source, target = KVDecoder(model), KVDecoder(half)
    assert source.kv_dtype == torch.float32 and target.kv_dtype == torch.bfloat16
    with torch.inference_mode():
        _fed(source, [3, 1, 4])
        target.reset()
        assert target.adopt(source, 3)
        assert target.cache.layers[0].keys.dtype == torch.bfloat16
        got = target.feed([5], keep=1)[0]
        own = _fed(KVDecoder(half), [3, 1, 4, 5])
    torch.testing.assert_close(got, own, atol=0.15, rtol=0.05)  # bf16 keys, rounded apart


def test_adopt_refuses_another_architecture_or_a_model_without_a_config() -> None:
    source = KVDecoder(_llama())
    with torch.inference_mode():
        _fed(source, [3, 1, 4])
    wider = KVDecoder(_llama(num_hidden_layers=3))
    assert not wider.can_adopt(source)
    wider.reset()
    assert not wider.adopt(source, 3) and wider.seen == 0 and not wider.cache.layers

    class NoConfig(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, **kwargs) -> object:
            return self.inner(input_ids=input_ids, **kwargs)

    assert not KVDecoder(NoConfig(_llama())).can_adopt(source)


@needs_compiler
def test_graphs_run_without_their_guards_still_match_their_shapes() -> None:
    # once checked, a graph runs with only the guards that tell this decoder's graphs apart
    model = _llama()
    decoder = KVDecoder(model, compile=True)
    seq = [3, 1, 4]
    with torch.inference_mode():
        decoder.reset(capacity=24)
        decoder.feed(seq, keep=1)
        for step in range(9):  # (tokens, logits kept): (1, 1), (2, 2), (2, 1), (1, 1)...
            fed = [7 + step] * (1 + (step % 3 > 0))
            keep = 1 if step % 3 != 1 else 2
            seq += fed
            got = decoder.feed(fed, keep=keep)
            want = model(input_ids=torch.tensor([seq])).logits[0, -keep:]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert len(decoder._checked) == 3 and decoder.compile_info["mode"] == "inductor"


def test_grouped_heads_switch_lasts_only_while_a_step_is_traced(monkeypatch) -> None:
    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    monkeypatch.delenv(name, raising=False)
    with _native_gqa():
        assert os.environ[name] == "1"
    assert name not in os.environ
    monkeypatch.setenv(name, "0")  # the user's own setting comes back
    with _native_gqa():
        assert os.environ[name] == "1"
    assert os.environ[name] == "0"


@needs_compiler
def test_compiled_decoding_of_int8_layers_with_per_call_ranges_says_to_calibrate() -> None:
    model = _llama()
    with pytest.warns(RuntimeWarning, match="6 int8 layer.*on each call.*calib= batches"):
        KVDecoder(mps.quantize(model, {"re:.*mlp.*": "w8a8"}, backend="cpu"), compile=True)
    calib = [{"input_ids": torch.tensor([[5, 17, 42, 8]])}]
    calibrated = mps.quantize(model, {"re:.*mlp.*": "w8a8"}, backend="cpu", calib=calib)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KVDecoder(calibrated, compile=True)
        KVDecoder(mps.quantize(model, "w8a8", backend="cpu"), compile=False)  # eager: per token
    # an expert of a Mixture-of-Experts bank that no calibration token reached keeps its
    # per-call range whatever the user does: no advice for it
    from mpsearch.workloads import load_workload

    moe = load_workload("hf_mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KVDecoder(mps.quantize(moe.model, "w8a8", backend="cpu", calib=moe.calib), compile=True)


def test_decoder_without_a_static_cache_falls_back_with_the_reason() -> None:
    class Wrapped(torch.nn.Module):  # no .config: transformers cannot size a static cache
        def __init__(self) -> None:
            super().__init__()
            self.inner = _llama()

        def forward(self, input_ids: torch.Tensor, **kwargs: object) -> object:
            return self.inner(input_ids=input_ids, **kwargs)

    with pytest.warns(RuntimeWarning, match="decoding eagerly: no static KV cache for Wrapped"):
        decoder = KVDecoder(Wrapped(), compile=True)
    assert decoder.compile_info["mode"] == "eager" and not decoder.static
    t = measure_decode(Wrapped(), torch.tensor([[1, 2]]), new_tokens=3, repeats=1)
    assert len(t.tokens) == 3


def test_static_cache_refuses_a_sequence_longer_than_it_holds() -> None:
    decoder = KVDecoder(_llama(), compile=True)
    if not decoder.static:
        pytest.skip(decoder.compile_info["reason"])
    with torch.inference_mode():
        decoder.reset(capacity=4)
        with pytest.raises(ValueError, match="at most the 128 the static cache holds"):
            decoder.feed(list(range(MIN_STATIC_CAPACITY + 1)), keep=1)
    with pytest.raises(ValueError, match="'compile' argument must be False, True or 'max-autot"):
        KVDecoder(_llama(), compile="yes")
    with pytest.raises(ValueError, match="'compile' argument must be False, True or 'max-autot"):
        KVDecoder(_llama(), compile=1)


@needs_compiler
def test_two_compiled_decoders_of_one_model_keep_their_own_caches() -> None:
    model = _llama()
    a, b = KVDecoder(model, compile=True), KVDecoder(model, compile=True)
    seqs = {a: [3, 1, 4, 1, 5], b: [2, 7, 1, 8, 2, 8]}
    with torch.inference_mode():
        for d, seq in seqs.items():
            d.reset(capacity=16)
            d.feed(seq, keep=1)
        for step in range(3):  # interleaved: each pass must read and write its own cache
            for d, seq in seqs.items():
                seq.append(10 + step + len(seq))
                got = d.feed(seq[-1:], keep=1)[0]
                want = model(input_ids=torch.tensor([seq])).logits[0, -1]
                torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert a._compiled is not b._compiled and a.compile_info["mode"] == "inductor"


@pytest.mark.slow  # Inductor compiles two models
@needs_compiler
@pytest.mark.parametrize("name", ["hf_gpt2", "hf_qwen2"])
def test_compiled_decode_of_other_causal_lms_equals_eager(name: str) -> None:
    from mpsearch.workloads import load_workload

    wl = load_workload(name, n_calib=1, n_test=1, batch_size=1)
    prompt = wl.test[0]["input_ids"][:1, :12]
    model = mps.quantize(wl.model, "w8a16", backend="cpu")  # GPT-2's Conv1D layers included
    eager = measure_decode(model, prompt, new_tokens=6, repeats=1)
    compiled = measure_decode(model, prompt, new_tokens=6, repeats=1, compile=True)
    assert compiled.tokens == eager.tokens
    assert compiled.compile_info["mode"] == "inductor", compiled.compile_info


def test_decode_timer_times_each_module_on_a_decoder_of_its_own_and_reuses_it() -> None:
    model = _llama()
    qm = mps.quantize(model, "w8a16", backend="cpu")
    timer = DecodeTimer(torch.tensor([[1, 2, 3]]), new_tokens=4, compile=False)
    assert timer(model) > 0 and timer(qm) > 0 and timer(model) > 0
    assert [d.module for d in timer._decoders.values()] == [model, qm]  # one each, reused
    assert timer.how == "eager" and timer.fallbacks == []


def test_decode_timer_says_why_a_module_decoded_eagerly() -> None:
    class NoConfig(torch.nn.Module):  # transformers cannot size a static cache for it
        def __init__(self) -> None:
            super().__init__()
            self.inner = _llama()

        def forward(self, input_ids: torch.Tensor, **kwargs: object) -> object:
            return self.inner(input_ids=input_ids, **kwargs)

    timer = DecodeTimer(torch.tensor([[1, 2]]), new_tokens=3, compile=True)
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        assert timer(NoConfig()) > 0
    assert timer.how == "compiled"
    assert len(timer.fallbacks) == 1 and "no static KV cache for NoConfig" in timer.fallbacks[0]


class _SlowWhenCompiled(transformers.LlamaForCausalLM):
    """A Llama whose traced graph also multiplies two 1024 x 1024 matrices (times zero: the
    logits are unchanged), so its compiled step is slower than its eager one."""

    def forward(self, *args: object, **kwargs: object) -> object:
        out = super().forward(*args, **kwargs)
        if torch.compiler.is_compiling():
            a = torch.randn(1024, 1024)
            out.logits = out.logits + 0.0 * (a @ a @ a).sum()
        return out


@pytest.mark.skipif(_cpp_compiler_missing() is not None, reason="no C++ compiler")
def test_a_compiled_step_slower_than_the_eager_one_is_dropped_with_both_timings(
    monkeypatch,
) -> None:
    monkeypatch.setattr(decode_module, "_race", REAL_RACE)
    fast = _llama()
    slow = _SlowWhenCompiled(fast.config).eval()
    slow.load_state_dict(fast.state_dict())
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with pytest.warns(RuntimeWarning, match=r"decoding eagerly: compiled .* ms vs eager .* ms"):
        decoder = KVDecoder(slow, compile=True)
        t = measure_decode(decoder, prompt, new_tokens=6, repeats=1)
    assert decoder.compile_info["mode"] == "eager" and not decoder.static
    assert t.tokens == measure_decode(fast, prompt, new_tokens=6, repeats=1).tokens
    kept = KVDecoder(fast, compile=True)
    measure_decode(kept, prompt, new_tokens=6, repeats=1)
    assert kept.compile_info["mode"] == "inductor"
    assert re.search(r"a step [\d.]+ ms vs [\d.]+ ms eager", kept.compile_info["reason"])


class _LoopsOnValues(transformers.LlamaForCausalLM):
    """A Llama whose forward loops a number of times read from its input, as a Mixture-of-Experts
    bank's routing loop runs the experts its tokens picked: a new value needs a new graph."""

    def forward(self, *args: object, **kwargs: object) -> object:
        out = super().forward(*args, **kwargs)
        for _ in range(int(kwargs["input_ids"][0, -1]) % 3):  # type: ignore[index]
            out.logits = out.logits * 1.0
        return out


@pytest.mark.skipif(_cpp_compiler_missing() is not None, reason="no C++ compiler")
def test_a_step_needing_a_new_graph_for_new_values_decodes_on_eagerly() -> None:
    """Graphs run without their guards (only their shapes tell them apart): a step whose
    control flow reads values raised Dynamo's recompilation error mid-sequence; it now goes on
    eagerly, with the reason, and the tokens stay the eager model's."""
    fast = _llama()
    model = _LoopsOnValues(fast.config).eval()
    model.load_state_dict(fast.state_dict())
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    eager = measure_decode(fast, prompt, new_tokens=12, repeats=1)
    assert len({t % 3 for t in eager.tokens}) > 1  # the loop's count changes along the way
    decoder = KVDecoder(model, compile=True)
    with pytest.warns(RuntimeWarning, match="decoding eagerly: the compiled step needed a new"):
        compiled = measure_decode(decoder, prompt, new_tokens=12, repeats=1)
    assert compiled.tokens == eager.tokens
    assert decoder.compile_info["mode"] == "eager" and not decoder.static


def _mamba(seed: int = 0) -> torch.nn.Module:
    """A state-space causal LM (no keys and values: one recurrent state and a short
    convolution window per layer)."""
    torch.manual_seed(seed)
    config = transformers.MambaConfig(
        vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=4
    )
    return transformers.MambaForCausalLM(config).eval()


def test_a_state_space_model_decodes_and_rolls_back_exactly(monkeypatch) -> None:
    """Mamba's cache holds states, which cannot be cropped: after the prompt the decoder
    records them and restores one on rollback. It stopped with an IndexError before (an empty
    plain cache); a pass over more tokens than are recorded is split (transformers' scan of a
    longer pass would start from a zero state), and the records are dropped once they could
    cover ``ROLLBACK_TOKENS``."""
    monkeypatch.setattr(decode_module, "ROLLBACK_TOKENS", 4)
    model = _mamba()
    decoder = KVDecoder(model)
    assert decoder.recurrent and decoder.kv_dtype is None
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    with torch.inference_mode():
        fresh = model(input_ids=torch.tensor([tokens])).logits[0]
        decoder.reset()
        got = decoder.feed(tokens[:6], keep=6)  # the prompt, as generate reads it
        torch.testing.assert_close(got, fresh[:6], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="'length'"):
            decoder.rollback(5)  # nothing is recorded of the prompt
        got = decoder.feed(tokens[6:13], keep=5)  # split into passes of 4 and 3 tokens
        torch.testing.assert_close(got, fresh[8:13], atol=1e-5, rtol=0)
        decoder.rollback(8)  # back 5 tokens, through both passes
        assert decoder.seen == 8
        got = decoder.feed(tokens[8:], keep=6)
        torch.testing.assert_close(got, fresh[8:], atol=1e-5, rtol=0)
        decoder.rollback(14)  # nothing to remove: the records are dropped
        with pytest.raises(ValueError, match="'length'.*recurrent cache rolls back only"):
            decoder.rollback(13)
        for token in [1, 2, 3, 4, 5]:  # a fifth step drops the four records first
            decoder.feed([token], keep=1)
        with pytest.raises(ValueError, match="'length'"):
            decoder.rollback(decoder.seen - 2)
        decoder.rollback(decoder.seen - 1)
        continued = decoder.feed([7], keep=1)[0]
        whole = model(input_ids=torch.tensor([[*tokens, 1, 2, 3, 4, 7]])).logits[0, -1]
    torch.testing.assert_close(continued, whole, atol=1e-5, rtol=0)


def test_a_state_space_model_decodes_greedily_as_generate_does_and_falls_back_from_compile() -> (
    None
):
    model = _mamba()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # well-separated logits: float noise cannot flip an argmax
    prompt = [5, 7, 11]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0]
    for compile in (False, True):
        decoder = KVDecoder(model, compile=compile)
        seq = list(prompt)
        with torch.inference_mode():
            decoder.reset(capacity=16)
            logits = decoder.feed(seq, keep=1)
            for _ in range(8):
                seq.append(int(logits[-1].argmax()))
                logits = decoder.feed(seq[-1:], keep=1)
        assert seq == expected.tolist()
        assert decoder.compile_info["mode"] == "eager"
    assert "recurrent (state-space) layers" in decoder.compile_info["reason"]


@needs_compiler
def test_a_model_whose_cache_is_not_the_static_one_decodes_on_eagerly() -> None:
    """DeepSeek-V3 (transformers 5.25) stopped with a shape error on a one-token prompt on a
    StaticCache (its cache holds compressed latents: one head, the latent width)."""
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
    )  # fmt: skip
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    decoder = KVDecoder(model, compile=True)
    with pytest.warns(RuntimeWarning, match="did not run on a static KV cache"):
        decoder.reset(capacity=8)
        with torch.inference_mode():
            got = decoder.feed([3], keep=1)
    assert decoder.compile_info["mode"] == "eager" and not decoder.static
    with torch.inference_mode():
        got = torch.cat([got, decoder.feed([1], keep=1), decoder.feed([4], keep=1)])
        fresh = model(input_ids=torch.tensor([[3, 1, 4]])).logits[0]
    torch.testing.assert_close(got, fresh, atol=1e-5, rtol=0)


def test_a_model_failing_on_a_block_after_its_cache_says_what_failed() -> None:
    class OneAtATime(torch.nn.Module):  # as DeepSeek-V3 in transformers 5.25 (MLA)
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, past_key_values=None, **kwargs):
            if input_ids.shape[1] > 1 and past_key_values.get_seq_length():
                raise RuntimeError("The size of tensor a (4) must match the size of tensor b (8)")
            return self.inner(input_ids=input_ids, past_key_values=past_key_values, **kwargs)

    decoder = KVDecoder(OneAtATime(_llama()))
    decoder.reset()
    with torch.inference_mode():
        decoder.feed([3, 1, 4], keep=1)
        decoder.feed([1], keep=1)
        with pytest.raises(RuntimeError, match=r"OneAtATime failed on 2 tokens fed after the 4"):
            decoder.feed([5, 9], keep=2)
