from __future__ import annotations

import pytest
import torch
from torch import nn

from mpsearch.backends import quantize
from mpsearch.layers import quantizable_layers, swapped
from mpsearch.plan import PrecisionPlan


def test_finds_linear_and_conv_layers_by_name(tiny_cnn) -> None:
    assert list(quantizable_layers(tiny_cnn)) == ["conv1", "conv2", "fc1", "fc2"]
    nested = nn.Sequential(nn.Sequential(nn.Conv1d(2, 4, 3)), nn.Flatten(), nn.Linear(8, 2))
    assert list(quantizable_layers(nested)) == ["0.0", "2"]


def test_model_without_quantizable_layers_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"no quantizable layers: mpsearch quantizes Linear, Conv1d"
    ):
        quantizable_layers(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(TypeError, match="'model' argument must be a torch.nn.Module"):
        quantizable_layers("resnet")


def test_apply_then_restore_is_bit_identical(tiny_cnn, tiny_input) -> None:
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    ref = tiny_cnn(tiny_input)
    layers = quantizable_layers(tiny_cnn)
    sim = quantize(tiny_cnn, PrecisionPlan({"re:fc.*": "w4a8"}, default="w8a8"), inplace=False)
    replacements = {n: sim.get_submodule(n) for n in layers}
    with swapped(tiny_cnn, replacements):
        changed = tiny_cnn(tiny_input)
        assert not torch.equal(changed, ref)
    after = tiny_cnn.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)), k
    assert torch.equal(tiny_cnn(tiny_input), ref)


def test_swap_restores_even_when_forward_raises(tiny_cnn) -> None:
    original = tiny_cnn.fc1
    with pytest.raises(RuntimeError), swapped(tiny_cnn, {"fc1": nn.Linear(3, 3)}):
        tiny_cnn(torch.randn(2, 1, 8, 8))
    assert tiny_cnn.fc1 is original
