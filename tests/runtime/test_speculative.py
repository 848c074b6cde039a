"""SpeculativeController: greedy output identical to the reference's, exact sampling
distribution (chi-square), KV caches consistent after rejections, EOS and length handling,
and the choice of k from measured acceptance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

from mpsearch.backends import quantize
from mpsearch.backends._compiled import _cpp_compiler_missing
from mpsearch.cost._decode import KVDecoder
from mpsearch.runtime._speculative import (
    SpeculativeController,
    SpeculativeOptions,
    StepCosts,
    expected_tokens_per_step,
    verify_sampled,
)

VOCAB = 96
PROMPTS = [[1, 2, 3, 4, 5], [7], [40, 41, 12, 90, 3, 3, 8]]


@pytest.fixture(autouse=True)
def compiled_wins_the_race(monkeypatch) -> None:
    """Compiled decoding counts as faster than eager (the race is tested in test_decode)."""
    import mpsearch.cost._decode as decode_module

    monkeypatch.setattr(decode_module, "_race", lambda *args, **kwargs: (1.0, 2.0))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest (and most steadily on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # well-separated logits: float noise cannot flip an argmax
    return model


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


class WrongDraft(nn.Module):
    """A draft that always proposes a token the model itself does not predict."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        logits = self.inner(input_ids=input_ids, **kwargs).logits
        wrong = (logits.argmax(-1) + 1) % logits.shape[-1]
        return {"logits": 100.0 * nn.functional.one_hot(wrong, logits.shape[-1]).float()}


def reference_greedy(model: nn.Module, prompt: list[int], n: int) -> torch.Tensor:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(prompt) + n  # the test models never stop on their own
    return out


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_equals_reference_greedy(llama, k):
    w8 = quantize(llama, "w8a16", backend="cpu")
    spec = SpeculativeController(llama, w8, k=k)
    spec_wrong = SpeculativeController(llama, WrongDraft(llama), k=k)
    for prompt in PROMPTS:
        expected = reference_greedy(llama, prompt, 12)
        assert torch.equal(spec.generate(torch.tensor([prompt]), max_new_tokens=12), expected)
        got = spec_wrong.generate(torch.tensor([prompt]), max_new_tokens=12)
        assert torch.equal(got, expected)
    assert spec.audit["emitted"].sum() == 12 * len(PROMPTS)


def test_always_wrong_draft_is_rejected_at_every_position(llama):
    spec = SpeculativeController(llama, WrongDraft(llama), k=4)
    out = spec.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=9)
    assert torch.equal(out, reference_greedy(llama, PROMPTS[0], 9))
    audit = spec.audit
    assert len(audit) == 9  # one token per step: the reference's own
    assert (audit["accepted"] == 0).all() and (audit["emitted"] == 1).all()
    assert audit["drafted"].tolist() == [4, 4, 4, 4, 4, 3, 2, 1, 0]  # never past the 9th
    assert spec.acceptance_rate == 0.0


def test_draft_equal_to_reference_is_always_accepted(llama):
    spec = SpeculativeController(llama, "fp32", k=3)
    assert spec.draft_module is spec.reference_module is llama
    out = spec.generate(PROMPTS[2], max_new_tokens=10)
    assert torch.equal(out, reference_greedy(llama, PROMPTS[2], 10))
    audit = spec.audit
    # the reference reads the prompt alone (the draft adopts its cache), then full steps;
    # the last token is the reference's own (a draft of 0: one token was left)
    assert audit["drafted"].tolist() == [0, 3, 3, 0]
    assert audit["emitted"].tolist() == [1, 4, 4, 1]
    assert spec.acceptance_rate == 1.0
    assert spec.tokens_per_step == 10 / 4
    columns = "call_id step k drafted accepted emitted draft_ms verify_ms step_ms"
    assert list(audit.columns) == columns.split()
    assert (audit[["draft_ms", "verify_ms"]].to_numpy() >= 0).all()
    assert (audit["step_ms"] >= audit["draft_ms"] + audit["verify_ms"] - 1e-9).all()


