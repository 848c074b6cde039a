"""The quantized-model files: a state dict for mpsearch's backend modules, and a ``torch.export``
program that loads with ``torch.export.load`` alone.

- **state dict** (``model.qstate.pt``): ``torch.save`` of a plain dict (tensors, strings, numbers:
  it loads with ``torch.load(..., weights_only=True)`` anywhere) holding the plan's JSON, the
  backend name, the static activation ranges and the quantized model's ``state_dict()`` (int8
  codes, int4 packed weights, scales, zero points, bf16 weights, the untouched layers).
  *Running* it needs the same architecture and mpsearch's backend modules:
  :func:`load_quantized` rebuilds them and loads the tensors (strict).
- **program** (``model.pt2``): ``torch.export.save`` of the quantized model. It runs the real
  CPU kernels that ``torch.export`` can capture (bf16/fp16 casts, ``aten._weight_int8pack_mm``,
  ``aten._weight_int4pack_mm_for_cpu``); ``w8a8`` layers hold opaque oneDNN packed weights and
  compute their activation scale with a host sync (``float(scale)``), which ``torch.export``
  cannot capture, so in the program they run as int8 codes dequantized by plain aten ops
  with fake-quantized activations: the ``simulate`` arithmetic exactly, int8 weights on disk. It loads and runs with ``torch.export.load(path).module()`` in a process that
  has never imported mpsearch.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpsearch._torch_export import quiet_export
from mpsearch._validation import check_module, exception_line
from mpsearch.backends import get_backend, quantize
from mpsearch.backends._kernels import RealLayer
from mpsearch.backends._quantize import range_of
from mpsearch.backends._recurrent import SimulatedRNN
from mpsearch.export._inputs import ModelCall
from mpsearch.export._qdq import QDQLayer
from mpsearch.layers import quantizable_layers, replace_layers
from mpsearch.layers._expert_linears import ExpertLinears
from mpsearch.layers._layers import enclosing_layer
from mpsearch.plan import PrecisionPlan
from mpsearch.schemes import get_scheme

STATE_FORMAT = "mpsearch.quantized-state"
STATE_VERSION = 1

Ranges = Mapping[str, tuple[float, float]]


def build_quantized(
    model: nn.Module, plan: PrecisionPlan, *, backend: str, ranges: Ranges
) -> nn.Module:
    """``quantize(model, plan, backend)`` with the given static activation ranges."""
    return quantize(model, plan, backend=backend, act_ranges=ranges).eval()


def state_payload(
    qm: nn.Module, plan: PrecisionPlan, *, backend: str, ranges: Ranges
) -> dict[str, Any]:
    """What ``model.qstate.pt`` holds (only types ``torch.load(weights_only=True)`` accepts)."""
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "backend": backend,
        "plan_json": plan.to_json(),
        "act_ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in ranges.items()},
        "state_dict": _detached(qm.state_dict()),
    }


def _detached(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """A copy of ``state`` keeping its ``_metadata``: each module's state-dict version, which
    a module's ``_load_from_state_dict`` may require (torchvision's MNASNet refuses ``None``)."""
    copied = OrderedDict((k, v.detach().clone()) for k, v in state.items())
    copied._metadata = getattr(state, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return copied


def load_quantized(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``model.qstate.pt`` written by ``export_plan`` into ``model``'s architecture.

    ``model`` is an instance of the exported model's class (its own weights do not matter:
    every tensor comes from the file). Returns the quantized model on the saved backend.

    >>> qm = load_quantized(DigitsMLP(), "out/model.qstate.pt")  # doctest: +SKIP
    """
    check_module(model)
    try:
        payload = torch.load(str(path), weights_only=True, map_location="cpu")
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"Cannot read quantized state {str(path)!r}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise ValueError(f"{str(path)!r} is not an mpsearch quantized state ({STATE_FORMAT!r}).")
    if payload.get("version") != STATE_VERSION:
        raise ValueError(
            f"Unsupported quantized-state version {payload.get('version')!r}: this mpsearch "
            f"reads version {STATE_VERSION}."
        )
    plan = PrecisionPlan.from_json(payload["plan_json"])
    ranges = {k: (v[0], v[1]) for k, v in payload["act_ranges"].items()}
    # the file holds the (rounded) tensors: the structure is the plan's schemes and kernels
    kernels = {"kernels": plan.metadata["kernels"]} if "kernels" in plan.metadata else None
    schemes = PrecisionPlan.from_assignment(plan.resolve(model), metadata=kernels)
    qm = build_quantized(model, schemes, backend=payload["backend"], ranges=ranges)
    qm.load_state_dict(payload["state_dict"], strict=True)
    return qm


