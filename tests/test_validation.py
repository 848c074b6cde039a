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


def test_a_torch_compile_wrapper_is_refused_before_any_work() -> None:
    """Bug: quantizing ``torch.compile(model)`` gave a model whose compiled graph still ran
    the original layers (w8a8 output equal to fp32's), and the profile's rows were NaN."""
    compiled = torch.compile(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval())
    _refused_everywhere(compiled, r"torch.compile's wrapper.*model._orig_mod")
    calib = [torch.randn(4, 8)]
    assert mps.quantize(compiled._orig_mod, "w8a8", backend="cpu", calib=calib) is not None


def _refused_everywhere(model: nn.Module, match: str) -> None:
    """quantize, profile and measure_cost each raise ``InvalidTypeError`` matching ``match``."""
    calib = [torch.randn(4, 8)]
    for call in (
        lambda: mps.quantize(model, "w8a8", backend="cpu", calib=calib),
        lambda: mps.profile(model, calib, schemes=["w8a8"], progress=False),
        lambda: mps.measure_cost(model, calib[0], schemes=["w8a8"]),
    ):
        with pytest.raises(InvalidTypeError, match=match):
            call()


@pytest.mark.parametrize(
    "make", [torch.jit.script, lambda m: torch.jit.trace(m, torch.zeros(1, 8))]
)
def test_a_torchscript_module_is_refused_naming_what_to_pass(make) -> None:
    """Was: "has no quantizable layers" (its submodules are compiled code, not Linears), as if
    the model held none."""
    scripted = make(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval())
    _refused_everywhere(scripted, r"not a TorchScript module .* Python module")