def test_the_draft_adopts_the_references_prompt_instead_of_reading_it(llama):
    w8 = quantize(llama, "w8a16", backend="cpu")
    spec = SpeculativeController(llama, w8, k=3)
    fed: list[int] = []  # tokens per pass of the draft
    hook = w8.model.embed_tokens.register_forward_hook(lambda m, a, out: fed.append(a[0].numel()))
    try:
        out = spec.generate(PROMPTS[2], max_new_tokens=10)
    finally:
        hook.remove()
    assert torch.equal(out, reference_greedy(llama, PROMPTS[2], 10))
    # one token a pass (two after a step that accepted every drafted token), never the
    # prompt's 7; the first pass is the decoder's one-token probe of its cache's dtype
    assert fed and max(fed) <= 2 and sum(fed) < len(PROMPTS[2]) + 10
    assert spec.audit["drafted"].iloc[0] == 0  # the prompt's step: the reference alone


def test_a_draft_that_cannot_adopt_the_prompt_reads_it_itself(llama, monkeypatch):
    w8 = quantize(llama, "w8a16", backend="cpu")
    spec = SpeculativeController(llama, w8, k=3)
    monkeypatch.setattr(KVDecoder, "adopt", lambda self, other, length: False)
    out = spec.generate(PROMPTS[2], max_new_tokens=10)
    assert torch.equal(out, reference_greedy(llama, PROMPTS[2], 10))
    drafted = spec.audit["drafted"].tolist()
    assert drafted[0] == 0 and drafted[1] > 0  # the prompt's step, then the draft's own pass


@pytest.mark.parametrize("n", [0, 1, 2, 5, 6])
def test_max_new_tokens_exactly(llama, n):
    spec = SpeculativeController(llama, "fp32", k=4)
    out = spec.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=n)
    assert out.shape == (1, len(PROMPTS[0]) + n)
    assert spec.audit["emitted"].sum() == n
    if n:
        assert torch.equal(out, reference_greedy(llama, PROMPTS[0], n))


def test_eos_inside_a_draft(llama):
    full = reference_greedy(llama, PROMPTS[0], 12)[0, len(PROMPTS[0]) :].tolist()
    eos = full[2]  # the third token; not among the first two
    first = full.index(eos)
    expected = PROMPTS[0] + full[: first + 1]
    spec = SpeculativeController(llama, "fp32", k=6)
    out = spec.generate(PROMPTS[0], max_new_tokens=12, eos_token_id=eos)
    assert out[0].tolist() == expected
    # after the prompt's step (the reference's first token), the draft stopped at its EOS,
    # which was accepted: no extra token
    row = spec.audit.iloc[1]
    assert (row["drafted"], row["accepted"], row["emitted"]) == (first,) * 3
    # an EOS the reference emits itself (the draft is wrong everywhere) ends decoding too
    wrong = SpeculativeController(llama, WrongDraft(llama), k=3)
    assert wrong.generate(PROMPTS[0], max_new_tokens=12, eos_token_id=[eos, 999])[0].tolist() == (
        expected
    )


def test_eos_drafted_but_rejected_does_not_stop(llama):
    full = reference_greedy(llama, PROMPTS[1], 8)[0, 1:].tolist()
    eos = (full[0] + 1) % VOCAB  # WrongDraft proposes exactly this first
    if eos in full:
        pytest.skip("the drafted EOS is also a reference token on this seed")
    spec = SpeculativeController(llama, WrongDraft(llama), k=4)
    out = spec.generate(PROMPTS[1], max_new_tokens=8, eos_token_id=eos)
    assert out[0].tolist() == PROMPTS[1] + full
    assert spec.audit["drafted"].iloc[0] == 1  # drafting stopped at the (wrong) EOS


