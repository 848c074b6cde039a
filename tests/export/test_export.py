"""export_plan: plan JSON, quantized state dict, torch.export program and ONNX Q/DQ, each
round-tripped (ONNX in ONNX Runtime, the program in a process that never imports mpsearch)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import mpsearch as mps
from mpsearch._io import atomic_path
from mpsearch.backends._simulate import SimulatedLayer
from mpsearch.export import (
    EXPORT_FORMATS,
    ExportError,
    QDQLayer,
    export_plan,
    load_quantized,
    onnx_refusal,
)
from mpsearch.export._artifacts import program_model
from mpsearch.schemes import get_scheme
from mpsearch.workloads import DigitsMLP, Workload, load_workload

MLP_PLAN = mps.PrecisionPlan({"fc1": "w8a8", "fc2": "w4a16"}, default="w8a16")
CNN_PLAN = mps.PrecisionPlan(
    {"conv1": "bf16", "conv2": "w8a8", "conv3": "w8a8", "fc1": "w4a16"}, default="w8a8"
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mlp() -> Workload:
    return load_workload("mlp", seed=0)


@pytest.fixture(scope="module")
def cnn() -> Workload:
    return load_workload("digits_cnn", seed=0)


@pytest.fixture(scope="module")
def mlp_export(mlp: Workload, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("mlp-export")
    return export_plan(
        mlp.model, MLP_PLAN, out, example_input=mlp.example_input, check_inputs=mlp.test
    )


def _run_clean(code: str, tmp: Path) -> str:
    """Run ``code`` in a fresh interpreter that must never import mpsearch."""
    script = tmp / "clean.py"
    script.write_text(
        textwrap.dedent(code)
        + "\nimport sys\nbad = sorted(m for m in sys.modules if m.split('.')[0] == 'mpsearch')\n"
        + "assert not bad, bad\nprint('CLEAN')\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _ort_outputs(path: Path, batches: list[torch.Tensor]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: b.numpy()})[0] for b in batches]


# ---------------------------------------------------------------- all formats, digits MLP


def test_every_format_is_written_with_its_check(mlp_export) -> None:
    frame = mlp_export.to_frame()
    assert frame["format"].tolist() == ["plan", "state_dict", "program", "onnx"]
    assert list(frame.columns[:5]) == ["format", "path", "bytes", "check", "top1_agreement"]
    for fmt, path in mlp_export.paths.items():
        assert path.is_file() and path.name == EXPORT_FORMATS[fmt].filename
        assert path.stat().st_size == mlp_export.record(fmt).bytes > 0
    assert not [p for p in mlp_export.out_dir.iterdir() if p.name.startswith(".")]
    assert frame.set_index("format").loc[["plan", "state_dict", "program"], "check"].eq(0).all()


def test_plan_json_reads_back(mlp_export) -> None:
    assert mps.PrecisionPlan.load(mlp_export.paths["plan"]) == MLP_PLAN


def test_state_dict_loads_without_mpsearch_and_runs_with_its_modules(
    mlp: Workload, mlp_export, tmp_path: Path
) -> None:
    path = mlp_export.paths["state_dict"]
    out = _run_clean(
        f"""
        import torch
        p = torch.load({str(path)!r}, weights_only=True)
        sd = p["state_dict"]
        print(p["format"], p["backend"], sd["fc1.weight_int8"].dtype, sd["fc3.weight_int8"].dtype,
              sd["fc2.weight_int4"].dtype, tuple(sd["fc2.weight_int4"].shape))
        """,
        tmp_path,
    )
    assert "mpsearch.quantized-state cpu torch.int8 torch.int8 torch.uint8" in out
    torch.manual_seed(123)
    loaded = load_quantized(
        DigitsMLP(), path
    )  # random weights: every tensor must come from the file
    reference = mps.quantize(mlp.model, MLP_PLAN, backend="cpu")
    with torch.inference_mode():
        for batch in mlp.test[:3]:
            assert torch.equal(loaded(batch), reference(batch))


def test_program_runs_in_a_process_without_mpsearch(
    mlp: Workload, mlp_export, tmp_path: Path
) -> None:
    x = torch.cat(mlp.test)[:7]  # another batch size: the batch dimension is dynamic
    torch.save(x, tmp_path / "x.pt")
    _run_clean(
        f"""
        import torch
        program = torch.export.load({str(mlp_export.paths["program"])!r})
        x = torch.load({str(tmp_path / "x.pt")!r})
        torch.save(program.module()(x), {str(tmp_path / "y.pt")!r})
        """,
        tmp_path,
    )
    got = torch.load(tmp_path / "y.pt")
    qm = mps.quantize(mlp.model, MLP_PLAN, backend="cpu")
    target, swapped = program_model(qm, mlp.model, MLP_PLAN, ranges={})
    assert swapped == ["fc1"] == mlp_export.record("program").details["simulated_layers"]
    state = torch.export.load(mlp_export.paths["program"]).state_dict
    assert state["fc1.codes"].dtype == torch.int8  # w8a8 weights stay int8 in the program
    with torch.inference_mode():
        assert torch.equal(got, target(x))


def test_program_of_a_plan_without_w8a8_is_the_real_cpu_model(
    mlp: Workload, tmp_path: Path
) -> None:
    plan = mps.PrecisionPlan({"fc1": "bf16", "fc2": "w4a16"}, default="w8a16")
    res = export_plan(mlp.model, plan, tmp_path, example_input=mlp.example_input, formats="program")
    assert res.record("program").details["simulated_layers"] == []
    program = torch.export.load(res.paths["program"]).module()
    targets = {n.target for n in torch.export.load(res.paths["program"]).graph.nodes}
    assert torch.ops.aten._weight_int4pack_mm_for_cpu.default in targets
    assert torch.ops.aten._weight_int8pack_mm.default in targets
    qm = mps.quantize(mlp.model, plan, backend="cpu")
    with torch.inference_mode():
        assert torch.equal(program(mlp.test[0]), qm(mlp.test[0]))


def test_program_of_a_conv_whose_kernel_holds_a_packed_linear(tmp_path: Path) -> None:
    """A w8a8 convolution on the im2col kernel holds a oneDNN Linear (``conv.linear``): the
    program swapped that inner module by name, which is not a layer of the plan (KeyError on
    MobileViT); the whole convolution is swapped now."""
    from mpsearch.backends._kernels import choice_key

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 4))
    plan = mps.PrecisionPlan({}, default="w8a8")
    key = choice_key(model[0], get_scheme("w8a8"))
    plan.metadata["kernels"] = {"backend": "cpu", "choices": {key: "im2col"}}
    qm = mps.quantize(model, plan, backend="cpu")
    assert any(n.startswith("0.") and n.endswith("linear") for n, _ in qm.named_modules())
    x = torch.randn(2, 8, 4, 4)
    res = export_plan(model, plan, tmp_path, example_input=x, formats="program")
    assert res.record("program").details["simulated_layers"] == ["0", "3"]
    program = torch.export.load(res.paths["program"]).module()
    with torch.inference_mode():
        torch.testing.assert_close(program(x), qm(x), rtol=0.05, atol=0.05)


def test_program_of_a_w8a8_expert_bank_keeps_each_experts_static_range(tmp_path: Path) -> None:
    """The program's simulated bank takes the ranges the real one was calibrated with, one per
    expert Linear (it took none: ranges measured per call, 0.2 off the real GPT-OSS logits)."""
    pytest.importorskip("transformers")
    wl = load_workload("hf_mixtral", n_calib=16, n_test=16)
    res = export_plan(
        wl.model,
        "w8a8",
        tmp_path,
        example_input=wl.example_input,
        formats="program",
        calib=wl.calib,
        check_inputs=wl.test,
    )
    record = res.record("program")
    assert "model.layers.0.mlp.experts" in record.details["simulated_layers"]
    assert record.check < 1e-4  # the program runs what it captured
    assert record.details["diff_vs_real"] < 0.03  # int8 kernels vs simulate arithmetic (0.012)
    assert record.details["agree_vs_real"] == 1.0


def test_onnx_matches_pytorch_simulate_in_onnx_runtime(mlp: Workload, mlp_export) -> None:
    path = mlp_export.paths["onnx"]
    sim = mps.quantize(mlp.model, MLP_PLAN, backend="simulate")
    with torch.inference_mode():
        want = [sim(b).numpy() for b in mlp.test]
    got = _ort_outputs(path, mlp.test)
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    agree = np.mean(
        np.concatenate([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want, strict=True)])
    )
    assert diff <= 1e-3 and agree >= 0.99
    record = mlp_export.record("onnx")
    assert record.check == pytest.approx(diff, abs=1e-6)
    assert record.top1_agreement == pytest.approx(agree)


def test_onnx_graph_holds_qdq_nodes_and_compressed_weights(mlp_export) -> None:
    model = onnx.load(str(mlp_export.paths["onnx"]))
    ops = [n.op_type for n in model.graph.node]
    # fc1 w8a8: DynamicQuantizeLinear + 2 DequantizeLinear; fc2 w4a16, fc3 w8a16: 1 each
    assert ops.count("DynamicQuantizeLinear") == 1
    assert ops.count("DequantizeLinear") == 4
    types = {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    assert {"INT8", "UINT4"} <= types
    blocked = [
        n for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and any(a.name == "block_size" and a.i == 32 for a in n.attribute)
    ]  # fmt: skip
    assert len(blocked) == 1
    assert mlp_export.record("onnx").details["qdq_nodes"]["DequantizeLinear"] == 4


# ---------------------------------------------------------------- digits CNN, static ranges


def test_cnn_static_plan_onnx_and_program(cnn: Workload, tmp_path: Path) -> None:
    res = export_plan(
        cnn.model,
        CNN_PLAN,
        tmp_path,
        example_input=cnn.example_input,
        formats=("onnx", "program"),
        calib=cnn.calib,
        check_inputs=cnn.test,
    )
    onnx_rec = res.record("onnx")
    assert onnx_rec.details["qdq_nodes"] == {
        "QuantizeLinear": 3,  # conv2, conv3, fc2: static uint8 activations
        "DequantizeLinear": 7,  # 4 weights (conv1 is bf16: Cast) + 3 activations
        "DynamicQuantizeLinear": 0,
    }
    assert onnx_rec.check <= 0.05 and onnx_rec.top1_agreement >= 0.99
    sim = mps.quantize(cnn.model, CNN_PLAN, backend="simulate", calib=cnn.calib)
    with torch.inference_mode():
        want = [sim(b).numpy() for b in cnn.test]
    got = _ort_outputs(res.paths["onnx"], cnn.test)
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)) == pytest.approx(
        onnx_rec.check, abs=1e-6
    )
    assert res.record("program").check == 0.0
    assert res.record("program").details["simulated_layers"] == ["conv2", "conv3", "fc2"]


def test_low_bit_and_fp8_schemes_in_onnx(mlp: Workload, tmp_path: Path) -> None:
    plan = mps.PrecisionPlan({"fc1": "fp8", "fc2": "w2a16", "fc3": "w4a8"})
    res = export_plan(
        mlp.model,
        plan,
        tmp_path,
        example_input=mlp.example_input,
        backend="simulate",
        formats=("onnx",),
        check_inputs=mlp.test,
    )
    rec = res.record("onnx")
    assert rec.details["opset"] == 25  # 2-bit codes need ONNX INT2/UINT2
    model = onnx.load(str(res.paths["onnx"]))
    types = {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    assert {"FLOAT8E4M3FN", "UINT2", "INT4"} <= types
    assert rec.check <= 0.05 and rec.top1_agreement >= 0.99


# ---------------------------------------------------------------- numerics of the QDQ layers


@pytest.mark.parametrize(
    "scheme", ["bf16", "fp16", "fp8", "w8a8", "w8a16", "w4a16", "w4a8", "w2a16"]
)
@pytest.mark.parametrize("static", [False, True])
def test_qdq_layer_equals_simulated_layer(scheme: str, static: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 8, 5, 5)
    for layer, inp in ((nn.Conv2d(8, 16, 2), x), (nn.Linear(64, 32), torch.randn(5, 64))):
        act_range = (-2.5, 3.0) if static and get_scheme(scheme).quantizes_activations else None
        if act_range and scheme == "fp8":
            continue  # static fp8 is refused for ONNX
        sim = SimulatedLayer(layer, get_scheme(scheme), act_range=act_range)
        qdq = QDQLayer(sim)
        with torch.inference_mode():
            want, got = sim(inp), qdq(inp)
            assert torch.equal(QDQLayer(sim, decomposed=True)(inp), got)
        # bf16 arithmetic is emulated in fp32 with rounded inputs and output: 1 bf16 ulp
        tol = 0.0 if get_scheme(scheme).compute_dtype == "fp32" else 2**-7 * float(want.abs().max())
        assert float((got - want).abs().max()) <= tol, (scheme, type(layer).__name__)


def test_onnx_refusal_names_what_onnx_cannot_express() -> None:
    assert onnx_refusal(get_scheme("fp4")) is not None
    assert "e8m0" in onnx_refusal(get_scheme("fp4"))
    for name in ("fp32", "bf16", "fp16", "fp8", "w8a8", "w8a16", "w4a16", "w4a8", "w2a16"):
        assert onnx_refusal(get_scheme(name)) is None, name


# ---------------------------------------------------------------- bad input, before any work


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class _Untraceable(_Tiny):
    """Python control flow on a tensor value: runs eagerly, cannot be captured by torch.export."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if float(h.detach().sum()) > 0:
            h = h * 2
        return self.fc2(h)


