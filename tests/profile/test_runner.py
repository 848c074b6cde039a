"""The graph runner: how many quantized variants it re-runs at once, and that it does not
change the numbers."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from profile_models import batches, chain
from torch import nn

from mpsearch.layers import quantizable_layers
from mpsearch.profile import profile
from mpsearch.profile._e2e import first_samples, most_uncertain, picked_samples
from mpsearch.workloads import load_workload

runner_module = importlib.import_module("mpsearch.profile._runner")


class _ConvNet(nn.Module):
    """Large activations, small weights: compute-bound, one variant at a time."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class _WideMLP(nn.Module):
    """Small activations, large weights used for few rows: weight-bound, all variants at once."""

    def __init__(self, d: int = 1024) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, d)
        self.fc2 = nn.Linear(d, d)
        self.fc3 = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class _Attention(nn.Module):
    """A Linear, then ``nn.MultiheadAttention`` (one fused kernel in inference), then a Linear."""

    def __init__(self, e: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, e)
        self.attn = nn.MultiheadAttention(e, 4, batch_first=True)
        self.head = nn.Linear(e, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        return self.head(self.attn(t, t, t, need_weights=False)[0])


def test_fused_attention_counts_as_work() -> None:
    """``nn.MultiheadAttention``'s fused kernel counts its projections and attention (flop
    counters see it as one operation without a formula)."""
    model, (b, s, e) = _Attention().eval(), (2, 5, 32)
    runner = runner_module.build_runner(
        model, batches(1, b, s, 8), ["embed", "head"], fold_bn=False, warn=print
    )
    macs = {n.target: c for n, c in runner.node_cost.items() if n.op == "call_module"}
    assert macs == {
        "embed": b * s * 8 * e,
        "attn": b * e * (e * 4 * s + 2 * s * s),  # projections on 4 x s rows, attention
        "head": b * s * e * 4,
    }
    # the embedding's downstream work is the attention and the head (and a few elementwise)
    total = sum(runner.node_cost.values())
    assert runner.downstream_passes() >= (macs["attn"] + macs["head"]) / total > 0.9


@pytest.mark.parametrize(
    ("layer", "args"),
    [
        (nn.LSTMCell(6, 5), (torch.randn(3, 6), (torch.zeros(3, 5), torch.zeros(3, 5)))),
        (nn.GRUCell(6, 5), (torch.randn(3, 6), torch.zeros(3, 5))),
        (nn.Linear(6, 5), (torch.randn(2, 3, 6),)),
    ],
)
def test_composite_layers_count_without_decomposing(layer: nn.Module, args: tuple) -> None:
    """A cell or ``F.linear`` counts as one operation (the counter would otherwise run it as
    its elementary operations, several times slower) with the flops of its matrix products."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(mapping: dict) -> dict:
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with torch.inference_mode(), counter:
            layer(*args)
        return {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}

    ours, decomposed = count(runner_module._EXTRA_FLOPS), count({})
    assert len(ours) == 1 and next(iter(ours)) in {"aten.lstm_cell", "aten.gru_cell", "aten.linear"}
    assert sum(ours.values()) == sum(decomposed.values()) > 0


def _groups(model: nn.Module, calib: list[torch.Tensor]) -> dict[str, int]:
    names = list(quantizable_layers(model))
    runner = runner_module.build_runner(model, calib, names, fold_bn=True, warn=print)
    runner.prepare_e2e(runner.batches)
    assert all(runner.batchable.values())
    return runner.group


def test_variants_run_together_only_where_it_saves_work() -> None:
    conv = _groups(_ConvNet().eval(), batches(2, 32, 3, 16, 16))
    # conv1's and conv2's suffixes hold 32 x 64 x 16 x 16 floats (2 MiB) per variant
    assert conv["conv1"] == conv["conv2"] == 1
    assert conv["fc"] > 3  # [32, 10] logits: all at once
    wide = _groups(_WideMLP().eval(), batches(2, 32, 64))
    # downstream of fc1, fc2's 4 MiB weight serves only 32 rows per run: worth sharing
    assert wide["fc1"] > 3


def test_concatenation_does_not_change_the_table(monkeypatch) -> None:
    model, calib = chain(4), batches(3, 16, 32)
    kwargs = {"schemes": ["bf16", "w8a8", "w4a16"], "progress": False}
    monkeypatch.setattr(runner_module, "CONCAT_BYTES", 1 << 40)
    assert min(_groups(model, calib).values()) >= 3
    together = profile(model, calib, **kwargs).table
    monkeypatch.setattr(runner_module, "CONCAT_BYTES", 0)
    monkeypatch.setattr(runner_module, "WEIGHT_REUSE", 0)
    assert set(_groups(model, calib).values()) == {1}
    alone = profile(model, calib, **kwargs).table
    for column in ("mse", "sqnr_db"):
        assert together[column].equals(alone[column])
    np.testing.assert_allclose(together["e2e"], alone["e2e"], rtol=1e-5)


class _Mixed(nn.Module):
    """Every kind of graph node the runner executes: modules (max pooling's fast stand-in
    included), functions, methods, an attribute, a residual, attention and a matrix product."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.proj = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.relu(self.conv(x)))  # [b, 8, 4, 4]
        t = y.flatten(2).transpose(1, 2)  # [b, 16, 8]
        q = self.proj(t) * self.scale
        a = torch.nn.functional.scaled_dot_product_attention(q[:, None], t[:, None], t[:, None])
        z = t + a[:, 0] + torch.matmul(q, q.transpose(1, 2)).softmax(-1) @ t
        return self.head(z.mean(1))


def test_graph_runner_rows_equal_hook_runner_rows(monkeypatch) -> None:
    model, calib = _Mixed().eval(), batches(2, 6, 3, 8, 8)
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": None}
    graph = profile(model, calib, **kwargs)
    monkeypatch.setattr(runner_module, "CAPTURES", {})  # no graph capture: the hook runner
    with pytest.warns(UserWarning, match="hook runner"):
        hooks = profile(model, calib, **kwargs)
    assert graph.info["runner"] == "graph:fx" and hooks.info["runner"] == "hooks"
    for metric in ("mse", "sqnr_db"):
        np.testing.assert_allclose(graph.pivot(metric), hooks.pivot(metric), rtol=1e-5)
    # KL divergences down to 1e-10: float rounding of the batched downstream runs shows there
    np.testing.assert_allclose(graph.pivot("e2e"), hooks.pivot("e2e"), rtol=1e-4, atol=1e-10)


def test_node_costs_are_multiply_accumulates_or_output_sizes() -> None:
    model, calib = _Mixed().eval(), batches(1, 6, 3, 8, 8)
    runner = runner_module.build_runner(
        model, calib, ["conv", "proj", "head"], fold_bn=True, warn=print
    )
    cost = {str(n): c for n, c in runner.node_cost.items()}
    b, s, d = 6, 16, 8
    assert cost["conv"] == b * 8 * 8 * 8 * (3 * 3 * 3)  # output elements x (c_in x kernel)
    assert cost["proj"] == b * s * d * d
    assert cost["head"] == b * 5 * d
    assert cost["scaled_dot_product_attention"] == b * s * s * (d + d)  # q k^T and (.) v
    assert cost["matmul"] == b * s * s * d
    assert cost["matmul_1"] == b * s * d * s  # the `@` operator
    assert cost["pool"] == b * 8 * 4 * 4  # no multiply-accumulates: its output's size
    assert cost["relu"] == b * 8 * 8 * 8
    assert cost["x"] == cost["scale"] == cost["output"] == 0.0


def test_recurrent_cells_count_their_two_matrix_products() -> None:
    """An LSTM / GRU cell step costs its input and hidden products (counted whole, not run
    decomposed): 4 or 3 gates x hidden rows x (input + hidden) per sample."""
    model = load_workload("cell_decoder", n_calib=8, n_test=8, batch_size=8).model
    calib = batches(1, 8, 12, 40)
    runner = runner_module.build_runner(
        model, calib, ["lstm", "gru", "head"], fold_bn=False, warn=print
    )
    cost = {str(n): c for n, c in runner.node_cost.items()}
    assert cost["lstm"] == 8 * 4 * 96 * (40 + 96) and cost["lstm_11"] == cost["lstm"]
    assert cost["gru"] == 8 * 3 * 96 * (96 + 96)


class _ScaledMLP(_WideMLP):
    """An operation after the last layer: a value only end-to-end runs read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_e2e_subset_reuses_whole_batches_and_keeps_less_for_the_rest(monkeypatch) -> None:
    """Only the cut e2e batch gets its own fp32 pass; batches past the e2e samples keep only
    what the local errors read; the table equals a fresh runner's on the same e2e batches."""
    model = _ScaledMLP().eval()
    calib = batches(3, 16, 64)
    names = list(quantizable_layers(model))
    runner = runner_module.build_runner(
        model, calib, names, fold_bn=True, warn=print, e2e_samples=20
    )
    assert runner.n_e2e == 20 and runner.n_full == 1 and len(runner.store) == 1
    passes = []
    execute_all = runner._execute_all
    monkeypatch.setattr(runner, "_execute_all", lambda *a: passes.append(a) or execute_all(*a))
    runner.prepare_e2e(first_samples(calib, 20))  # the shared batches known: the store filled
    local = {n for s in runner.layer_node.values() for n in (s, *s.all_input_nodes)}
    assert set(runner.store[0]) == runner.keep > local
    assert set(runner.store[1]) == set(runner.store[2]) == local
    assert runner.n_shared == 1 and len(passes) == 4  # 2 local batches, the cut one, the check
    assert [b.shape[0] for b in runner.e2e_batches] == [16, 4] and passes[2][0].shape[0] == 4
    fast = profile(model, calib, schemes=["w8a8", "w4a16"], e2e_samples=20)
    monkeypatch.setattr(runner_module.GraphRunner, "prepare_e2e", _unshared(runner_module))
    slow = profile(model, calib, schemes=["w8a8", "w4a16"], e2e_samples=20)
    pd.testing.assert_frame_equal(fast.table, slow.table, check_exact=True)


def test_least_certain_samples_store_no_leading_batch(monkeypatch) -> None:
    """Picked samples share no calibration batch: the batches past the first are run once,
    keeping nothing, then the picked ones once, keeping what their suffixes read."""
    model, calib = chain(4), batches(8, 32, 32)
    runner = runner_module.build_runner(
        model, calib, list(quantizable_layers(model)), fold_bn=True, warn=print, e2e_samples=106
    )
    runner.use_e2e_for_local()
    kept = []
    execute_all = runner._execute_all
    monkeypatch.setattr(
        runner, "_execute_all", lambda b, k=None: kept.append(k) or execute_all(b, k)
    )
    picked = picked_samples(calib, most_uncertain(runner.all_outputs(), 106))
    runner.prepare_e2e(picked)
    assert runner.n_full == 3 and runner.n_shared == 0
    assert len(runner.store) == 1  # the first batch's, from the start
    assert kept == [set()] * 7 + [None] * 4 + [None]  # 7 batches, 4 picked ones, the check
    assert [b.shape[0] for b in picked] == [32, 32, 32, 10]


def _unshared(module):
    """``prepare_e2e`` re-running every e2e batch (no shared batch)."""
    original = module.GraphRunner.prepare_e2e

    def prepare(self, e2e_batches):
        self.n_full = 0
        original(self, e2e_batches)

    return prepare


def test_passes_drop_values_after_their_last_use() -> None:
    model = _ScaledMLP().eval()
    calib = batches(1, 8, 64)
    runner = runner_module.build_runner(
        model, calib, list(quantizable_layers(model)), fold_bn=True, warn=print
    )
    fc2 = runner.layer_node["fc2"]
    env = runner._execute_all(calib[0], {fc2})
    assert set(env) == {fc2, runner.output_node}
    assert torch.equal(runner._final(env), runner.outputs[0])


def test_the_hook_runners_calls_decide_whether_export_is_tried() -> None:
    """Layers x schemes x batches of the samples the hook runner would use: 256 samples in
    batches of 16, 19 layers, "auto" picks 8 samples (one batch); all samples, 16 batches."""
    batches = [torch.zeros(16, 4)] * 16
    layers = [f"l{i}" for i in range(19)]
    assert runner_module._hook_calls(batches, layers, 3, "auto") == 19 * 3 * 1
    assert runner_module._hook_calls(batches, layers, 3, None) == 19 * 3 * 16
    assert runner_module._hook_calls(batches, layers, 3, 20) == 19 * 3 * 2


class _Shared(nn.Module):
    """One Linear applied three times (weights shared across depth, and once on a side branch
    that does not follow its first call), traceable: no data-dependent control flow."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 16)
        self.side = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin(x))
        s = self.side(x)
        h = torch.relu(self.lin(h + s))
        return self.head(h + self.lin(s))


class _Cell(nn.Module):
    """A recurrent cell written as research code does: one Linear at every step of a loop."""

    def __init__(self, steps: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.steps = steps
        self.inp = nn.Linear(8, 16)
        self.cell = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 16)
        for t in range(self.steps):
            h = torch.tanh(self.inp(x[:, t]) + self.cell(h))
        return self.head(h)


@pytest.mark.parametrize("samples", [{"e2e_samples": None}, {"e2e_samples": 8}], ids=["all", "8"])
@pytest.mark.parametrize(
    ("model", "calib"),
    [(_Shared, batches(3, 8, 16)), (_Cell, batches(3, 8, 5, 8))],
    ids=["shared", "cell"],
)
def test_a_layer_called_more_than_once_takes_the_graph_runner(
    model, calib, samples, monkeypatch
) -> None:
    """Every call of the layer runs its variant, and each call's local pair is taken on its
    fp32 input, whether local errors come from the end-to-end runs (all samples) or from runs
    of their own (end-to-end errors on the first 8 samples): the rows equal the hook runner's,
    which took such models before."""
    kwargs = {"schemes": ["w4a16_pc", "w8a8", "bf16"], "progress": False, **samples}
    graph, hooks = _graph_and_hooks(model().eval(), calib, kwargs, monkeypatch)
    assert graph.info["runner"].startswith("graph:")
    for metric in ("mse", "sqnr_db", "e2e"):
        # rtol 1e-4: an MSE of 1e-6 between two outputs near 1 magnifies their last bits, which
        # varied between runs on machine A (Xeon, AMX) under `pytest -n 2`: 1.7e-5 relative
        np.testing.assert_allclose(graph.pivot(metric), hooks.pivot(metric), rtol=1e-4)


def _graph_and_hooks(net: nn.Module, calib: list, kwargs: dict, monkeypatch) -> tuple:
    """The profile on the graph (no fallback allowed), then with the hook runner."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        graph = profile(net, calib, **kwargs)
    monkeypatch.setattr(runner_module, "CAPTURES", {})
    with pytest.warns(UserWarning, match="hook runner"):
        hooks = profile(net, calib, **kwargs)
    assert hooks.info["runner"] == "hooks"
    return graph, hooks


class _InitialState(nn.Module):
    """An LSTM called with a learned initial state (its second argument)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.h0 = nn.Parameter(torch.randn(1, 1, 32) * 2)
        self.c0 = nn.Parameter(torch.randn(1, 1, 32) * 2)
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = (self.h0.expand(1, x.shape[0], 32), self.c0.expand(1, x.shape[0], 32))
        out, _ = self.lstm(x, tuple(s.contiguous() for s in state))
        return self.head(out[:, -1])


def test_a_layers_variants_take_all_its_arguments(monkeypatch) -> None:
    """The variants of a layer called with more than its input (an LSTM's initial state) get
    every argument: bf16 keeps the LSTM's output within 40 dB (without its initial state it
    was 0.6 dB from the fp32 output, on both runners)."""
    kwargs = {"schemes": ["bf16", "w8a8"], "progress": False, "e2e_samples": None}
    graph, hooks = _graph_and_hooks(
        _InitialState().eval(), batches(3, 8, 6, 8), kwargs, monkeypatch
    )
    assert graph.info["runner"] == "graph:fx"
    assert graph.pivot("sqnr_db").loc["lstm", "bf16"] > 40
    for metric in ("mse", "sqnr_db", "e2e"):
        np.testing.assert_allclose(graph.pivot(metric), hooks.pivot(metric), rtol=1e-5)


class _InPlaceResidual(nn.Module):
    """A block whose residual is added in place into its second Linear's input after that
    Linear read it, and a Linear applied twice per pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h += self.mid(h)  # changes mid's recorded input unless it was copied
        return self.head(self.mid(h))


class _Rescaled(nn.Linear):
    """A Linear whose output scale is state its caller sets before each call."""

    scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class _StatefulCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = _Rescaled(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for scale in (1.0, 3.0):
            self.lin.scale = scale
            x = torch.relu(self.lin(x))
        return self.head(x)


def _hook_profile(model: nn.Module, calib: list, monkeypatch, cache_bytes: int) -> tuple:
    """The hook runner's profile (end-to-end errors on the first 4 samples: local errors from
    passes of their own) and the number of times the model ran."""
    monkeypatch.setattr(runner_module, "CAPTURES", {})
    monkeypatch.setattr(runner_module, "HOOK_CACHE_BYTES", cache_bytes)
    ran = [0]
    handle = model.register_forward_pre_hook(lambda *_: ran.__setitem__(0, ran[0] + 1))
    try:
        with pytest.warns(UserWarning, match="hook runner"):
            prof = profile(
                model, calib, schemes=["w8a8", "w4a16_pc"], progress=False, e2e_samples=4
            )
    finally:
        handle.remove()
    return prof, ran[0]


@pytest.mark.parametrize("model", [_InPlaceResidual, _StatefulCalls], ids=["inplace", "state"])
def test_hook_runner_local_errors_from_one_recorded_pass_per_batch(model, monkeypatch) -> None:
    """Every layer's local pairs come from replaying its host on the inputs one fp32 pass of
    the batch recorded (copied: an in-place add afterwards does not change them), not from a
    pass of the whole model per layer; a host whose replay does not give the recorded output
    (it reads state its caller set) keeps the per-layer pass. Rows equal either way."""
    calib = batches(3, 8, 16) if model is _StatefulCalls else batches(3, 8, 8)
    layers = 3 if model is _InPlaceResidual else 2
    cached, ran = _hook_profile(model().eval(), calib, monkeypatch, 2**30)
    per_layer, ran_per_layer = _hook_profile(model().eval(), calib, monkeypatch, 0)
    for metric in ("mse", "sqnr_db", "e2e"):
        np.testing.assert_allclose(cached.pivot(metric), per_layer.pivot(metric), rtol=1e-6)
    # local errors on all 3 batches: per layer, a pass per layer and batch (after one
    # recording pass found the budget passed); cached, one recording pass per batch, and the
    # per-layer passes of a layer whose replay failed
    replayed = layers if model is _InPlaceResidual else layers - 1
    assert ran_per_layer == ran + 3 * replayed - 3 + 1


def test_hook_runner_counts_a_layers_calls_per_pass() -> None:
    """Calls in one forward pass (was: over all calibration batches, so every layer of a model
    profiled on 2 batches or more counted as called twice and took an extra fp32 pass per
    layer and batch)."""
    runner = runner_module.HookRunner(
        _InPlaceResidual().eval(), batches(3, 8, 8), ["inp", "mid", "head"]
    )
    assert runner.calls == {"inp": 1, "mid": 2, "head": 1}


class _SequenceFirst(nn.Module):
    """Linears on ``[time, batch, features]`` values (a sequence-first model), and data-dependent
    control flow (the hook runner)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x.transpose(0, 1)))  # [time, batch, 16]
        if bool(h.sum() > -1e9):
            h = h.cumsum(0)
        return self.head(h[-1])


def _hook_rows(model: nn.Module, calib: list, monkeypatch, side_by_side: bool | None) -> tuple:
    monkeypatch.setattr(runner_module.HookRunner, "side_by_side", side_by_side)
    return _hook_profile(model, calib, monkeypatch, 2**30)


@pytest.mark.parametrize(
    ("model", "calib", "runs"),
    [(_InPlaceResidual, batches(3, 8, 8), 2), (_SequenceFirst, batches(3, 8, 6, 8), 0)],
    ids=["batch-first", "sequence-first"],
)
def test_hook_runner_variants_side_by_side(model, calib, runs, monkeypatch) -> None:
    """Side by side, a layer's two variants take one run of the batch repeated twice instead
    of one run each: the rows are the one-by-one rows (up to float rounding of the larger
    matrix products). A layer called twice runs one by one; a host whose values are not
    batch-first (time first: its copies are not along the leading dimension) too, found by its
    fp32 output's copies disagreeing, after which the layer runs one by one."""
    side, ran_side = _hook_rows(model().eval(), calib, monkeypatch, True)
    one, ran_one = _hook_rows(model().eval(), calib, monkeypatch, False)
    for metric in ("mse", "sqnr_db", "e2e"):
        np.testing.assert_allclose(side.pivot(metric), one.pivot(metric), rtol=1e-5)
    # batch-first: inp and head save a run each on the 4 e2e samples; sequence-first: inp's
    # try costs a run (its rows would be wrong if it were used), head (batch-first) saves one
    assert ran_one - ran_side == runs


def test_hook_runner_never_cuts_a_scalar_output(monkeypatch) -> None:
    """A model whose output is one number per batch cannot be cut into its copies: side by
    side is off for every layer after the first try."""

    class Mean(_InPlaceResidual):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).mean()

    runner = runner_module.HookRunner(Mean().eval(), batches(2, 8, 8), ["inp", "mid", "head"])
    monkeypatch.setattr(runner, "side_by_side", True)
    quantized = [nn.Linear(8, 16), nn.Linear(8, 16)]
    assert runner._side_by_side("inp", quantized, runner.batches[0]) is None
    assert runner.side_by_side is False


class _Fallback(_SequenceFirst):
    """Catches any error of its first layer and takes another path (as model code with a
    fallback does): the side-by-side run's refusal must not pass for its outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            h = torch.relu(self.inp(x.transpose(0, 1)))
        except Exception:
            h = torch.zeros(x.shape[1], x.shape[0], 16)
        if bool(h.sum() > -1e9):
            h = h.cumsum(0)
        return self.head(h[-1])


def test_hook_runner_side_by_side_refused_inside_a_try_block(monkeypatch) -> None:
    side, _ = _hook_rows(_Fallback().eval(), batches(3, 8, 6, 8), monkeypatch, True)
    one, _ = _hook_rows(_Fallback().eval(), batches(3, 8, 6, 8), monkeypatch, False)
    for metric in ("mse", "sqnr_db", "e2e"):
        np.testing.assert_allclose(side.pivot(metric), one.pivot(metric), rtol=1e-5)