@pytest.mark.parametrize("draft", ["w4a16", "wrong"])
def test_caches_after_rejections_equal_a_fresh_run(llama, draft):
    spec = SpeculativeController(
        llama, WrongDraft(llama) if draft == "wrong" else draft, backend="cpu", k=3
    )
    seq = spec.generate(PROMPTS[2], max_new_tokens=11)[0].tolist()
    if draft == "wrong":
        assert (spec.audit["accepted"] == 0).all()  # every step cropped both caches
    with torch.inference_mode():
        for decoder in (spec._reference, spec._draft.decoder):
            assert decoder.seen <= len(seq) - 1
            assert decoder.cache.get_seq_length() == decoder.seen
            cached = decoder.feed(seq[decoder.seen :], keep=1)[0]
            fresh = fresh_logits(spec, decoder, seq, PROMPTS[2])
            torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=0)


def fresh_logits(spec, decoder, seq: list[int], prompt: list[int]) -> torch.Tensor:
    """The last logits of a fresh eager run of ``decoder``'s model over ``seq``; a draft that
    adopts the reference's cache starts from the reference's keys and values of ``prompt``."""
    fresh = KVDecoder(decoder.module)
    fresh.reset()
    if decoder is spec._draft.decoder and fresh.can_adopt(spec._reference):
        ref = KVDecoder(spec.reference_module)
        ref.reset()
        ref.feed(prompt, keep=1)
        assert fresh.adopt(ref, len(prompt))
    return fresh.feed(seq[fresh.seen :], keep=1)[0]


def test_rollback_then_continue_equals_fresh(llama):
    spec = SpeculativeController(llama, "fp32", k=2)
    ref = spec._reference
    prompt = PROMPTS[0]
    with torch.inference_mode():
        ref.reset()
        ref.feed([*prompt, 9, 10, 11], keep=1)
        ref.rollback(len(prompt) + 1)  # keep the prompt and token 9
        assert ref.cache.get_seq_length() == len(prompt) + 1
        cached = ref.feed([12], keep=1)[0]
        fresh = llama(input_ids=torch.tensor([[*prompt, 9, 12]])).logits[0, -1]
    torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=0)


# -- sampling ------------------------------------------------------------------------------------
class Bigram(nn.Module):
    """A causal LM whose next-token logits depend only on the last token (no cache needed)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Embedding.from_pretrained(table)

    def forward(
        self, input_ids: torch.Tensor, cache=None, use_cache=False
    ) -> dict[str, torch.Tensor]:
        return {"logits": self.table(input_ids)}


def bigram_pair(vocab: int = 8) -> tuple[Bigram, Bigram]:
    g = torch.Generator().manual_seed(3)
    return Bigram(torch.randn(vocab, vocab, generator=g)), Bigram(
        torch.randn(vocab, vocab, generator=g)
    )


def sampled(spec: SpeculativeController, n: int, draws: int) -> torch.Tensor:
    # seeds 0..3999 give p = 0.0014 at the third token of the exact sampler: chance (20000
    # draws give p = 0.12 there, the other blocks of 4000 p = 0.06 to 0.99)
    seeds = range(draws, 2 * draws)
    return torch.stack(
        [spec.generate([0], max_new_tokens=n, temperature=0.8, seed=s)[0, 1:] for s in seeds]
    )


def position_distributions(table: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The exact marginal of each of the first ``n`` tokens after the prompt [0]."""
    step = torch.softmax(table.double() / 0.8, dim=-1)
    dist = step[0]
    out = [dist]
    for _ in range(n - 1):
        dist = dist @ step
        out.append(dist)
    return out


def chi2_pvalue(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=expected.numel()).double()
    return float(chisquare(counts.numpy(), (expected * counts.sum()).numpy()).pvalue)