@pytest.fixture
def tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _Tiny().eval(), torch.randn(4, 64)


def test_unknown_format_is_refused(tiny, tmp_path: Path) -> None:
    model, x = tiny
    with pytest.raises(ValueError, match="'formats'.*'onnx'.*'tflite'"):
        export_plan(model, "w8a8", tmp_path / "o", example_input=x, formats=("plan", "tflite"))
    assert not (tmp_path / "o").exists()


def test_out_dir_that_is_a_file_is_refused(tiny, tmp_path: Path) -> None:
    model, x = tiny
    file = tmp_path / "taken"
    file.write_text("x")
    with pytest.raises(ValueError, match="'out_dir'.*it is a file"):
        export_plan(model, "w8a8", file, example_input=x)


def test_plan_naming_a_missing_layer_is_refused(tiny, tmp_path: Path) -> None:
    model, x = tiny
    with pytest.raises(ValueError, match="'fc9'.*Layers: 'fc1', 'fc2'"):
        export_plan(model, {"fc9": "w8a8"}, tmp_path / "o", example_input=x)
    assert not (tmp_path / "o").exists()


def test_scheme_onnx_cannot_express_is_refused_naming_layer(tiny, tmp_path: Path) -> None:
    model, x = tiny
    with pytest.raises(ValueError, match=r"fc2 in 'fp4'.*e8m0(.|\n)*ONNX export accepts"):
        export_plan(
            model, {"fc2": "fp4"}, tmp_path / "o", example_input=x, backend="simulate",
            formats=("plan", "onnx"),
        )  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_static_fp8_is_refused_for_onnx(tiny, tmp_path: Path) -> None:
    model, x = tiny
    with pytest.raises(ValueError, match="fc1 in 'fp8'.*static fp8"):
        export_plan(
            model, {"fc1": "fp8"}, tmp_path / "o", example_input=x, backend="simulate",
            formats="onnx", calib=[x],
        )  # fmt: skip