def program_model(
    qm: nn.Module, model: nn.Module, plan: PrecisionPlan, *, ranges: Ranges
) -> tuple[nn.Module, list[str]]:
    """The module ``torch.export`` captures: ``qm`` with every layer holding opaque packed
    kernel weights (oneDNN ``w8a8``) swapped for a decomposed :class:`QDQLayer` (the
    ``simulate`` arithmetic, int8 codes), or for an LSTM / GRU (fbgemm's packed cells) its
    ``simulate`` module, which runs its loop of plain operations under ``torch.export``.
    Returns it and the names swapped."""
    originals = quantizable_layers(model)
    opaque = list(
        dict.fromkeys(  # a kernel holding a packed module (an im2col conv's Linear): the layer
            name if name in originals else enclosing_layer(name, originals)
            for name, m in qm.named_modules()
            if isinstance(m, RealLayer) and m.packed_tensors()
        )
    )
    if not opaque:
        return qm, []
    assignment = plan.resolve(model)
    sim = get_backend("simulate")
    target = _shallow_copy(qm)
    with torch.no_grad():
        simulated = {
            name: sim.quantize_layer(
                originals[name],
                get_scheme(assignment[name]),
                act_range=range_of(ranges, name, originals[name]),  # a bank: its experts'
            )
            for name in opaque
        }
        swaps = {name: _exportable(m) for name, m in simulated.items()}
    replace_layers(target, swaps)
    return target.eval(), opaque


def _exportable(sim: nn.Module) -> nn.Module:
    """A ``simulate`` layer in the form ``torch.export`` captures: a decomposed
    :class:`QDQLayer`; an LSTM / GRU as it is (a loop of plain operations); an expert bank with
    each expert Linear so swapped."""
    if isinstance(sim, SimulatedRNN):
        return sim
    if isinstance(sim, ExpertLinears):
        for linears in (sim.up, sim.down):
            for i, linear in enumerate(linears):
                linears[i] = QDQLayer(linear, decomposed=True)
        return sim
    return QDQLayer(sim, decomposed=True)


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s module tree sharing its tensors (for swapping a few layers)."""
    import copy

    memo: dict[int, Any] = {}
    for t in [*module.parameters(), *module.buffers()]:
        memo[id(t)] = t
    for m in module.modules():
        if isinstance(m, RealLayer):
            memo[id(m)] = m
    return copy.deepcopy(module, memo)


def export_program(model: nn.Module, example: ModelCall) -> torch.export.ExportedProgram:
    """``torch.export.export`` with a dynamic batch dimension on every tensor input; where the
    model pins its batch size, a static-shape program with a warning saying so."""
    dynamic = example.dynamic_shapes(torch.export.Dim("batch", min=1))
    args, kwargs = example
    try:
        return quiet_export(model, args, kwargs, dynamic_shapes=dynamic)
    except Exception as exc:
        warnings.warn(
            "torch.export could not keep the batch dimension dynamic "
            f"({exception_line(exc)}); the "
            "program is exported for the example input's batch size only.",
            stacklevel=2,
        )
        return quiet_export(model, args, kwargs)


def plan_json_check(path: Path, plan: PrecisionPlan) -> bool:
    """Whether the JSON file at ``path`` reads back as ``plan``."""
    return PrecisionPlan.from_dict(json.loads(path.read_text())) == plan
