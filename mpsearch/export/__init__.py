"""Exporting a chosen plan: its JSON, the quantized model (state dict, ``torch.export``
program) and the ``simulate`` plan as ONNX with QuantizeLinear/DequantizeLinear nodes.

onnx, onnxscript and onnxruntime are imported only when an ONNX file is written or checked.

>>> from mpsearch.export import EXPORT_FORMATS
>>> sorted(EXPORT_FORMATS)
['onnx', 'plan', 'program', 'state_dict']
"""

from mpsearch.export._artifacts import load_quantized
from mpsearch.export._export import (
    EXPORT_FORMATS,
    ExportError,
    ExportFormat,
    ExportRecord,
    ExportResult,
    export_plan,
)
from mpsearch.export._qdq import ONNX_ACCEPTED, QDQLayer, onnx_refusal, to_qdq

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_ACCEPTED",
    "ExportError",
    "ExportFormat",
    "ExportRecord",
    "ExportResult",
    "QDQLayer",
    "export_plan",
    "load_quantized",
    "onnx_refusal",
    "to_qdq",
]
