"""Tests of the bundled reference workloads: quality, caching, determinism, errors."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from mpsearch.workloads import (
    WORKLOADS,
    ZOO,
    CacheWarning,
    Workload,
    load_workload,
    register_workload,
    top1_accuracy,
)
from mpsearch.workloads import _digits as digits_module
from mpsearch.workloads import _text as text_module
from mpsearch.workloads._base import split_indices
from mpsearch.workloads._cache import default_cache_dir
from mpsearch.workloads._char_mlp import CharMLPConfig, build_char_mlp_workload
from mpsearch.workloads._digits import upscaled

QUANTIZABLE = (nn.Linear, nn.Conv2d)


def layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, QUANTIZABLE)]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workload-cache")


@pytest.fixture(scope="module")
def digits(cache_root: Path) -> Workload:
    return load_workload("digits_cnn", seed=0, cache_dir=cache_root)


@pytest.fixture(scope="module")
def mlp(cache_root: Path) -> Workload:
    return load_workload("mlp", seed=0, cache_dir=cache_root)


@pytest.fixture(scope="module")
def resnet(cache_root: Path) -> Workload:
    return load_workload("resnet18", seed=0, cache_dir=cache_root, n_calib=64, n_test=64)


@pytest.fixture(scope="module")
def text() -> Workload:
    """In the default cache, which other test modules train it into (42 s of training)."""
    return load_workload("text_transformer", seed=0)


@pytest.fixture(scope="module")
def char_mlp(cache_root: Path) -> Workload:
    """``char_mlp``'s builder on a small configuration (the registered one trains for minutes)."""
    config = CharMLPConfig(hidden=128, n_hidden=2, steps=150, train_batch=64, lr=3e-3)
    return build_char_mlp_workload(
        config, name="char_mlp", seed=0, cache_dir=cache_root, n_calib=64, n_test=256, batch_size=32
    )


@pytest.fixture(scope="module")
def all_workloads(
    digits: Workload, mlp: Workload, resnet: Workload, text: Workload, char_mlp: Workload
) -> dict[str, Workload]:
    return {w.name: w for w in (digits, mlp, resnet, text, char_mlp)}


# --- registry and arguments -------------------------------------------------------------------


BUNDLED = ["char_mlp", "digits_cnn", "mlp", "resnet18", "text_transformer"]
LANGUAGE_MODELS = ["stdlib_lm", "stdlib_lm_tiny"]  # tested in test_stdlib_lm.py
BENCHMARK_ONLY = ["digits_resnet18", "digits_seg", "digits_tags"]  # built by benchmarks, studies


def test_registry_names() -> None:
    assert set(WORKLOADS) == {*BUNDLED, *LANGUAGE_MODELS, *BENCHMARK_ONLY, *ZOO}


def test_digits_upscaled_to_three_channel_images() -> None:
    digits = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    big = upscaled(digits)
    assert big.shape == (5, 3, 64, 64)
    assert torch.equal(big[:, 0], big[:, 2]) and big.min() >= 0 and big.max() <= 1
    # the 2x2 centre of each 8x8 block samples the source pixel at +-1/16 of a pixel: bilinear
    # weights of at least (15/16)^2 on the pixel itself, so within 1 - (15/16)^2 of it
    centres = big[:, :1, 3::8, 3::8] + big[:, :1, 4::8, 4::8] + big[:, :1, 3::8, 4::8]
    centres = (centres + big[:, :1, 4::8, 3::8]) / 4
    assert float((centres - digits).abs().max()) <= 1 - (15 / 16) ** 2


def test_unknown_name_lists_available_names() -> None:
    with pytest.raises(ValueError, match="'name'") as error:
        load_workload("resnet50")
    message = str(error.value)
    assert "'resnet50'" in message
    for name in WORKLOADS:
        assert repr(name) in message


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"n_calib": 0}, "n_calib"),
        ({"n_calib": True}, "n_calib"),
        ({"batch_size": "32"}, "batch_size"),
        ({"n_test": 0}, "n_test"),
        ({"cache_dir": 3}, "cache_dir"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, argument: str, tmp_path: Path) -> None:
    kwargs.setdefault("cache_dir", tmp_path)
    with pytest.raises(ValueError, match=f"'{argument}'"):
        load_workload("digits_cnn", **kwargs)


