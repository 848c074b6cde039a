"""Graph captures for the graph runner: fx, fx with constant defaults fixed, fx with example
values, torch.export; each gives the rows the hook runner gives, and the table says which runner
measured them."""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from helpers import PackedLSTM, packed_batches
from profile_models import ConvBN, DataDependent, DictInput, batches

from mpsearch.backends import get_backend
from mpsearch.layers import swapped
from mpsearch.profile import profile
from mpsearch.profile._emulate import profile_layer
from mpsearch.schemes import get_scheme
from mpsearch.workloads import ZOO, load_workload
from mpsearch.workloads._zoo import zoo_available

runner_module = importlib.import_module("mpsearch.profile._runner")
capture_module = importlib.import_module("mpsearch.profile._capture")


def _hooks(monkeypatch, model, calib, **kwargs):
    """The profile measured by the hook runner (no graph capture allowed)."""
    with monkeypatch.context() as patch:
        patch.setattr(runner_module, "CAPTURES", {})
        with pytest.warns(UserWarning, match="hook runner"):
            return profile(model, calib, **kwargs)


def _assert_same_rows(graph, hooks) -> None:
    # rtol 1e-4: local MSEs of 1e-8 between outputs near 1 magnify the outputs' last bits, which
    # vary between the runners' batch layouts on machine A (Xeon, AMX): 1.6e-5 relative seen
    for metric in ("mse", "sqnr_db"):
        np.testing.assert_allclose(graph.pivot(metric), hooks.pivot(metric), rtol=1e-4)
    # KL divergences down to 1e-10: float rounding of the graph's operations shows there
    np.testing.assert_allclose(graph.pivot("e2e"), hooks.pivot("e2e"), rtol=1e-4, atol=1e-10)


def test_constant_defaults_are_the_parameters_the_batches_leave_out() -> None:
    class Net(torch.nn.Module):
        def forward(self, x, mask=None, embed=False, scale=2.0, extra=torch.ones(1)):  # noqa: B008
            return x

    x = torch.zeros(1)
    assert capture_module.constant_defaults(Net(), x) == {
        "mask": None,
        "embed": False,
        "scale": 2.0,
    }
    assert capture_module.constant_defaults(Net(), (x, x)) == {"embed": False, "scale": 2.0}
    assert capture_module.constant_defaults(Net(), {"x": x, "embed": True}) == {
        "mask": None,
        "scale": 2.0,
    }


def test_flag_net_takes_fx_with_concrete_args_and_matches_hooks(monkeypatch) -> None:
    wl = load_workload("flag_net")
    calib = wl.calib[:2]
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": None}
    graph = profile(wl.model, calib, **kwargs)
    assert graph.info["runner"] == "graph:fx(concrete_args)"
    assert set(graph.table["runner"]) == {"graph:fx(concrete_args)"}
    assert graph.info["runner_fallbacks"]["graph:fx"] == (
        "Unsupported: forward's 'embed' keep a constant default: traced fixed by fx(concrete_args)"
    )
    hooks = _hooks(monkeypatch, wl.model, calib, **kwargs)
    assert set(hooks.table["runner"]) == {"hooks"}
    _assert_same_rows(graph, hooks)


@pytest.mark.parametrize("method", ["fx(values)", "export"])
def test_hugging_face_model_takes_fx_values_and_matches_hooks(method, monkeypatch) -> None:
    """``forward(input_ids=None, ..., **kwargs)`` with shape checks: plain fx fails, fx with
    example values traces it (export, the next capture, too)."""
    pytest.importorskip("transformers")
    wl = load_workload("hf_llama")
    calib = [{k: v[:4] for k, v in b.items()} for b in wl.calib[:2]]
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": None}
    kwargs["layers"] = layers
    if method == "export":
        _only(monkeypatch, "export")
    graph = profile(wl.model, calib, **kwargs)
    assert graph.info["runner"] == f"graph:{method}"
    if method == "fx(values)":
        assert set(graph.info["runner_fallbacks"]) == {"graph:fx", "graph:fx(concrete_args)"}
    assert set(graph.table["runner"]) == {f"graph:{method}"}
    assert set(graph.table["status"]) == {"ok"}
    hooks = _hooks(monkeypatch, wl.model, calib, **kwargs)
    _assert_same_rows(graph, hooks)