def test_scheme_the_backend_cannot_run_is_refused_before_writing(tiny, tmp_path: Path) -> None:
    model, x = tiny
    with pytest.raises(ValueError, match="fc1.*'fp8'.*cpu"):
        export_plan(model, {"fc1": "fp8"}, tmp_path / "o", example_input=x)
    assert not (tmp_path / "o").exists()


def test_bad_example_input_is_refused(tiny, tmp_path: Path) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match="'example_input'"):
        export_plan(model, "w8a8", tmp_path / "o", example_input=[1, 2])


# ---------------------------------------------------------------- atomic writes


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_failed_export_leaves_no_partial_file(tmp_path: Path) -> None:
    """A format that fails leaves no file, the formats after it are still written and
    checked, and the error names the failure and holds what was written."""
    torch.manual_seed(0)
    model = _Untraceable().eval()
    with pytest.raises(ExportError, match="(?i)data.dependent|guard") as caught:
        export_plan(
            model, {"fc1": "bf16"}, tmp_path, example_input=torch.randn(4, 64),
            formats=("plan", "program", "state_dict"),
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.qstate.pt", "plan.json"]
    err = caught.value
    assert list(err.failures) == ["program"] and err.__cause__ is not None
    assert sorted(err.result.paths) == ["plan", "state_dict"]
    assert err.result.record("state_dict").check == 0.0
    assert "Written and checked: plan" in str(err)


def test_export_leaves_the_models_mode_and_import_mpsearch_registers_no_export_ops(
    mlp: Workload, tmp_path: Path
) -> None:
    model = copy.deepcopy(mlp.model).train()
    export_plan(model, {"fc1": "w8a8"}, tmp_path, example_input=mlp.example_input, formats="plan")
    assert model.training
    done = subprocess.run(
        [sys.executable, "-c", "import sys, mpsearch; print('mpsearch.export' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_dict_inputs_and_model_outputs_export_in_every_format(tmp_path: Path) -> None:
    """A Hugging Face classifier takes keyword inputs (input_ids, attention_mask) and returns a
    ModelOutput: every format is written and checked, keyword inputs feed ONNX Runtime."""
    pytest.importorskip("transformers")
    bert = load_workload("hf_bert", n_calib=4, n_test=8, batch_size=4)
    res = export_plan(
        bert.model,
        "w8a8",
        tmp_path,
        example_input=bert.example_input,
        check_inputs=bert.test,
        formats=("plan", "state_dict", "program", "onnx"),
    )
    table = res.to_frame().set_index("format")
    assert set(table.index) == {"plan", "state_dict", "program", "onnx"}
    assert (table.loc[["state_dict", "program", "onnx"], "top1_agreement"] == 1.0).all()
    assert table.loc["onnx", "check"] < 1e-4
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    with torch.inference_mode():
        logits = program(**bert.example_input).logits
    assert logits.shape == (4, 4)


def test_dict_example_input_must_hold_tensors(tiny, tmp_path: Path) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match="'example_input'.*dict of tensors"):
        export_plan(model, "w8a8", tmp_path / "o", example_input={"x": [1, 2]})


def test_program_of_a_model_taking_use_cache_is_checked_with_its_own_keywords(
    tmp_path: Path,
) -> None:
    """Llama's forward names use_cache: the export turns it off and the program keeps it as a
    keyword input, which the check must pass back (BERT swallows it in **kwargs instead)."""
    pytest.importorskip("transformers")
    llama = load_workload("hf_llama", n_calib=4, n_test=4, batch_size=4)
    res = export_plan(
        llama.model, "w8a8", tmp_path, example_input=llama.example_input, formats="program"
    )
    assert res.to_frame().set_index("format").loc["program", "top1_agreement"] == 1.0


def test_a_plan_with_calibrated_rounding_exports_the_rounded_weights(
    mlp: Workload, tmp_path: Path
) -> None:
    model, calib, x = mlp.model, mlp.calib, mlp.example_input
    plan = mps.PrecisionPlan({}, default="w4a16+gptq")
    with pytest.raises(ValueError, match="'calib' argument must be calibration batches"):
        export_plan(model, plan, tmp_path / "x", example_input=x, formats="plan")
    res = export_plan(
        model, plan, tmp_path / "e", example_input=x, formats=("plan", "state_dict"), calib=calib
    )
    assert mps.PrecisionPlan.load(tmp_path / "e" / "plan.json") == plan
    loaded = load_quantized(copy.deepcopy(model), tmp_path / "e" / "model.qstate.pt")
    expected = mps.quantize(model, plan, backend="cpu", calib=calib)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected(x))
        assert not torch.equal(loaded(x), mps.quantize(model, "w4a16", backend="cpu")(x))
    assert res.to_frame()["check"].eq(0).all()


def test_qdq_layer_of_a_weight_normed_convolution() -> None:
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 16, 4, padding=2), dim=2)
    sim = SimulatedLayer(conv, get_scheme("w8a8"))
    x = torch.randn(2, 8, 12)
    with torch.inference_mode():
        assert torch.equal(QDQLayer(sim)(x), sim(x))  # its hyperparameters copied, not the module


