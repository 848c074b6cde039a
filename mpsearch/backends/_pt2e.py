"""The ``cpu-pt2e`` backend: PyTorch's own x86 int8 path. The float model is captured with
``torch.export``, its ``w8a8`` layers annotated by the X86 Inductor quantizer (static per-tensor
uint8 activations calibrated on ``calib``, per-channel int8 weights), converted, and compiled by
Inductor with frozen weights, which fuses each quantize / conv or linear / dequantize chain,
with its ReLU and residual add, into oneDNN int8 kernels, so activations stay int8 between
neighbouring int8 layers (the ``cpu`` backend quantizes and dequantizes around every layer).

Its ``w8a8`` layers are ``Conv2d`` and ``Linear`` layers (what the quantizer annotates) and
``Conv1d`` layers run as height-1 ``Conv2d`` (:class:`Conv1dAs2d`); every other choice of the
plan runs the ``cpu`` backend's kernel for it inside the same exported, compiled model. It
needs calibration batches: ``quantize(model, plan, backend="cpu-pt2e", calib=batches)``.
Where capture, conversion or compilation fails, the plan runs on the ``cpu`` backend instead,
with a warning, and ``mpsearch_compile`` says why.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mpsearch._data import as_batches, call_args
from mpsearch._torch_export import quiet_export
from mpsearch.backends._compiled import (
    _compile_settings,
    _cpp_compiler_missing,
    check_against,
    failed,
)
from mpsearch.backends._kernels import (
    as_2d,
    conv1d_as_2d_dim,
    onednn_int8_conv_runs,
    onednn_u8s8_saturates,
)
from mpsearch.backends._registry import Backend, get_backend
from mpsearch.schemes import Scheme

CHECK_RTOL = 0.05
"""Largest relative L2 difference between the compiled model and its reference graph on the
first calibration batch: fused kernels requantize int8 outputs with their own rounding, which
moved a 20-layer ResNet-18's logits by up to 2 %; a wrong kernel moves them by far more."""

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _annotated(layer: nn.Module, scheme: str) -> bool:
    """Whether ``layer`` in ``scheme`` goes through the pt2e flow (``w8a8`` on a zero-padded
    Conv1d / Conv2d / Linear, a convolution only where oneDNN's int8 kernel computes its
    geometry exactly: :func:`onednn_int8_conv_runs`); other non-fp32 choices run the ``cpu``
    backend's kernel."""
    if not (
        scheme == "w8a8"
        and type(layer) in LAYER_TYPES
        and getattr(layer, "padding_mode", "zeros") == "zeros"
    ):
        return False
    return type(layer) is nn.Linear or onednn_int8_conv_runs(layer)


class Conv1dAs2d(nn.Module):
    """A ``Conv1d`` run as a ``Conv2d`` of height 1 or width 1 (:func:`conv1d_as_2d_dim`:
    where oneDNN's int8 conv computes it exactly; ``[B, C, L]`` in and out), the same
    arithmetic: the X86 quantizer annotates, and oneDNN fuses, 2-D convolutions only.

    >>> conv = nn.Conv1d(2, 3, 5, stride=2, padding=1)
    >>> x = torch.randn(1, 2, 16)
    >>> torch.allclose(Conv1dAs2d(conv)(x), conv(x), atol=1e-6)
    True
    """

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.dim = dim = conv1d_as_2d_dim(conv)
        padding = conv.padding if isinstance(conv.padding, str) else as_2d(conv.padding, 0, dim)
        self.conv = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            as_2d(conv.kernel_size, 1, dim),
            stride=as_2d(conv.stride, 1, dim),
            padding=padding,
            dilation=as_2d(conv.dilation, 1, dim),
            groups=conv.groups,
            bias=conv.bias is not None,
        )
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight.unsqueeze(self.dim))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.unsqueeze(self.dim)).squeeze(self.dim)


