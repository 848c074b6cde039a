"""Writing the ``simulate`` plan as ONNX with Q/DQ operators, and checking it in ONNX Runtime.

onnx, onnxscript and onnxruntime are imported inside the functions, never at import time.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpsearch._data import is_multi_label, main_output
from mpsearch.export._inputs import ModelCall, check_same_shape
from mpsearch.export._qdq import _onnx_translations, needs_opset, to_qdq
from mpsearch.profile._metrics import answers_agree, auto_metric
from mpsearch.schemes import Scheme

QDQ_OPS: tuple[str, ...] = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def onnx_static_refusal(scheme: Scheme) -> str | None:
    """Why ``scheme`` with *static* (calibrated) activation ranges is refused for ONNX.

    ONNX Runtime 1.32's extended graph optimizations miscompute a float8 QuantizeLinear with
    a constant scale feeding a convolution (max abs diff 25.5 on the digits CNN, uniform fp8
    with calibration; exact at the basic level), so static fp8 activations are refused and
    dynamic fp8 (no ``calib``) is accepted.
    """
    act = scheme.activation
    if act is not None and act.format.startswith("fp8") and act.granularity == "tensor":
        return (
            "static fp8 activations: ONNX Runtime's QDQ graph optimizations compute them wrongly; "
            "export without calib (dynamic fp8 activations) or use an int8 scheme"
        )
    return None


def write_onnx(
    sim_model: nn.Module, example: ModelCall, path: Path, *, schemes: Sequence[Scheme]
) -> dict[str, Any]:
    """Export ``sim_model`` (a ``simulate``-backend model) to ``path`` with Q/DQ nodes.

    The batch dimension of every input tensor is dynamic. Returns the opset and the node
    counts of the written graph.
    """
    import onnx  # noqa: F401  (fail here, with its own message, when it is missing)

    model = to_qdq(copy.deepcopy(sim_model)).eval()
    dynamic = example.dynamic_shapes(torch.export.Dim("batch", min=1))
    opset = needs_opset(list(schemes))
    program = torch.onnx.export(
        model,
        example.args,
        kwargs=example.kwargs,
        dynamo=True,
        opset_version=opset,
        custom_translation_table=_onnx_translations(),
        dynamic_shapes=dynamic,
        verbose=False,
    )
    program.save(path, external_data=False)
    folded = fold_low_bit_casts(path)
    return {"opset": opset, "node_counts": count_nodes(path), "folded_casts": folded}


def fold_low_bit_casts(path: Path) -> int:
    """Replace each ``Cast`` of an initializer to INT4/UINT4/INT2/UINT2 by an initializer of
    that type (packed), in place; returns how many. The exporter folds most of them itself;
    ONNX Runtime's CPU provider has no such ``Cast`` and fails to constant-fold the 2-bit ones."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, numpy_helper

    low_bit = {
        TensorProto.INT4: ml_dtypes.int4,
        TensorProto.UINT4: ml_dtypes.uint4,
        TensorProto.INT2: ml_dtypes.int2,
        TensorProto.UINT2: ml_dtypes.uint2,
    }
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    folded = 0
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to in low_bit and node.input[0] in inits:
            values = numpy_helper.to_array(inits[node.input[0]])
            graph.initializer.append(
                numpy_helper.from_array(values.astype(low_bit[to]), node.output[0])
            )
            folded += 1
        else:
            keep.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        unused = [t for t in graph.initializer if t.name not in used]
        for t in unused:
            graph.initializer.remove(t)
        onnx.save(model, str(path))
    return folded


def check_onnx(
    path: Path, reference: nn.Module, inputs: Sequence[ModelCall], *, optimization: str = "all"
) -> dict[str, Any]:
    """Run the ONNX file in ONNX Runtime (CPUExecutionProvider) on ``inputs`` and compare with
    ``reference`` (the PyTorch ``simulate`` model): max abs diff and top-1 agreement (the
    answers :func:`~mpsearch.profile._metrics.answers_agree` compares: a multi-label
    classifier's label sets) over every input."""
    import onnxruntime as ort

    multi_label = is_multi_label(reference)

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    max_diff = 0.0
    agree = 0
    total = 0
    for i, call in enumerate(inputs):
        tensors = call.tensors()
        feed = {n: a.detach().cpu().numpy() for n, a in zip(names, tensors, strict=True)}
        out = torch.from_numpy(session.run(None, feed)[0])
        with torch.inference_mode():
            ref, name = main_output(call(reference))
        ref = ref.float()
        check_same_shape(i, out, ref)
        max_diff = max(max_diff, float((out.float() - ref).abs().max()))
        agreeing = answers_agree(out.float(), ref, auto_metric(ref, name, multi_label=multi_label))
        agree += int(agreeing.sum())
        total += agreeing.numel()
    return {"max_abs_diff": max_diff, "top1_agreement": agree / max(total, 1), "n_outputs": total}


def count_nodes(path: Path) -> dict[str, int]:
    """``{op_type: count}`` of the ONNX graph in ``path``."""
    import onnx

    model = onnx.load(str(path))
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))