class _TinyLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize(
    ("backend", "fmt"), [("cpu", "program"), ("simulate", "program"), ("simulate", "onnx")]
)
def test_a_w8a8_lstm_model_exports(backend: str, fmt: str, tmp_path: Path) -> None:
    """The cpu backend's program swaps fbgemm's packed cells for the simulate module (it
    failed: the swap expected a weight); the simulate module, which runs the int8 kernel
    eagerly, traces its loop, and ONNX takes its dynamic activation ranges (a whole-tensor
    min/max it could not translate)."""
    torch.manual_seed(0)
    model, x = _TinyLSTM().eval(), torch.randn(4, 6, 8)
    res = export_plan(model, "w8a8", tmp_path, example_input=x, backend=backend, formats=(fmt,))
    assert set(res.paths) == {fmt} and res.record(fmt).check < 1e-4
    if fmt == "program":  # the simulate module holds no packed kernel to swap
        swapped = ["lstm", "head"] if backend == "cpu" else []
        assert res.record(fmt).details["simulated_layers"] == swapped


class _Versioned(nn.Module):
    """A module whose ``_load_from_state_dict`` needs its state-dict version (torchvision's
    MNASNet raises "version should be set to 1 or 2 instead of None")."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_the_state_dict_keeps_each_modules_version(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = _Versioned().eval(), torch.randn(4, 8)
    res = export_plan(model, "w8a8", tmp_path, example_input=x, formats=("state_dict",))
    assert res.record("state_dict").check == 0
    loaded = load_quantized(_Versioned(), res.paths["state_dict"])
    assert torch.equal(loaded(x), mps.quantize(model, "w8a8", backend="cpu")(x))


def test_top1_agreement_of_segmentation_logits_is_per_pixel_over_the_classes() -> None:
    """Bug: the arg-max was taken over the last dimension (the map's width). A shift shared by
    a pixel's classes leaves its class unchanged and moves the arg-max over the width."""
    from mpsearch.export._export import _compare

    g = torch.Generator().manual_seed(0)
    want = torch.randn(2, 4, 5, 6, generator=g)
    got = want + 10 * torch.randn(2, 1, 5, 6, generator=g)  # the same shift for every class
    assert bool((got.argmax(-1) != want.argmax(-1)).any())
    diff, agree = _compare([(got, "logits")], [(want, "logits")])
    assert agree == 1.0 and diff == float((got - want).abs().max())
    assert _compare([(got, None)], [(want, None)])[1] < 1.0  # an unnamed image: the last dim
    # was: the broadcast error of the subtraction (or a silent broadcast)
    with pytest.raises(
        ValueError, match=r"check input 1, the file's output has shape \(2, 4, 5, 5\)"
    ):
        _compare([(want, "logits"), (want[..., :5], "logits")], [(want, "logits")] * 2)


def test_top1_agreement_of_a_multi_label_classifier_is_its_label_set() -> None:
    """A multi-label classifier's check compares each input's set of labels (``logit > 0``):
    one label crossing 0 is a disagreement, a shift that keeps every sign is none, though it
    moves the arg-max."""
    from mpsearch.export._export import _compare

    want = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -1.0, -0.5]])
    got = torch.tensor([[0.1, -5.0, 4.0], [-3.0, 0.2, -0.5]])
    assert _compare([(got, "logits")], [(want, "logits")], multi_label=True)[1] == 0.5
    assert _compare([(got, "logits")], [(want, "logits")])[1] == 0.0