def _as_2d(model: nn.Module, names: Iterable[str]) -> None:
    """Swap the ``Conv1d`` layers ``names`` of ``model`` for :class:`Conv1dAs2d` (in place)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Conv1dAs2d(getattr(parent, child)))


def _pt2e_missing() -> str | None:
    """Why torchao's pt2e flow cannot run here (``None``: it can)."""
    try:
        import torchao.quantization.pt2e.quantize_pt2e
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except ImportError as error:
        return f"torchao's pt2e quantization is not importable ({error})"
    return None


def _dynamic_batch(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """``dynamic_shapes`` for ``torch.export`` (by parameter name): every tensor input's first
    dimension, the batch, may vary."""
    auto = torch.export.Dim.AUTO
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    return {
        name: {0: auto} if isinstance(value, torch.Tensor) and value.dim() else None
        for name, value in bound.items()
    }


def _plan_config() -> Any:
    """The X86 Inductor quantizer's default config, with the weight codes the cpu backend's
    int8 kernels use on this CPU (:func:`int8_kernel_scheme`): 7-bit (``[-63, 63]``) where
    oneDNN's u8 x s8 kernels saturate (CPUs without VNNI), which otherwise compute another
    product. On an AMX Xeon capped to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) a random ResNet-18's
    compiled plan differed from its reference graph by 8 % (relative L2) and fell back."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    config = x86.get_default_x86_inductor_quantization_config()
    if not onednn_u8s8_saturates():
        return config
    weight = dataclasses.replace(config.weight, quant_min=-63, quant_max=63)
    return dataclasses.replace(config, weight=weight)


def _plan_quantizer(layers: list[str]) -> Any:
    """An X86 Inductor quantizer annotating the fusion patterns anchored on ``layers`` (a
    convolution or linear with its ReLU, its residual add and the add's ReLU, wherever those
    live in the module tree), then int8 max pooling / concatenation / flattening where every
    input is already int8: activations stay int8 through a residual block of int8 layers.
    The quantizer's own ``set_module_name_qconfig`` would annotate the layer alone (the add
    belongs to the enclosing block), leaving an fp32 add between every two int8 convolutions:
    ResNet-18 on digits ran 5 % slower that way (13.8 vs 13.2 ms, batch 32, 2 threads, AMD
    EPYC Zen 4). The other default patterns of the quantizer's global recipe (``mul``,
    matmuls) are not annotated: they belong to no layer of the plan."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter

    anchors = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}
    in_plan = [get_module_name_filter(name) for name in layers]

    def anchored(nodes: list[torch.fx.Node]) -> bool:
        found = [n for n in nodes if n.target in anchors]
        return len(found) == 1 and any(f(found[0]) for f in in_plan)

    class PlanQuantizer(x86.X86InductorQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            config = _plan_config()
            self._annotate_conv2d_fusion_pattern(model, config, anchored)
            self._annotate_linear_fusion_pattern(model, config, anchored)
            self._annotate_propagation_quantizable_pattern_entry(model, config, lambda _: True)
            self._annotate_output_for_int8_in_int8_out_pattern_entry(model)
            return model

    return PlanQuantizer()


def _pt2e_layers(model: nn.Module, assignment: Mapping[str, str]) -> list[str]:
    """The layers of ``assignment`` that go through the pt2e flow (:func:`_annotated`), as
    they are in ``model`` (whose other quantized layers are ``cpu`` kernels already)."""
    modules = dict(model.named_modules())
    return [n for n, s in assignment.items() if _annotated(modules[n], s)]


def _convert(
    model: nn.Module, assignment: Mapping[str, str], batches: list[Any]
) -> torch.fx.GraphModule:
    """``model`` exported, its ``w8a8`` layers annotated, calibrated on ``batches``, converted
    (``Conv1d`` layers in ``w8a8`` run as :class:`Conv1dAs2d`, in a copy: the fallback takes
    ``model`` as it is)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    annotated = _pt2e_layers(model, assignment)
    model = copy.deepcopy(model)
    layers = dict(model.named_modules())
    _as_2d(model, [n for n in annotated if type(layers[n]) is nn.Conv1d])

    args, kwargs = call_args(batches[0])
    exported = quiet_export(
        model, args, kwargs, dynamic_shapes=_dynamic_batch(model, args, kwargs)
    ).module()
    with warnings.catch_warnings():  # a pooling after an fp32 output stays fp32, as planned
        warnings.filterwarnings("ignore", "The input of maxpool2d is not quantized")
        prepared = prepare_pt2e(exported, _plan_quantizer(annotated))
    with torch.no_grad():
        for batch in batches:
            a, k = call_args(batch)
            prepared(*a, **k)
    return convert_pt2e(prepared)


class Pt2eModel(nn.Module):
    """A plan converted by the pt2e flow and compiled by Inductor (frozen weights).

    ``converted`` is the exported, quantized graph (calls to it run the reference int8
    arithmetic in float); calls compile it on their first input shape. ``mpsearch_compile``
    says how the model runs.
    """

    def __init__(self, converted: torch.fx.GraphModule) -> None:
        super().__init__()
        self.converted = converted
        self._compiled = torch.compile(converted, backend="inductor", dynamic=False)
        self.mpsearch_compile = {"mode": "inductor", "reason": "pt2e X86 Inductor quantizer"}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), _compile_settings():  # frozen weights: the int8 lowerings
            return self._compiled(*args, **kwargs)

    def train(self, mode: bool = True) -> Pt2eModel:
        """Only the flag: an exported graph has no train mode (inference only)."""
        self.training = mode
        return self


class CpuPt2eBackend(Backend):
    """``w8a8`` on Conv1d / Conv2d / Linear through PyTorch's pt2e X86 Inductor flow
    (:class:`Pt2eModel`), every other scheme on the ``cpu`` backend's kernel for it, the whole
    model compiled by Inductor; needs ``calib`` batches (static activation ranges)."""

    name = "cpu-pt2e"
    real = True
    needs_calib = True

    def unavailable_reason(self) -> str | None:
        return _pt2e_missing() or _cpp_compiler_missing()

    def unsupported_reason(self, layer: nn.Module, scheme: Scheme) -> str | None:
        if scheme.name == "fp32" or _annotated(layer, scheme.name):
            return None
        return get_backend("cpu").unsupported_reason(layer, scheme)

    def quantize_layer(
        self, layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> nn.Module:
        if scheme.name == "fp32" or _annotated(layer, scheme.name):
            return layer  # converted with the whole model in finalize
        return get_backend("cpu").quantize_layer(layer, scheme)  # its kernel, compiled whole

    def finalize(
        self,
        model: nn.Module,
        assignment: Mapping[str, str],
        *,
        calib: Iterable[Any] | None = None,
    ) -> nn.Module:
        batches = as_batches(calib, argument="calib")
        try:
            converted = _convert(model, assignment, batches)
            result = Pt2eModel(converted)
            args, kwargs = call_args(batches[0])
            with torch.no_grad():
                reference = converted(*args, **kwargs)
                got = result(*args, **kwargs)
                reason = check_against(converted, got, reference, args, kwargs, rtol=CHECK_RTOL)
        except Exception as error:
            reason = failed("pt2e", error)
        if reason is None:
            return result
        from mpsearch.backends._quantize import quantize

        warnings.warn(
            f"cpu-pt2e: running the plan on the cpu backend: {reason}", RuntimeWarning, stacklevel=3
        )
        own = _pt2e_layers(model, assignment)  # the other layers run cpu kernels already
        fallback = (
            quantize(model, dict.fromkeys(own, "w8a8"), backend="cpu", calib=batches)
            if own
            else model  # nothing was left to the pt2e flow (before: "no quantizable layers")
        )
        fallback.mpsearch_compile = {"mode": "cpu", "reason": reason}
        return fallback


__all__ = ["CHECK_RTOL", "Conv1dAs2d", "CpuPt2eBackend", "Pt2eModel"]
