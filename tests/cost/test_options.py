"""``CostOptions``: validation, the dict round trip, and the verb's keyword overrides."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

import mpsearch as mps
from mpsearch.cost import CostOptions, measure_cost


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_options_are_validated_with_the_one_message_template() -> None:
    with pytest.raises(ValueError) as info:
        CostOptions(repeats=-3)
    assert str(info.value) == "The 'repeats' option must be a positive integer. Got -3 instead."
    for bad in ({"warmup": -1}, {"num_threads": 0}, {"timer": "cpu"}, {"layers": []}):
        with pytest.raises(ValueError, match=f"'{next(iter(bad))}' option"):
            CostOptions(**bad)


def test_options_round_trip_through_yaml() -> None:
    opts = CostOptions(layers=["0"], repeats=5, warmup=1, num_threads=1, timer="process")
    assert CostOptions.from_dict(yaml.safe_load(yaml.safe_dump(opts.to_dict()))) == opts


def test_options_object_equals_keywords() -> None:
    x = torch.randn(4, 16)
    opts = CostOptions(repeats=2, warmup=0, num_threads=1, timer="process")
    by_object = measure_cost(_net(), x, schemes=["bf16"], backend="simulate", options=opts)
    by_keyword = measure_cost(
        _net(), x, schemes=["bf16"], backend="simulate", repeats=2, warmup=0, num_threads=1,
        timer="process",
    )  # fmt: skip
    assert by_object.settings == by_keyword.settings == opts.settings()
    assert by_object.table[["layer", "scheme", "memory_bytes"]].equals(
        by_keyword.table[["layer", "scheme", "memory_bytes"]]
    )
    assert mps.CostOptions is CostOptions


def test_unknown_keyword_is_a_type_error_listing_the_accepted_ones() -> None:
    with pytest.raises(TypeError, match=r"\['repeat'\].*'backend'.*'repeats'"):
        measure_cost(_net(), torch.randn(4, 16), schemes=["bf16"], repeat=3)
