"""Tests of the stdlib causal-LM workload: the file split, exact perplexity, training, caching."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mpsearch as mps
from mpsearch.workloads import WORKLOADS, Workload, load_workload
from mpsearch.workloads._stdlib_lm import (
    SPLITS,
    TINY_CONFIG,
    PerplexityWorkload,
    StdlibLMConfig,
    StdlibTokenizer,
    build_model,
    build_stdlib_lm_workload,
    perplexity,
    split_of,
    stdlib_files,
    stdlib_root,
    token_stream,
)

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stdlib-lm-cache")


@pytest.fixture(scope="module")
def tiny(cache_root: Path) -> Workload:
    return load_workload("stdlib_lm_tiny", cache_dir=cache_root, n_calib=8, n_test=16, batch_size=8)


def random_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY_CONFIG, StdlibTokenizer.byte_level())


# ------------------------------------------------------------------------------------ split


def test_files_are_split_by_file_deterministically_and_disjointly() -> None:
    files = stdlib_files()
    sets = {name: set(files[name]) for name in SPLITS}
    assert all(len(sets[name]) == len(files[name]) > 50 for name in SPLITS)
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not sets[a] & sets[b], (a, b)
    assert sum("json/__init__.py" in sets[name] for name in SPLITS) == 1
    assert "json/__init__.py" in sets[split_of("json/__init__.py")]
    for name in SPLITS:  # every file sits in the split its own path hashes to
        assert {split_of(path) for path in files[name]} == {name}
    assert stdlib_files.__wrapped__() == files  # recomputed from scratch: the same split
    everything = set().union(*sets.values())
    assert not any("site-packages" in p or "dist-packages" in p for p in everything)
    root = stdlib_root()
    on_disk = {
        p.relative_to(root).as_posix()
        for p in (root / "json").rglob("*.py")  # one package, checked against the disk
    }
    assert on_disk <= everything


def test_streams_are_the_stdlib_text_with_end_of_text_separators() -> None:
    tokenizer = StdlibTokenizer.byte_level()
    paths = ["json/__init__.py", "json/decoder.py"]
    stream = token_stream(tokenizer, paths)
    texts = [(stdlib_root() / p).read_text(encoding="utf-8") for p in paths]
    separators = (stream == tokenizer.eot_id).nonzero().flatten().tolist()
    first = len(texts[0].encode("utf-8"))
    assert separators == [first, len(stream) - 1]
    assert tokenizer.decode(stream[:first].tolist()) == texts[0]
    assert tokenizer.decode(stream[first + 1 :].tolist()) == texts[1]
    assert len(token_stream(tokenizer, paths, min_tokens=10)) == first + 1  # stops early


# ------------------------------------------------------------------------------- perplexity


class UniformLM(nn.Module):
    """All-zero logits: every next token has probability 1 / vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    ids = torch.randint(0, 37, (3, 9), generator=torch.Generator().manual_seed(0))
    assert perplexity(UniformLM(37), [{"input_ids": ids}, ids[:1]]) == pytest.approx(37, rel=1e-6)