def test_sampling_matches_the_reference_distribution():
    ref, draft = bigram_pair()
    draws = 4000
    spec = SpeculativeController(ref, draft, k=2)
    tokens = sampled(spec, 3, draws)  # two drafted tokens and the reference's third
    assert 0.2 < spec.acceptance_rate < 0.9  # rejections and acceptances both happen
    expected = position_distributions(ref.table.weight, 3)
    for pos in range(3):
        assert chi2_pvalue(tokens[:, pos], expected[pos]) > 0.01
    # the joint of the first two tokens: p(t1) p(t2 | t1)
    step = torch.softmax(ref.table.weight.double() / 0.8, dim=-1)
    joint = (step[0][:, None] * step).reshape(-1)
    assert chi2_pvalue(tokens[:, 0] * 8 + tokens[:, 1], joint) > 0.01
    # the same test rejects sampling from the draft alone
    naive = sampled(SpeculativeController(draft, "fp32", k=2), 3, draws)
    assert chi2_pvalue(naive[:, 0], expected[0]) < 0.01
    assert chi2_pvalue(naive[:, 1], expected[1]) < 0.01


def test_verify_sampled_rule():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    q = [torch.tensor([0.0, 1.0, 0.0])]
    g = torch.Generator().manual_seed(0)
    # x = 1: p/q = 0.5; on rejection the residual max(0, p - q) is all on token 0
    outcomes = [verify_sampled(p, q, [1], g) for _ in range(2000)]
    assert set(outcomes) == {(1, 2), (0, 0)}
    assert abs(sum(o == (0, 0) for o in outcomes) / 2000 - 0.5) < 0.05
    # a token the reference never emits is never accepted
    p2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert verify_sampled(p2, [torch.tensor([0.0, 1.0, 0.0])], [1], g) == (0, 0)


def test_sampling_is_seeded(llama):
    spec = SpeculativeController(llama, "w8a16", backend="cpu", k=3)
    a = spec.generate(PROMPTS[0], max_new_tokens=10, temperature=1.0, seed=5)
    b = spec.generate(PROMPTS[0], max_new_tokens=10, temperature=1.0, seed=5)
    assert torch.equal(a, b) and a.shape == (1, len(PROMPTS[0]) + 10)


# -- tuning --------------------------------------------------------------------------------------
COSTS = StepCosts(draft_ms=0.1, verify_ms={k: 1.0 + 0.05 * k for k in (1, 2, 4, 6)})


def test_tune_picks_the_largest_k_for_a_perfect_draft_and_the_smallest_for_a_wrong_one(llama):
    prompts = [torch.tensor([p]) for p in PROMPTS[:2]]
    perfect = SpeculativeController(llama, "fp32", k=2)
    table = perfect.tune(prompts, ks=(1, 2, 4, 6), max_new_tokens=14, costs=COSTS)
    assert perfect.k == 6 and table["chosen"].tolist() == [False, False, False, True]
    assert table["tokens_per_step"].tolist() == [2.0, 3.0, 5.0, 7.0]
    assert (table["acceptance_rate"] == 1.0).all()
    wrong = SpeculativeController(llama, WrongDraft(llama), k=4)
    table = wrong.tune(prompts, ks=(1, 2, 4, 6), max_new_tokens=14, costs=COSTS)
    assert wrong.k == 1 and (table["tokens_per_step"] == 1.0).all()
    assert (table["acceptance_rate"] == 0.0).all()
    # among candidate drafts, the one that is always accepted wins
    both = SpeculativeController(llama, WrongDraft(llama), k=1)
    table = both.tune(
        prompts,
        drafts=[WrongDraft(llama), "fp32"],
        max_new_tokens=14,
        costs=COSTS,
        options=SpeculativeOptions(ks=(1, 2, 4, 6)),
    )
    assert both.draft_name == "fp32" and both.k == 6
    assert table.loc[table["chosen"], "draft"].item() == "fp32"


def test_tune_speculates_only_for_a_gain_beyond_min_gain(llama):
    spec = SpeculativeController(llama, "fp32")  # a perfect draft: 2 tokens per step at k = 1
    for step_ms, k in ((1.0 / 0.55, 0), (1.0 / 0.555, 0), (1.0 / 0.65, 1)):  # 1.1x, 1.11x, 1.3x
        costs = StepCosts(draft_ms=step_ms - 1.0, verify_ms={0: 1.0, 1: 1.0})
        opts = SpeculativeOptions(ks=(0, 1), max_new_tokens=6, min_gain=0.12)
        table = spec.tune([PROMPTS[0]], costs=costs, options=opts)
        assert spec.k == k, (step_ms, table)
    with pytest.raises(ValueError, match="'min_gain' option must be a number in \\[0, 1\\)"):
        SpeculativeOptions(min_gain=1.5)


