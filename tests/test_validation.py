"""Validated wrong-type input raises InvalidTypeError (the CLI's exit-2 'bad input'), naming
the argument and the type it got; any other TypeError stays a bug."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import mpsearch as mps
from mpsearch._validation import InvalidTypeError, check_module, wrong_type
from mpsearch.backends._cpu import register_cpu_kernel
from mpsearch.layers._layers import register_quantizable_type

CALLS: dict[str, tuple[Callable[[], Any], str]] = {
    "register_scheme": (lambda: mps.register_scheme("w4"), "'scheme'"),
    "export_plan": (
        lambda: mps.export_plan("model", "w8a8", "out", example_input=torch.zeros(1)),
        "'model'",
    ),
    "quantize": (lambda: mps.quantize([1], "w8a8"), "'model'"),
    "quantizable_layers": (lambda: mps.quantizable_layers(None), "'model'"),
    "fold_batchnorm": (lambda: mps.fold_batchnorm(3), "'model'"),
    "register_quantizable_type": (lambda: register_quantizable_type(int), "'module_type'"),
    "register_cpu_kernel": (lambda: register_cpu_kernel(nn.Linear, "w8a8", "k"), "'kernel'"),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_wrong_type_is_invalid_type_error(name: str) -> None:
    call, argument = CALLS[name]
    with pytest.raises(InvalidTypeError, match=argument):
        call()


def test_wrong_type_wording() -> None:
    assert str(wrong_type("model", [1], "a torch.nn.Module")) == (
        "The 'model' argument must be a torch.nn.Module. Got list instead."
    )
    check_module(nn.Linear(2, 2))
    with pytest.raises(InvalidTypeError, match="'net' argument .* Got str"):
        check_module("x", "net")
