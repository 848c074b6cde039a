"""The digit-scenes tagging workload: a multi-label classifier on real data (its full
training, about 15 s, is run by ``studies/digits_tags.yaml``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpsearch._data import is_multi_label
from mpsearch.profile import auto_metric
from mpsearch.workloads import _digits_tags as digits_tags
from mpsearch.workloads import load_workload
from mpsearch.workloads._base import subset_accuracy
from mpsearch.workloads._digits import TrainConfig
from mpsearch.workloads._digits_seg import BACKGROUND, digit_scenes


def test_a_scene_is_tagged_with_the_digits_whose_ink_it_shows() -> None:
    """Each digit k a block of intensity 0.5: every scene's tags are exactly the classes of
    its three digits (fewer when a class is drawn twice)."""
    images = torch.full((10, 1, 8, 8), 0.5)
    _, y = digit_scenes(images, torch.arange(10), 30, seed=0)
    tags = digits_tags.scene_tags(y)
    assert tags.shape == (30, 10) and 2 in tags.sum(1).tolist() and 3 in tags.sum(1).tolist()
    for scene, tag in zip(y, tags, strict=True):
        held = sorted(set(scene.unique().tolist()) - {BACKGROUND})
        assert tag.nonzero()[:, 0].tolist() == held


def test_subset_accuracy_counts_a_scene_right_only_with_its_whole_label_set() -> None:
    logits = [torch.tensor([[2.0, -1.0, 3.0], [1.0, 1.0, -1.0]]), torch.tensor([[-1.0, -2.0, 0.5]])]
    tags = [torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])]
    assert subset_accuracy(nn.Identity(), logits, tags) == pytest.approx(2 / 3, abs=1e-15)


def test_the_workload_is_a_multi_label_classifier_trained_on_the_scenes(
    monkeypatch, tmp_path
) -> None:
    """Trained briefly (600 scenes, 1 epoch): the model declares itself multi-label as a Hugging
    Face config does, its logits are compared by ``bernoulli_kl``, and its quality is the
    subset accuracy of its test split."""
    monkeypatch.setattr(digits_tags, "TAG_SCENES", {"train": 600, "calib": 64, "test": 64})
    monkeypatch.setattr(digits_tags, "TAGS_CONFIG", TrainConfig(epochs=1, lr=3e-3))
    wl = load_workload("digits_tags", cache_dir=tmp_path, n_calib=64, batch_size=32)
    assert wl.task == "multilabel" and is_multi_label(wl.model)
    assert len(wl.calib) == 2 and wl.test_labels[0].shape == (32, 10)
    out = wl.model(wl.example_input)
    assert out.shape == (32, 10) and auto_metric(out, None, multi_label=True) == "bernoulli_kl"
    assert wl.info["fp32_quality"] == subset_accuracy(wl.model, wl.test, wl.test_labels)
    assert wl.info["n_train"] == 600