def test_tune_measures_costs(llama):
    spec = SpeculativeController(llama, "w8a16", backend="cpu")
    table = spec.tune([PROMPTS[0]], ks=(0, 1, 3), max_new_tokens=8)
    assert table["k"].tolist() == [0, 1, 3] and table["chosen"].sum() == 1
    assert (table[["draft_ms", "verify_ms", "step_ms", "tokens_per_s"]].to_numpy() > 0).all()
    assert spec.k == int(table.loc[table["chosen"], "k"].item())
    assert table.loc[0, "tokens_per_step"] == 1.0  # k = 0: plain reference decoding
    a = table.loc[0, "acceptance_rate"]
    assert table.loc[1, "tokens_per_step_geometric"] == pytest.approx(1 + a)
    assert len(spec.audit) == 0  # tuning runs are not served calls
    costs = spec.measure_costs(PROMPTS[0], ks=(2, 1), repeats=2)
    assert sorted(costs.verify_ms) == [1, 2] and costs.draft_ms > 0


def test_costs_are_timed_in_the_order_a_step_runs(llama):
    # timed apart, a draft pass found its weights in the CPU caches; in a step the reference's
    # pass has just evicted them (stdlib_lm: 1.18 vs 1.44 ms, and a k that slowed decoding)
    spec = SpeculativeController(llama, "w8a16", backend="cpu")
    calls: list[tuple[str, int]] = []
    for who, decoder in (("draft", spec._draft.decoder), ("ref", spec._reference)):
        feed = decoder.feed

        def logged(tokens, keep, _feed=feed, _who=who):
            calls.append((_who, len(tokens)))
            return _feed(tokens, keep)

        decoder.feed = logged
    prompt = PROMPTS[0]
    spec.measure_costs(prompt, ks=(0, 2), repeats=2)
    timed = calls[2:]  # after each variant's prompt
    assert calls[:2] == [("draft", len(prompt)), ("ref", len(prompt))]
    assert timed == [("ref", 1)] * 3 + [("draft", 1), ("draft", 1), ("ref", 3)] * 3


def test_expected_tokens_per_step():
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