def _dict_batches(n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of 6 samples for :class:`DictInput` and its subclasses."""
    images, extras = batches(n, 6, 16), batches(n, 6, 8, seed=1)
    return [{"image": x, "extra": y} for x, y in zip(images, extras, strict=True)]


def _only(monkeypatch, method: str) -> None:
    """Only ``method`` captures, whatever the hook runner's work would be."""
    monkeypatch.setattr(runner_module, "CAPTURES", {method: capture_module.CAPTURES[method]})
    monkeypatch.setattr(runner_module, "EXPORT_MIN_CALLS", 0)


class _BatchBranch(DictInput):
    """Branches on the batch size: the graph of one batch size would be wrong for another."""

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        if image.shape[0] % 2:
            return super().forward(image, extra)
        return super().forward(image, -extra)


class _Variadic(DictInput):
    """Hugging Face style: inputs by keyword into ``**kwargs``... and a shape check."""

    def forward(self, image=None, extra=None, **kwargs):
        image = torch.cat(list(image.chunk(2, dim=-1)), dim=-1)  # len() of a traced tuple
        if image.dim() == 2 and image.shape[-1] == 16:
            return super().forward(image, extra)
        return torch.zeros(image.shape[0], 4)


def test_fx_values_refuses_control_flow_on_data_or_on_the_batch_size() -> None:
    data = _dict_batches(1)
    layers = ["a", "b", "head"]
    capture = capture_module.capture_fx_values
    with pytest.raises(torch.fx.proxy.TraceError, match="computed from the input data"):
        capture(DataDependent().eval(), data, layers)
    with pytest.raises(torch.fx.proxy.TraceError, match="depends on the batch size"):
        capture(_BatchBranch().eval(), data, layers)
    longer = [*data, {"image": torch.zeros(6, 16), "extra": torch.zeros(6, 9)}]
    with pytest.raises(capture_module.Unsupported, match="more than their first dimension"):
        capture(_Variadic().eval(), longer, layers)
    with pytest.raises(capture_module.Unsupported, match="fewer than 3 samples"):
        capture(_Variadic().eval(), [{k: v[:2] for k, v in data[0].items()}], layers)


def test_fx_values_traces_keyword_inputs_into_a_graph_of_the_layers(monkeypatch) -> None:
    torch.manual_seed(0)
    model = _Variadic().eval()
    data = _dict_batches(2)
    capture = capture_module.capture_fx_values(model, data, ["a", "b", "head"])
    targets = [n.target for n in capture.gm.graph.nodes if n.op == "call_module"]
    assert targets == ["a", "b", "head"]
    for batch in [*data, {k: v[:5] for k, v in data[0].items()}]:  # another batch size
        expected = model(**batch)
        assert torch.equal(capture.output(capture.gm(*capture.inputs(batch))), expected)
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": 8}
    graph = profile(model, data, **kwargs)
    assert graph.info["runner"] == "graph:fx(values)"
    _assert_same_rows(graph, _hooks(monkeypatch, model, data, **kwargs))


class _SizedOnes(DictInput):
    """Hugging Face idioms plain fx cannot trace: ``torch.ones(batch, length)`` with the sizes
    read from a tensor (OPT) and ``torch.finfo(x.dtype)`` (BLOOM)."""

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(image.shape[0], image.shape[1], dtype=image.dtype)
        low = torch.finfo(image.dtype).min
        return super().forward((image * ones).clamp_min(low), extra)


class _SizeTensor(DictInput):
    """``torch.tensor`` of a size read from a traced tensor (DeBERTa-v2's attention scale)."""

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        scale = torch.sqrt(torch.tensor(image.size(-1), dtype=torch.float) * 2)
        return super().forward(image / scale, extra)


class _UnpackedShape(DictInput):
    """A traced value's shape unpacked as arguments (``A.new_zeros(B.shape[0], *A.shape)`` in
    Mamba's scan: Python asks the attribute for its ``len``)."""

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        weight = self.a.weight.t()
        state = weight.new_zeros(image.shape[0], *weight.shape)
        return super().forward(image + state.sum(-1), extra)


@pytest.mark.parametrize("model", [_SizedOnes, _SizeTensor, _UnpackedShape])
def test_fx_values_traces_factories_and_dtype_reads(model, monkeypatch) -> None:
    torch.manual_seed(0)
    model = model().eval()
    data = _dict_batches(2)
    originals = torch.ones, torch.tensor
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": 8}
    graph = profile(model, data, **kwargs)
    assert (torch.ones, torch.tensor) == originals  # the tracing stand-ins are gone
    assert graph.info["runner"] == "graph:fx(values)"
    assert "Error" in graph.info["runner_fallbacks"]["graph:fx"]  # plain fx fails
    _assert_same_rows(graph, _hooks(monkeypatch, model, data, **kwargs))


class _ItemAssigned(DictInput):
    """Item assignment on a fresh tensor (BEiT's relative position index, Speech2Text's
    positions, Qwen3-Next's delta rule), and on a view of a value read afterwards (``view``)."""

    def __init__(self, *, view: bool = False) -> None:
        super().__init__()
        self.view = view

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        hidden = self.a(image)
        if self.view:
            part = hidden[:, :4]  # hidden itself changes with it
            part[:, 1:] = 0.0
            return self.head(torch.relu(hidden + self.b(extra)))
        bias = hidden.new_zeros(hidden.shape)
        bias[:, 1:] = hidden[:, :-1]
        return self.head(torch.relu(hidden + bias + self.b(extra)))


class _Scattered(DictInput):
    """An in-place method whose result is read through its input (DeepSeek-V3's group mask:
    ``mask.scatter_(1, index, 1)``, then ``mask`` read)."""

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        hidden = self.a(image)
        mask = torch.zeros_like(hidden)
        mask.scatter_(1, hidden.topk(8, dim=1).indices, 1.0)
        return self.head(torch.relu(hidden * mask + self.b(extra)))


@pytest.mark.parametrize(
    ("model", "runner"),
    [
        (_ItemAssigned, "graph:fx(values)"),
        (_Scattered, "graph:fx"),
        (functools.partial(_ItemAssigned, view=True), "hooks"),
    ],
    ids=["item", "scatter_", "item-of-a-view"],
)
def test_fx_values_rewrites_in_place_changes_out_of_place(model, runner, monkeypatch) -> None:
    """The graph sets the item on a copy, runs an in-place method out of place, and the later
    nodes read the result: no cached value is mutated. Where the changed tensor is a view, the
    graph is refused (its check against the model's output fails) and the hook runner
    measures."""
    torch.manual_seed(0)
    model = model().eval()
    data = _dict_batches(2)
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = profile(model, data, **kwargs)
    assert graph.info["runner"] == runner
    if runner == "hooks":
        assert "does not reproduce" in graph.info["runner_fallbacks"]["graph:fx(values)"]
    _assert_same_rows(graph, _hooks(monkeypatch, model, data, **kwargs))


class _ShapeBranch(DictInput):
    """Branches on an input's shape: fx cannot trace it, torch.export can."""

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        if image.shape[-1] == 16:
            return super().forward(image, extra)
        return torch.zeros(image.shape[0], 4)


@pytest.mark.parametrize("method", ["fx(values)", "export"])
def test_capture_takes_dict_and_tuple_batches(method, monkeypatch) -> None:
    torch.manual_seed(0)
    model = _ShapeBranch().eval()
    images, extras = batches(3, 6, 16), batches(3, 6, 8, seed=1)
    as_dicts = [{"extra": y, "image": x} for x, y in zip(images, extras, strict=True)]
    as_tuples = list(zip(images, extras, strict=True))
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": 8}
    with monkeypatch.context() as patch:
        _only(patch, method)
        by_name = profile(model, as_dicts, **kwargs)
        by_position = profile(model, as_tuples, **kwargs)
    assert by_name.info["runner"] == by_position.info["runner"] == f"graph:{method}"
    assert by_name.table.equals(by_position.table)
    _assert_same_rows(by_name, _hooks(monkeypatch, model, as_dicts, **kwargs))


def test_export_graph_takes_evaluate_and_hessian(monkeypatch) -> None:
    """``evaluate`` and ``loss_fn`` run on the exported graph module, its layers swapped."""
    torch.manual_seed(0)
    model = _ShapeBranch().eval()
    data = _dict_batches(2)

    def evaluate(net: torch.nn.Module) -> float:
        net.eval()
        return -float(net(**data[0]).square().mean())

    def loss_fn(out: torch.Tensor, _batch: object) -> torch.Tensor:
        return out.logsumexp(-1).mean()

    kwargs = {"schemes": ["w8a8"], "progress": False, "evaluate": evaluate, "loss_fn": loss_fn}
    with monkeypatch.context() as patch:
        _only(patch, "export")
        graph = profile(model, data, **kwargs)
    assert graph.info["runner"] == "graph:export"
    hooks = _hooks(monkeypatch, model, data, **kwargs)
    for metric in ("task_drop", "hessian"):
        np.testing.assert_allclose(graph.pivot(metric), hooks.pivot(metric), rtol=1e-5)


class _CachingBranch(_ShapeBranch):
    """Takes ``use_cache`` (as Hugging Face models do), which ``export`` sets to False."""

    def forward(self, image: torch.Tensor, extra: torch.Tensor, use_cache: bool = True) -> Any:
        return super().forward(image, extra), ([extra] if use_cache else None)


def test_export_graph_added_keywords_do_not_reach_what_calls_the_graph(monkeypatch) -> None:
    """The graph was exported with ``use_cache=False``; ``evaluate``, the Hessian's loss and
    calibrated rounding call it with the user's batches, which leave it out."""
    torch.manual_seed(0)
    model = _CachingBranch().eval()
    data = _dict_batches(2)

    def evaluate(net: torch.nn.Module) -> float:
        return -float(net(**data[0])[0].square().mean())

    def loss_fn(out: torch.Tensor, _batch: object) -> torch.Tensor:
        return out.logsumexp(-1).mean()

    kwargs = {"progress": False, "evaluate": evaluate, "loss_fn": loss_fn}
    kwargs["schemes"] = ["w8a8", "w4a16_pc+gptq"]
    with monkeypatch.context() as patch:
        _only(patch, "export")
        graph = profile(model, data, **kwargs)
    assert graph.info["runner"] == "graph:export"
    hooks = _hooks(monkeypatch, model, data, **kwargs)
    for metric in ("mse", "task_drop", "hessian"):
        np.testing.assert_allclose(graph.pivot(metric), hooks.pivot(metric), rtol=1e-5)


def test_export_of_in_place_operations_keeps_cached_values(monkeypatch) -> None:
    """ConvBN's in-place ReLU and residual run functionally in the exported graph."""
    model, calib = ConvBN().eval(), batches(2, 4, 3, 6, 6)
    kwargs = {"schemes": ["w8a8"], "progress": False, "e2e_samples": None, "fold_bn": False}
    _only(monkeypatch, "export")
    exported = profile(model, calib, **kwargs)
    assert exported.info["runner"] == "graph:export"
    with pytest.warns(UserWarning, match="BatchNorm is left unfolded"):
        profile(model, calib, **(kwargs | {"fold_bn": True}))
    _assert_same_rows(exported, _hooks(monkeypatch, model, calib, **kwargs))


def test_attention_out_proj_is_measured_on_the_attention_output(monkeypatch) -> None:
    wl = load_workload("attention_net")
    model, calib = wl.model, wl.calib[:2]
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": None}
    graph = profile(model, calib, **kwargs)
    assert graph.info["runner"] == "graph:fx"
    rows = graph.table.set_index(["layer", "scheme"]).loc["attn.out_proj"]
    assert list(rows["status"]) == ["ok", "ok"]
    assert (rows["e2e"] > 0).all()
    hooks = _hooks(monkeypatch, model, calib, **kwargs)
    assert list(hooks.table["status"]) == list(graph.table["status"])
    _assert_same_rows(graph, hooks)
    # by hand: the attention module's first output, out_proj quantized vs fp32
    with torch.inference_mode():
        tokens = [model.patch(x).flatten(2).transpose(1, 2) for x in calib]
        ref = torch.cat([model.attn(t, t, t, need_weights=False)[0] for t in tokens])
        for scheme in kwargs["schemes"]:
            q = profile_layer(get_backend("simulate"), model.attn.out_proj, get_scheme(scheme))
            with swapped(model, {"attn.out_proj": q}):
                out = torch.cat([model.attn(t, t, t, need_weights=False)[0] for t in tokens])
            expected = float((out - ref).square().sum()) / ref.numel()
            assert rows.loc[scheme, "mse"] == pytest.approx(expected, rel=1e-6)
    # the attention runs once and each variant projects its output: exactly the attention
    # module re-run with the variant swapped in
    qs = [
        profile_layer(get_backend("simulate"), model.attn.out_proj, get_scheme(s))
        for s in kwargs["schemes"]
    ]
    t = tokens[0]
    with torch.inference_mode():
        got = runner_module._variants(
            model, "attn.out_proj", qs, model.attn, (t, t, t), {"need_weights": False}
        )
        for q, (out, weights) in zip(qs, got, strict=True):
            with swapped(model, {"attn.out_proj": q}):
                want, want_weights = model.attn(t, t, t, need_weights=False)
            assert torch.equal(out, want) and weights is None and want_weights is None
    # its node gives a tuple: its variants are re-run downstream one at a time
    runner = runner_module.build_runner(model, calib, ["attn.out_proj"], fold_bn=True, warn=print)
    runner.prepare_e2e(runner.batches)
    assert runner.batchable == {"attn.out_proj": False}


def test_weight_normed_layers_take_the_graph_runner(monkeypatch) -> None:
    """A weight-normed convolution (its weight a parametrization of two parameters, as in
    wav2vec2's positional convolution) is profiled on the graph: counting the work of the
    first pass calls the parametrization on parameters under inference mode, where PyTorch's
    per-module flop tracking fails. Rows equal the hook runner's."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            conv = torch.nn.Conv1d(4, 8, 5, padding=2)
            self.conv = torch.nn.utils.parametrizations.weight_norm(conv)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean(-1))

    torch.manual_seed(0)
    model, calib = Net().eval(), batches(2, 8, 4, 16)
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": None}
    graph = profile(model, calib, **kwargs)
    assert graph.info["runner"] == "graph:fx" and graph.info["runner_fallbacks"] == {}
    _assert_same_rows(graph, _hooks(monkeypatch, model, calib, **kwargs))


def test_a_packed_sequence_model_takes_the_graph_runner(monkeypatch) -> None:
    """Bug: the quantized LSTM raised on its PackedSequence input, and the embedding's
    variants, run together concatenated along the batch, packed repeated (unsorted)
    lengths. Variants the suffix cannot take together now run one at a time; rows equal
    the hook runner's."""
    calib = packed_batches(2)
    model = PackedLSTM().eval()
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": None}
    graph = profile(model, calib, **kwargs)
    assert graph.info["runner"].startswith("graph:") and set(graph.table["status"]) == {"ok"}
    _assert_same_rows(graph, _hooks(monkeypatch, model, calib, **kwargs))


class _Codec(torch.nn.Module):
    """An audio codec's outputs: integer codes, then the decoded waveform (``loss_first``: a
    loss of the encoder's alone, first, as DAC's output starts)."""

    def __init__(self, *, loss_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.loss_first = loss_first
        self.enc = torch.nn.Conv1d(1, 8, 4, stride=2)
        self.dec = torch.nn.ConvTranspose1d(8, 1, 4, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = torch.tanh(self.enc(x))
        audio = self.dec(z)
        if self.loss_first:
            return z.pow(2).mean((1, 2)), audio  # per sample
        return (z > 0).long().sum(1), audio


@pytest.mark.parametrize("loss_first", [False, True])
def test_a_codec_s_main_output_and_a_layer_that_does_not_reach_it(loss_first, monkeypatch) -> None:
    """The main output is the first floating-point one (the waveform, not the codes before
    it). Bug: a layer that does not reach the main output (the decoder, under the encoder's
    loss) raised KeyError in the graph runner; its variants leave the output unchanged.
    Rows equal the hook runner's."""
    model, calib = _Codec(loss_first=loss_first).eval(), batches(2, 4, 1, 32)
    kwargs = {"schemes": ["bf16", "w8a16"], "progress": False, "e2e_samples": None}
    _only(monkeypatch, "fx(values)")  # its graph ends at the main output
    graph = profile(model, calib, **kwargs)
    assert graph.info["runner"] == "graph:fx(values)"
    e2e = graph.pivot("e2e")
    assert (e2e.loc["dec"] == 0).all() if loss_first else (e2e.loc["dec"] > 0).all()
    _assert_same_rows(graph, _hooks(monkeypatch, model, calib, **kwargs))


class _CachedTable(DictInput):
    """A ``forward`` that caches a buffer on its module (Wav2Vec2-Conformer's relative
    positions: ``self.pe = self.extend_pe(x, self.pe)``), grown only when too short."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(1, 40), persistent=False)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        hidden = self.a(image)
        if self.table.size(1) < hidden.size(1):  # a shape: fx(values) takes it as a constant
            self.table = torch.zeros(1, hidden.size(1))
        self.table = self.table.to(hidden.dtype)
        return self.head(torch.relu(hidden + self.table[:, : hidden.size(1)] + self.b(extra)))


class _TensorConstant(_CachedTable):
    """A tensor made in ``forward`` (Gemma-2's soft-cap, Whisper's positions): the tracer
    stores it on the model as ``_tensor_constant0``, which the graph reads."""

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor([0.5, 2.0]).repeat(16)
        return super().forward(image * scale[: image.shape[-1]], extra)


@pytest.mark.parametrize("model_class", [_CachedTable, _TensorConstant])
def test_a_forward_that_caches_a_buffer_on_itself_takes_the_graph_runner(
    model_class, monkeypatch
) -> None:
    """The trace set the buffer to a proxy, which its later reads recursed into; each capture
    now puts the attributes back (the graph holds the buffer itself) and keeps the constants
    the tracer added (dropping them sent Gemma-2, Whisper and seven more to the hook runner)."""
    torch.manual_seed(0)
    model = model_class().eval()
    data = _dict_batches(2)
    kwargs = {"schemes": ["w8a8"], "progress": False, "e2e_samples": None}
    graph = profile(model, data, **kwargs)
    assert graph.info["runner"] == "graph:fx(values)"
    assert "Error" in graph.info["runner_fallbacks"]["graph:fx"]
    _assert_same_rows(graph, _hooks(monkeypatch, model, data, **kwargs))
    work = model_class().eval()
    capture = capture_module.capture_fx_values(work, data, ["a", "b", "head"])
    assert type(work.table) is torch.Tensor and capture.gm.table is work.table


class Untraceable(torch.nn.Module):
    """Data-dependent control flow: no capture works."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if bool(x.sum() > -1e9) else x[:, :4]


def _count_copies(monkeypatch) -> list[object]:
    """The models ``runner_module`` deep-copies, recorded as they are copied."""
    copied: list[object] = []
    real = runner_module.copy.deepcopy

    def deepcopy(value, *args):
        copied.append(value)
        return real(value, *args)

    monkeypatch.setattr(runner_module, "copy", type("copy", (), {"deepcopy": deepcopy}))
    return copied


def test_failed_captures_share_one_copy_a_graph_that_failed_its_check_takes_its_own(
    monkeypatch,
) -> None:
    model = Untraceable().eval()
    copied = _count_copies(monkeypatch)
    with pytest.warns(UserWarning, match="hook runner"):
        runner = runner_module.build_runner(
            model, batches(1, 4, 8), ["fc"], fold_bn=True, warn=warnings.warn
        )
    assert len(runner.fallbacks) == 4 and copied == [model]  # the hook runner works on it too
    copied.clear()
    conv_bn = ConvBN().eval()
    monkeypatch.setattr(runner_module, "_close", lambda a, b, rtol: rtol < 1e-4)  # folded: off
    runner = runner_module.build_runner(
        conv_bn, batches(1, 4, 3, 8, 8), ["conv1"], fold_bn=True, warn=lambda note: None
    )
    assert runner.mode == "graph:fx" and copied == [conv_bn, conv_bn]  # the folded one is lost
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in runner.gm.modules())


def test_hook_runner_warning_says_why_each_capture_failed() -> None:
    with pytest.warns(UserWarning, match=r"graph:fx: TraceError.*graph:export: ") as record:
        prof = profile(Untraceable().eval(), batches(1, 4, 8), schemes=["w8a8"], progress=False)
    assert "graph:fx(concrete_args): Unsupported" in str(record[0].message)
    assert "graph:fx(values): TraceError: control flow of a value computed from the input" in str(
        record[0].message
    )
    assert prof.info["runner"] == "hooks"
    assert set(prof.info["runner_fallbacks"]) == {
        "graph:fx",
        "graph:fx(concrete_args)",
        "graph:fx(values)",
        "graph:export",
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [n for n, e in ZOO.items() if e.needs in (None, "transformers") and n != "flag_net"]
)
def test_every_zoo_model_gives_the_hook_runners_rows_on_the_graph(name, monkeypatch) -> None:
    if not zoo_available(name):
        pytest.skip(f"needs {ZOO[name].needs}")
    wl = load_workload(name, n_calib=8, batch_size=4)
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a never-called layer's skipped rows
        graph = profile(wl.model, wl.calib, **kwargs)
    assert graph.info["runner"].startswith("graph:")
    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setattr(runner_module, "CAPTURES", {})
        hooks = profile(wl.model, wl.calib, **kwargs)
    assert hooks.info["runner"] == "hooks"
    ok = (graph.table["status"] == "ok").to_numpy()
    assert list(ok) == list(hooks.table["status"] == "ok")
    _assert_same_rows(graph, hooks)


def test_export_keeps_a_mixture_of_experts_bank_called_with_its_routing(monkeypatch) -> None:
    """A bank is called with its hidden states and routing (three tensors): export replaced it
    by a one-input opaque call and failed ('takes 2 positional arguments but 4 were given'),
    so Jamba, Granite 4 hybrid and Qwen3-Next took the hook runner."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (4, 8), generator=g)} for _ in range(2)]
    kwargs = {"schemes": ["w8a8", "w4a16"], "progress": False}
    with monkeypatch.context() as patch:
        _only(patch, "export")
        graph = profile(model, data, **kwargs)
    assert graph.info["runner"] == "graph:export", graph.info["runner_fallbacks"]
    assert "model.layers.0.mlp.experts" in graph.layers
    _assert_same_rows(graph, _hooks(monkeypatch, model, data, **kwargs))


def test_a_failed_export_capture_prints_no_graph(capsys) -> None:
    """The fallback records why the export failed in one line; torch's partial graph (650
    lines for a detection model, printed at every attempt) is not written to stderr."""
    data = _dict_batches(2)
    with pytest.raises(Exception, match="data-dependent"):
        capture_module.capture_export(DataDependent().eval(), data, ["a", "b", "head"])
    assert "def forward" not in capsys.readouterr().err