def test_perplexity_equals_a_hand_computation_with_padding_masked() -> None:
    model = random_llama()
    generator = torch.Generator().manual_seed(1)
    full = {"input_ids": torch.randint(0, 257, (2, 12), generator=generator)}
    ids = torch.randint(0, 257, (3, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    padded = {"input_ids": ids, "attention_mask": mask}

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in (full, padded):
            logits = model(**batch).logits
            batch_mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
            for row in range(logits.shape[0]):
                real = batch_mask[row].nonzero().flatten()
                start, end = int(real[0]), int(real[-1]) + 1
                nll = F.cross_entropy(
                    logits[row, start : end - 1].double(),
                    batch["input_ids"][row, start + 1 : end],
                    reduction="sum",
                )
                total += float(nll)
                count += end - 1 - start
    assert count == 2 * 11 + 6 + 9 + 6
    assert perplexity(model, [full, padded]) == pytest.approx(math.exp(total / count), rel=1e-6)


def test_perplexity_rejects_batches_without_token_ids() -> None:
    with pytest.raises(ValueError, match="input_ids"):
        perplexity(UniformLM(4), [{"pixels": torch.zeros(1, 3)}])


def test_config_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="'tokenizer'"):
        replace(TINY_CONFIG, tokenizer="words")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'n_heads'"):
        replace(TINY_CONFIG, n_heads=3)
    with pytest.raises(ValueError, match="'split'"):
        StdlibLMConfig(split=(0.5, 0.5, 0.5))


# --------------------------------------------------------------------------- the workload


def test_both_sizes_are_registered() -> None:
    assert {"stdlib_lm", "stdlib_lm_tiny"} <= set(WORKLOADS)


def test_tiny_workload_learns_and_reports_its_perplexity(tiny: Workload) -> None:
    assert isinstance(tiny, PerplexityWorkload)
    assert tiny.info["from_cache"] is False and tiny.info["tokenizer"] == "bpe"
    assert tiny.info["vocab_size"] == 512 == tiny.model.config.vocab_size
    assert len(tiny.test) == 2 and len(tiny.calib) == 1
    assert tiny.test[0]["input_ids"].shape == (8, TINY_CONFIG.seq_len)
    assert tiny.example_input["input_ids"].dtype == torch.long

    ppl = perplexity(tiny.model, tiny.test)
    assert tiny.evaluate(tiny.model) == pytest.approx(-math.log(ppl), rel=1e-12)
    assert tiny.info["fp32_perplexity"] == pytest.approx(ppl, rel=1e-12)
    torch.manual_seed(0)
    untrained = build_model(
        TINY_CONFIG,
        StdlibTokenizer.from_json(Path(tiny.info["tokenizer_file"]).read_text(encoding="utf-8")),
    )
    assert ppl < 0.5 * perplexity(untrained, tiny.test)
    assert ppl < 0.5 * tiny.info["vocab_size"]  # far better than a uniform guess


def test_second_load_reuses_the_cached_tokenizer_and_weights(
    tiny: Workload, cache_root: Path
) -> None:
    again = load_workload(
        "stdlib_lm_tiny", cache_dir=cache_root, n_calib=8, n_test=16, batch_size=8
    )
    assert again.info["from_cache"] is True and again.info["tokenizer_from_cache"] is True
    assert again.info["steps"] == tiny.info["steps"]
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key
    assert torch.equal(again.test[1]["input_ids"], tiny.test[1]["input_ids"])
    assert again.info["fp32_quality"] == tiny.info["fp32_quality"]


def test_generation_with_a_kv_cache_matches_full_recomputation(tiny: Workload) -> None:
    prompt = tiny.test[0]["input_ids"][:1, :8]
    cached = tiny.model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = tiny.model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 16)
    assert torch.equal(cached, uncached)


def test_profile_takes_the_tiny_workload(tiny: Workload, tmp_path: Path) -> None:
    prof = mps.profile(tiny.model, tiny.calib, schemes=["w8a8", "w4a16"], cache_dir=tmp_path)
    layers = {
        name for name, m in tiny.model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
    }
    assert set(prof.table["layer"]) == layers
    assert set(prof.table["scheme"]) == {"w8a8", "w4a16"}
    assert prof.table["e2e"].notna().all()


def test_byte_level_tokenizer_and_the_wall_clock_budget(tmp_path: Path) -> None:
    config = replace(TINY_CONFIG, tokenizer="byte", max_train_files=2, max_train_seconds=1e-9)
    options = {"name": "bytes", "seed": 0, "cache_dir": tmp_path, "n_calib": 2, "batch_size": 2}
    wl = build_stdlib_lm_workload(config, n_test=4, **options)
    assert wl.info["steps"] == 0 and wl.info["stopped_by"] == "time"
    assert wl.info["vocab_size"] == 257 and "tokenizer_file" not in wl.info
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".pt"]  # weights only
    expected: list[int] = []  # the test files' UTF-8 bytes, each followed by token 256
    for path in stdlib_files()["test"][:50]:
        text = (stdlib_root() / path).read_text(encoding="utf-8", errors="replace")
        expected += [*text.encode("utf-8"), 256]
    windows = torch.cat([batch["input_ids"] for batch in wl.test]).flatten().tolist()
    assert windows == expected[: 4 * TINY_CONFIG.seq_len]
    with pytest.raises(ValueError, match="'n_test'.*at most"):
        build_stdlib_lm_workload(config, n_test=10**8, **options)