def test_too_many_calibration_samples_says_how_many_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at most 359"):
        load_workload("digits_cnn", cache_dir=tmp_path, n_calib=10_000)


def test_register_workload_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_workload("mlp")(WORKLOADS["mlp"])


def test_default_cache_dir_follows_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "workloads"
    monkeypatch.delenv("MPSEARCH_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "mpsearch" / "workloads"


def test_split_indices_is_seeded_disjoint_and_complete() -> None:
    first = split_indices(100, (0.6, 0.2, 0.2), seed=3)
    again = split_indices(100, (0.6, 0.2, 0.2), seed=3)
    other = split_indices(100, (0.6, 0.2, 0.2), seed=4)
    assert [len(p) for p in first] == [60, 20, 20]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert sorted(torch.cat(first).tolist()) == list(range(100))
    with pytest.raises(ValueError, match="'fractions'"):
        split_indices(10, (0.5, 0.6), seed=0)


# --- shared behaviour of every workload -------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
def test_model_runs_on_example_input(name: str, all_workloads: dict[str, Workload]) -> None:
    workload = all_workloads[name]
    assert not workload.model.training
    assert all(p.dtype == torch.float32 for p in workload.model.parameters())
    with torch.inference_mode():
        out = workload.model(workload.example_input)
    assert out.shape[0] == workload.example_input.shape[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", BUNDLED)
def test_splits_are_aligned(name: str, all_workloads: dict[str, Workload]) -> None:
    workload = all_workloads[name]
    assert workload.calib and workload.test
    for batches, labels in (
        (workload.test, workload.test_labels),
        (workload.calib, workload.calib_labels),
    ):
        if labels is None:
            continue
        assert len(labels) == len(batches)
        for batch, label in zip(batches, labels, strict=True):
            assert label.shape[0] == batch.shape[0]
    assert workload.evaluate(workload.model) == workload.info["fp32_quality"]


def test_evaluate_restores_mode_and_accepts_modified_copies(mlp: Workload) -> None:
    noisy = copy.deepcopy(mlp.model).train()
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    quality = mlp.evaluate(noisy)
    assert noisy.training
    assert 0.0 <= quality <= 1.0
    assert quality < mlp.evaluate(mlp.model) + 0.05


# --- digits -----------------------------------------------------------------------------------


def test_digits_cnn_is_accurate(digits: Workload) -> None:
    assert digits.task == "classification"
    assert digits.evaluate(digits.model) >= 0.95
    assert digits.example_input.shape == (32, 1, 8, 8)
    assert layer_names(digits.model) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert digits.model.fc1.in_features % 32 == 0
    assert digits.model.fc2.in_features % 32 == 0
    assert sum(b.shape[0] for b in digits.calib) == 256
    assert sum(b.shape[0] for b in digits.test) == 360


def test_mlp_is_accurate(mlp: Workload) -> None:
    assert mlp.evaluate(mlp.model) >= 0.95
    assert layer_names(mlp.model) == ["fc1", "fc2", "fc3"]


def test_second_load_comes_from_cache_bit_identical(
    digits: Workload, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert digits.info["from_cache"] is False

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached model was retrained")

    monkeypatch.setattr(digits_module, "_train", no_training)
    again = load_workload("digits_cnn", seed=0, cache_dir=cache_root)
    assert again.info["from_cache"] is True
    assert again.info["cache_file"] == digits.info["cache_file"]
    assert_same_state(digits.model, again.model)
    assert again.evaluate(again.model) == digits.evaluate(digits.model)


def _corrupt(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "garbage":
        path.write_bytes(b"not a torch file at all")
    else:
        payload = torch.load(path, weights_only=True)
        key = next(iter(payload["state_dict"]))
        if how == "wrong_shape":
            payload["state_dict"][key] = torch.zeros(3)
        elif how == "nan":
            payload["state_dict"][key] = torch.full_like(payload["state_dict"][key], float("nan"))
        elif how == "missing_key":
            del payload["state_dict"][key]
        torch.save(payload, path)


@pytest.mark.parametrize("how", ["truncated", "garbage", "wrong_shape", "nan", "missing_key"])
def test_corrupt_cache_file_is_retrained(mlp: Workload, tmp_path: Path, how: str) -> None:
    cached = Path(mlp.info["cache_file"])
    path = tmp_path / cached.name
    shutil.copy(cached, path)
    _corrupt(path, how)
    with pytest.warns(CacheWarning, match="retraining"):
        retrained = load_workload("mlp", seed=0, cache_dir=tmp_path)
    assert retrained.info["from_cache"] is False
    assert_same_state(retrained.model, mlp.model)  # training is deterministic given the seed
    reloaded = load_workload("mlp", seed=0, cache_dir=tmp_path)  # the bad file was replaced
    assert reloaded.info["from_cache"] is True
    assert not list(tmp_path.glob("*.tmp"))


def test_other_seed_gives_other_split_and_file(mlp: Workload, cache_root: Path) -> None:
    other = load_workload("mlp", seed=1, cache_dir=cache_root)
    assert other.info["cache_file"] != mlp.info["cache_file"]
    assert not torch.equal(other.test[0], mlp.test[0])
    assert other.evaluate(other.model) >= 0.95


# --- resnet18 ---------------------------------------------------------------------------------


def test_resnet18_shape_and_self_agreement(resnet: Workload) -> None:
    names = layer_names(resnet.model)
    assert len(names) >= 20
    assert names[0] == "conv1" and names[-1] == "fc"
    assert "layer2.0.downsample.0" in names
    assert resnet.test_labels is None and resnet.reference is not None
    assert resnet.evaluate(resnet.model) == 1.0
    assert resnet.example_input.shape == (32, 3, 64, 64)
    assert sum(b.shape[0] for b in resnet.test) == 64
    assert len(torch.cat(resnet.reference).unique()) >= 3  # predictions are not all one class


def test_resnet18_agreement_drops_when_weights_change(resnet: Workload) -> None:
    perturbed = copy.deepcopy(resnet.model)
    with torch.no_grad():
        for module in perturbed.modules():
            if isinstance(module, QUANTIZABLE):
                module.weight.mul_(1 + 0.3 * torch.randn_like(module.weight))
    assert resnet.evaluate(perturbed) < 1.0


def test_resnet18_is_deterministic_and_leaves_rng_alone(resnet: Workload, tmp_path: Path) -> None:
    state = torch.get_rng_state()
    again = load_workload("resnet18", seed=0, cache_dir=tmp_path, n_calib=64, n_test=64)
    assert torch.equal(torch.get_rng_state(), state)
    assert_same_state(again.model, resnet.model)
    assert torch.equal(again.test[0], resnet.test[0])


# --- text transformer -------------------------------------------------------------------------


def test_text_transformer_beats_unigram(text: Workload) -> None:
    assert text.task == "language_model"
    assert text.example_input.dtype == torch.long
    assert text.example_input.shape == (32, 64)
    labels = torch.cat([t.flatten() for t in text.test_labels or []])
    unigram = float((labels == labels.mode().values).float().mean())
    accuracy = text.evaluate(text.model)
    assert accuracy >= unigram + 0.2, (accuracy, unigram)


def test_text_labels_are_next_tokens(text: Workload) -> None:
    assert text.test_labels is not None and text.calib_labels is not None
    for batch, labels in zip(text.test, text.test_labels, strict=True):
        assert torch.equal(batch[:, 1:], labels[:, :-1])
    assert sum(b.shape[0] for b in text.calib) == 256


def test_text_transformer_layers_are_plain_linear(text: Workload) -> None:
    names = layer_names(text.model)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in text.model.modules())
    assert names[-1] == "head"
    for part in ("q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2"):
        assert f"blocks.0.attn.{part}" in names or f"blocks.0.{part}" in names
    assert len(names) == 2 * 6 + 1


def test_text_corpus_round_trips() -> None:
    corpus = text_module.corpus(0)
    sample = "def f(x):\n    return x"
    assert corpus.decode(corpus.encode(sample)) == sample
    assert corpus.vocab_size % 32 == 0


def test_top1_accuracy_per_token() -> None:
    logits = torch.zeros(1, 2, 3)
    logits[0, 0, 1] = 1.0
    logits[0, 1, 2] = 1.0
    assert top1_accuracy(nn.Identity(), [logits], [torch.tensor([[1, 0]])]) == 0.5