# -- validation ----------------------------------------------------------------------------------
def test_refuses_bad_arguments(llama):
    spec = SpeculativeController(llama, "fp32")
    with pytest.raises(ValueError, match="'input_ids'.*batch of 2"):
        spec.generate(torch.ones(2, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="'input_ids'.*at least one token"):
        spec.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="'max_new_tokens'"):
        spec.generate([1], max_new_tokens=-1)
    with pytest.raises(ValueError, match="'temperature'"):
        spec.generate([1], max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="'eos_token_id'"):
        spec.generate([1], max_new_tokens=2, eos_token_id="x")
    with pytest.raises(ValueError, match="'k'"):
        SpeculativeController(llama, "fp32", k=-1)
    with pytest.raises(ValueError, match="'draft'.*KV cache"):
        SpeculativeController(llama, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'draft'"):
        SpeculativeController(llama, 3)
    with pytest.raises(ValueError, match="'ks'"):
        spec.tune([[1]], ks=(-1,))
    with pytest.raises(ValueError, match="'costs'"):
        spec.tune([[1]], ks=(1, 8), costs=COSTS)
    assert math.isnan(spec.acceptance_rate)
    with pytest.raises(ValueError, match="'compile' argument must be False, True or 'max-"):
        SpeculativeController(llama, "fp32", compile="fast")


def test_a_reference_with_per_call_activation_ranges_is_refused_and_calib_fixes_it(llama):
    # a range measured per call spans every verified token: once, the tokens differed
    with pytest.raises(ValueError, match="'reference'.*pass calib= batches.*15 int8 layer"):
        SpeculativeController(llama, "w4a16", reference="w8a8")
    with pytest.raises(ValueError, match="'reference'.*measured per call"):  # a module too
        SpeculativeController(llama, "w4a16", reference=quantize(llama, "w8a8", backend="cpu"))
    calib = [{"input_ids": torch.tensor([p])} for p in PROMPTS]
    spec = SpeculativeController(llama, "w4a16", reference="w8a8", calib=calib, k=3)
    reference = quantize(llama, "w8a8", backend="cpu", calib=calib)
    for prompt in PROMPTS:
        expected = reference_greedy(reference, prompt, 10)
        assert torch.equal(spec.generate(torch.tensor([prompt]), max_new_tokens=10), expected)


def test_max_autotune_tunes_the_draft_only(llama):
    # autotuned kernels give a block of verified tokens other logits than one at a time
    spec = SpeculativeController(llama, "w8a16", backend="cpu", compile="max-autotune")
    assert spec._draft.decoder.compile == "max-autotune"
    assert spec._reference.compile is True


@pytest.mark.slow  # Inductor compiles about six graphs
@pytest.mark.skipif(_cpp_compiler_missing() is not None, reason="Inductor needs a C++ compiler")
def test_compiled_variants_reproduce_the_reference_greedy_tokens(llama):
    spec = SpeculativeController(llama, "w8a16", backend="cpu", k=2, compile=True)
    prompt = PROMPTS[2]
    out = spec.generate(torch.tensor([prompt]), max_new_tokens=9)
    assert torch.equal(out, reference_greedy(llama, prompt, 9))
    expected = reference_greedy(llama, prompt, 10)[0].tolist()
    eos = expected[len(prompt) + 4]  # an EOS inside a draft: a short step, padded
    cut = expected[: expected.index(eos, len(prompt)) + 1]
    assert spec.generate(prompt, max_new_tokens=10, eos_token_id=eos)[0].tolist() == cut
    assert {n for n, _, _ in spec._reference._checked} == {3}  # every verification: k + 1
    info = spec.compile_info
    assert info["reference"]["mode"] == info["draft"]["mode"] == "inductor", info
    with torch.inference_mode():  # the static caches after the last step equal a fresh run
        seq = out[0].tolist()
        for decoder in (spec._reference, spec._draft.decoder):
            assert int(decoder.cache.get_seq_length()) == decoder.seen
            cached = decoder.feed(seq[decoder.seen :], keep=1)[0]
            fresh = fresh_logits(spec, decoder, seq, prompt)
            torch.testing.assert_close(cached, fresh, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2)
    model = MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@pytest.mark.parametrize("k", [1, 3])
def test_a_state_space_model_speculates_exactly(mamba, k):
    """Mamba keeps recurrent states, not keys and values: each rejection restores a recorded
    state. Its drafts quantized without calibration batches keep the layers it reads
    directly (``conv1d``, ``dt_proj``) in fp32, found on the model's own example input: their
    bf16 biases met float32 activations before."""
    with pytest.warns(UserWarning, match="stay fp32"):
        draft = quantize(mamba, "w8a16", backend="cpu")
    assert type(draft.backbone.layers[0].mixer.conv1d) is nn.Conv1d
    for spec in (
        SpeculativeController(mamba, draft, k=k),
        SpeculativeController(mamba, WrongDraft(mamba), k=k),
    ):
        for prompt in PROMPTS:
            expected = reference_greedy(mamba, prompt, 12)
            assert torch.equal(spec.generate(torch.tensor([prompt]), max_new_tokens=12), expected)
    assert spec.acceptance_rate == 0.0  # the wrong draft: rejected at every position


def test_a_state_space_model_refuses_a_k_beyond_what_its_cache_rolls_back(mamba):
    spec = SpeculativeController(mamba, WrongDraft(mamba), k=2)
    with pytest.raises(ValueError, match="'k'.*recurrent layers"):
        spec.generate(torch.tensor([[1, 2]]), max_new_tokens=4, k=63)
