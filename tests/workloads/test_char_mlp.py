"""Tests of the wide char-level MLP language model workload."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from mpsearch.workloads import WORKLOADS, CharMLP, Workload
from mpsearch.workloads._char_mlp import CharMLPConfig, build_char_mlp_workload, contexts
from mpsearch.workloads._text import corpus

SMALL = CharMLPConfig(hidden=128, n_hidden=2, steps=150, train_batch=64, lr=3e-3)
SMALL_FLOOR = 0.24
"""Next-character accuracy the small configuration must reach (measured: 0.260)."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("char-mlp-cache")


def _small(cache_root: Path) -> Workload:
    return build_char_mlp_workload(
        SMALL,
        name="char_mlp_small",
        seed=0,
        cache_dir=cache_root,
        n_calib=256,
        n_test=1024,
        batch_size=32,
    )


@pytest.fixture(scope="module")
def small(cache_root: Path) -> Workload:
    return _small(cache_root)


def _unigram_accuracy(wl: Workload) -> float:
    text = corpus(0)
    most_common = Counter(text.train.tolist()).most_common(1)[0][0]
    labels = torch.cat(wl.test_labels or [])
    return float((labels == most_common).float().mean())


def test_registered() -> None:
    assert "char_mlp" in WORKLOADS


def test_contexts_pairs_each_position_with_its_next_character() -> None:
    stream = torch.tensor([5, 6, 7, 8, 9, 10])
    x, y = contexts(stream, 4)
    assert x.tolist() == [[5, 6, 7, 8], [6, 7, 8, 9]]
    assert y.tolist() == [9, 10]
    with pytest.raises(ValueError, match="context"):
        contexts(stream[:3], 4)


def test_small_config_trains_above_floor_and_unigram(small: Workload) -> None:
    assert small.task == "classification"
    assert small.example_input.dtype == torch.long
    assert small.example_input.shape == (32, SMALL.context)
    accuracy = small.evaluate(small.model)
    assert accuracy >= SMALL_FLOOR
    assert accuracy > _unigram_accuracy(small) + 0.05  # unigram guessing: 0.186
    assert small.info["fp32_quality"] == accuracy


def test_splits_sizes_and_labels_in_vocabulary(small: Workload) -> None:
    assert sum(len(b) for b in small.calib) == 256
    assert sum(len(b) for b in small.test) == 1024
    vocab = small.info["vocab_size"]
    for batch, labels in zip(small.test, small.test_labels or [], strict=True):
        assert batch.shape[0] == labels.shape[0]
        assert int(labels.max()) < vocab and int(batch.max()) < vocab
    # the test split's inputs come from the test stream, not the training stream
    text = corpus(0)
    test_x, _ = contexts(text.test, SMALL.context)
    first = small.test[0][0]
    assert bool((test_x == first).all(dim=1).any())


def test_second_load_comes_from_cache_bit_identical(small: Workload, cache_root: Path) -> None:
    again = _small(cache_root)
    assert again.info["from_cache"] is True
    for key, value in small.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key


def test_model_layers_are_plain_linear() -> None:
    model = CharMLP(vocab_size=96, context=8, embed=4, hidden=32, n_hidden=3)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == ["layers.0", "layers.1", "layers.2", "head"]
    with pytest.raises(ValueError, match="n_hidden"):
        CharMLP(vocab_size=96, n_hidden=0)
