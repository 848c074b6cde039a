"""LSTM / GRU: per-gate-row weights, PyTorch's dynamic int8 RNN kernel on cpu, simulate equal to it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from mpsearch.backends import get_backend, quantize
from mpsearch.backends._kernels import int8_kernel_scheme
from mpsearch.backends._recurrent import Int8DynamicRNN, SimulatedRNN, as_rnn
from mpsearch.schemes import fake_quantize, get_scheme
from mpsearch.schemes._formats import int_range
from mpsearch.workloads import load_workload


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _per_row_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8, one scale per row, by hand."""
    qmax = int_range(8, symmetric=True)[1]
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def _act(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric uint8 per tensor (range widened to hold 0), by hand."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    zero = min(max(round(-lo / scale), 0), 255)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


@torch.no_grad()
def test_per_gate_fake_quant_equals_a_hand_computed_lstm() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 2).eval()  # weight_ih: [8, 3], 4 gates x 2 rows, one scale per row
    x = torch.randn(5, 1, 3)
    sim = SimulatedRNN(lstm, get_scheme("w8a8"))
    assert [tuple(w.shape) for w in sim.weights_q] == [(8, 3), (8, 2)]
    w_ih, w_hh = _per_row_int8(lstm.weight_ih_l0), _per_row_int8(lstm.weight_hh_l0)
    assert torch.equal(sim.weights_q[0], w_ih) and torch.equal(sim.weights_q[1], w_hh)
    xw = _act(x) @ w_ih.t() + lstm.bias_ih_l0  # the whole sequence quantized at once
    h = c = torch.zeros(1, 2)
    outs = []
    for t in range(5):
        i, f, g, o = (xw[t] + _act(h) @ w_hh.t() + lstm.bias_hh_l0).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    out, (h_n, c_n) = sim(x)
    assert torch.allclose(out, torch.stack(outs), atol=1e-6)
    assert torch.allclose(h_n[0], h, atol=1e-6) and torch.allclose(c_n[0], c, atol=1e-6)


@torch.no_grad()
def test_cpu_w8a8_lstm_is_torch_dynamic_quantized_lstm_built_the_same_way() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True).eval()
    x = torch.randn(4, 12, 16)
    ours = get_backend("cpu").quantize_layer(lstm, get_scheme("w8a8"))
    assert isinstance(ours, Int8DynamicRNN)
    # the reference: torch.ao's module, given our int8 weights (per gate row) and its biases
    ref = torch.ao.nn.quantized.dynamic.LSTM(16, 32, num_layers=2, batch_first=True)
    ref.version = 1  # reduce_range=False: 8-bit activations, as ours
    dense = ours._dense()
    weights, start = {}, 0
    for i, (name, shape) in enumerate(zip(["weight_ih_l0", "weight_hh_l0", "weight_ih_l1",
                                           "weight_hh_l1"], ours.shapes, strict=True)):  # fmt: skip
        n = shape[0] * shape[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            weights[name] = torch._make_per_channel_quantized_tensor(
                dense[start : start + n].reshape(shape), getattr(ours, f"w_scale_{i}").double(),
                torch.zeros(shape[0], dtype=torch.long), 0,
            )  # fmt: skip
        start += n
    biases = {
        n.replace("weight", "bias"): getattr(lstm, n.replace("weight", "bias")) for n in weights
    }
    ref.set_weight_bias(weights | biases)
    (y, (h, c)), (y_ref, (h_ref, c_ref)) = ours(x), ref(x)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref) and torch.equal(c, c_ref)
    y_fp32 = lstm(x)[0]
    assert _rel(y, y_fp32) < 0.02
    # PyTorch's own quantize_dynamic (per-channel, 7-bit activations) is no closer to fp32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_q = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(lstm), {nn.LSTM: torch.ao.quantization.per_channel_dynamic_qconfig}
        )
    assert _rel(y, y_fp32) <= _rel(torch_q(x)[0], y_fp32) * 1.5


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("scheme", ["w8a8", "w4a8_pc"])
@torch.no_grad()
def test_simulate_reproduces_the_cpu_kernel_bidirectional_multilayer(kind, scheme: str) -> None:
    torch.manual_seed(0)
    rnn = kind(16, 32, num_layers=2, bidirectional=True).eval()
    x = torch.randn(10, 4, 16)  # sequence first
    simulated = get_backend("simulate").quantize_layer(rnn, get_scheme(scheme))
    exact = int8_kernel_scheme(get_scheme(scheme)) is get_scheme(scheme)  # 8-bit codes kept
    assert bool(simulated.kernel) == exact  # then simulate runs it
    cpu = get_backend("cpu").quantize_layer(rnn, get_scheme(scheme))(x)
    if exact:
        assert simulated(x)[0].equal(cpu[0])
    simulated.kernel = ()  # the loop over time steps, as on other devices
    sim = simulated(x)
    ref = rnn(x)
    assert cpu[0].shape == ref[0].shape == (10, 4, 64)
    assert _rel(cpu[0], sim[0]) < 1e-5  # the same arithmetic, float32 sums in another order
    hidden = (lambda o: o[1][0]) if kind is nn.LSTM else (lambda o: o[1])
    assert hidden(cpu).shape == hidden(ref).shape == (4, 4, 32)
    assert _rel(hidden(cpu), hidden(sim)) < 1e-5
    assert _rel(cpu[0], ref[0]) < (0.02 if scheme == "w8a8" else 0.15)


def _packed(kind: type[nn.RNNBase], bidirectional: bool) -> tuple[nn.RNNBase, tuple]:
    """A two-layer RNN and a packed batch of unsorted lengths with a given initial state."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    rnn = kind(6, 8, num_layers=2, batch_first=True, bidirectional=bidirectional).eval()
    x, lengths = torch.randn(4, 7, 6), torch.tensor([7, 3, 5, 2])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    h0 = torch.randn(2 * (2 if bidirectional else 1), 4, 8)
    return rnn, (packed, (h0, torch.randn_like(h0)) if kind is nn.LSTM else h0)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@torch.no_grad()
def test_a_packed_sequence_runs_on_every_path(kind, bidirectional: bool) -> None:
    """Bug: a PackedSequence input (variable-length batches: speech, text) raised in every
    quantized RNN ('PackedSequence' object has no attribute 'dtype'), and the profile with
    it. The simulated loop steps through the packed batch as the kernel does: with an
    identity scheme it is the layer itself; in w8a8 it equals the int8 kernel (cpu)."""
    from torch.nn.utils.rnn import PackedSequence

    rnn, args = _packed(kind, bidirectional)
    ref = rnn(*args)

    def flat(out: tuple) -> list[torch.Tensor]:
        assert isinstance(out[0], PackedSequence) and out[0].batch_sizes.equal(ref[0].batch_sizes)
        return [out[0].data, *(out[1] if kind is nn.LSTM else (out[1],))]

    loop = SimulatedRNN(rnn, get_scheme("fp32"), native=False)
    for got, want in zip(flat(loop(*args)), flat(ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for scheme in ("bf16", "w8a8"):
        cpu = get_backend("cpu").quantize_layer(rnn, get_scheme(scheme))(*args)
        simulated = get_backend("simulate").quantize_layer(rnn, get_scheme(scheme))
        simulated.kernel, simulated.fused = (), None  # the loop
        for got, want, exact in zip(flat(cpu), flat(simulated(*args)), flat(ref), strict=True):
            assert got.dtype == torch.float32
            assert _rel(got, exact) < 0.02
            if scheme == "w8a8":
                assert _rel(got, want) < 1e-5  # the same arithmetic


def test_a_packed_sequence_model_is_priced_quantized_and_exported(tmp_path) -> None:
    """measure_cost records the LSTM's PackedSequence input as a whole call and times it;
    static ranges are observed on its data; the cost model's memory is what the quantized
    model holds. torch.export cannot trace the packing (a data-dependent batch size): the
    plan and state dict are written, and the error names what was not."""
    from helpers import PackedLSTM, packed_batches

    import mpsearch as mps
    from mpsearch.cost import held_bytes
    from mpsearch.export import ExportError

    model, calib = PackedLSTM().eval(), packed_batches(3)
    cost = mps.measure_cost(model, calib[0], schemes=["bf16", "w8a8"], repeats=2, warmup=1)
    assert cost.table["supported"].all() and (cost.table["latency_ms"] > 0).all()
    plan = {"emb": "w8a8", "rnn": "w8a8", "head": "bf16"}
    quantized = mps.quantize(model, plan, backend=cost.backend, calib=calib)
    assert cost.memory_bytes(plan) == held_bytes(quantized)
    with torch.inference_mode():
        assert _rel(quantized(*calib[1]), model(*calib[1])) < 0.02
    with pytest.raises(ExportError, match=r"could not write \['onnx', 'program'\]"):
        mps.export_plan(model, plan, tmp_path, example_input=calib[0], calib=calib)
    assert {p.name for p in tmp_path.iterdir()} >= {"plan.json", "model.qstate.pt"}


@torch.no_grad()
def test_unbatched_input_and_given_state() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(8, 16).eval()
    x, h0 = torch.randn(6, 8), torch.randn(1, 16)
    for backend in ("simulate", "cpu"):
        out, h = get_backend(backend).quantize_layer(gru, get_scheme("w8a8"))(x, h0)
        ref, h_ref = gru(x, h0)
        assert out.shape == ref.shape and h.shape == h_ref.shape
        assert _rel(out, ref) < 0.02


def test_weight_only_schemes_are_refused_by_name_on_cpu() -> None:
    lstm = nn.LSTM(32, 32)
    why = get_backend("cpu").unsupported_reason(lstm, get_scheme("w4a16"))
    assert "no real kernel for 'w4a16' on LSTM" in why and "dynamic int8 RNN" in why
    with pytest.raises(ValueError, match="lstm_layer"):
        quantize(nn.ModuleDict({"lstm_layer": lstm}), "w8a16", backend="cpu")


def test_speaker_lstm_w8a8_on_cpu_agrees_with_fp32() -> None:
    wl = load_workload("speaker_lstm", n_calib=16, n_test=64)
    q = quantize(wl.model, "w8a8", backend="cpu")
    assert isinstance(q.lstm, Int8DynamicRNN)
    assert wl.evaluate(q) >= 0.95


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@torch.no_grad()
def test_float_activation_schemes_run_the_fused_kernel_on_rounded_weights(kind) -> None:
    """``bf16`` simulated is the cpu backend's bf16 layer bit for bit; a weight-only scheme is
    torch's own RNN on the fake-quantized weights, in the scheme's compute dtype."""
    torch.manual_seed(0)
    rnn = kind(32, 32, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = torch.randn(4, 10, 32)
    sim = get_backend("simulate").quantize_layer(rnn, get_scheme("bf16"))(x)
    cpu = get_backend("cpu").quantize_layer(rnn, get_scheme("bf16"))(x)
    assert torch.equal(sim[0], cpu[0])
    w4 = get_scheme("w4a16")
    ref = copy.deepcopy(rnn).bfloat16()
    for name, w in rnn.named_parameters():
        if name.startswith("weight"):
            getattr(ref, name).copy_(fake_quantize(w, w4.weight))
    got = get_backend("simulate").quantize_layer(rnn, w4)(x)[0]
    assert torch.equal(got, ref(x.bfloat16())[0].float())
    assert 0 < _rel(got, rnn(x)[0]) < 0.1


def test_simulated_int8_rnn_keeps_gradients_flowing_to_its_input() -> None:
    """Recovery fine-tunes layers before a frozen w8a8 LSTM through it: the int8 kernel has
    no autograd (its input got no gradient), so an input needing one takes the loop."""
    torch.manual_seed(0)
    sim = get_backend("simulate").quantize_layer(nn.LSTM(8, 16), get_scheme("w8a8"))
    x = torch.randn(5, 2, 8, requires_grad=True)
    looped = sim(x)[0]
    looped.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert torch.allclose(looped.detach(), sim(x.detach())[0], atol=1e-5)  # the kernel's


def _as_tuple(out: object) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)  # type: ignore[return-value]


@pytest.mark.parametrize("kind", [nn.LSTMCell, nn.GRUCell])
@torch.no_grad()
def test_a_cell_runs_as_itself_in_float_and_as_its_one_step_layer_in_int8(kind) -> None:
    """In fp32 / bf16 a cell runs itself in that dtype (exactly the user's cell in fp32), on
    ``simulate`` too; quantized, as the one-layer LSTM / GRU on one step (batched or not),
    with the cell's outputs; a weight-only scheme, the cell on its rounded weights."""
    torch.manual_seed(0)
    cell = kind(8, 16).eval()
    rnn = as_rnn(cell)
    assert rnn.weight_ih_l0 is cell.weight_ih and rnn.bias_hh_l0 is cell.bias_hh
    x, h = torch.randn(5, 8), torch.randn(5, 16)
    hx = (h, torch.randn(5, 16)) if kind is nn.LSTMCell else h

    def states(sample: slice | int, seq: bool) -> object:
        picked = tuple(t[sample][None] if seq else t[sample] for t in _as_tuple(hx))
        return picked if kind is nn.LSTMCell else picked[0]

    for scheme, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        got = _as_tuple(get_backend("cpu").quantize_layer(cell, get_scheme(scheme))(x, hx))
        cast = tuple(t.to(dtype) for t in _as_tuple(hx))
        ref = _as_tuple(
            copy.deepcopy(cell).to(dtype)(x.to(dtype), cast if len(cast) > 1 else cast[0])
        )
        assert all(torch.equal(a, b.float()) for a, b in zip(got, ref, strict=True))
        sim = _as_tuple(get_backend("simulate").quantize_layer(cell, get_scheme(scheme))(x, hx))
        assert all(torch.equal(a, b) for a, b in zip(sim, got, strict=True))
    for backend in ("cpu", "simulate"):
        q_cell = get_backend(backend).quantize_layer(cell, get_scheme("w8a8"))
        q_rnn = get_backend(backend).quantize_layer(rnn, get_scheme("w8a8"))
        got = _as_tuple(q_cell(x, hx))
        want = _as_tuple(q_rnn(x[None], states(slice(None), True))[1])
        assert all(torch.equal(a, b[0]) for a, b in zip(got, want, strict=True))
        one = _as_tuple(q_cell(x[0], states(0, False)))  # one sample, unbatched
        want = _as_tuple(q_rnn(x[:1], states(0, True))[1])
        assert all(torch.equal(a, b[0]) for a, b in zip(one, want, strict=True))
    scheme = get_scheme("w4a16_pc")  # weight-only: the cell's own kernel on rounded weights
    rounded = copy.deepcopy(cell).to(torch.bfloat16)
    for name in ("weight_ih", "weight_hh"):
        w = fake_quantize(getattr(cell, name).detach(), scheme.weight)
        getattr(rounded, name).data.copy_(w)
    got = _as_tuple(get_backend("simulate").quantize_layer(cell, scheme)(x, hx))
    cast = tuple(t.bfloat16() for t in _as_tuple(hx))
    ref = _as_tuple(rounded(x.bfloat16(), cast if len(cast) > 1 else cast[0]))
    assert all(torch.equal(a, b.float()) for a, b in zip(got, ref, strict=True))


def test_a_loop_of_cells_is_covered_profiled_on_the_graph_and_priced_exactly() -> None:
    """The zoo's research-code decoder: an LSTMCell and a GRUCell stepped in a Python loop,
    each called with its state. Every parameter is covered, the profile takes the graph runner
    and the cost model's bytes equal the quantized model's."""
    from mpsearch.cost import held_bytes, measure_cost
    from mpsearch.layers import coverage
    from mpsearch.profile import profile

    wl = load_workload("cell_decoder", n_calib=16, n_test=8, batch_size=8)
    assert coverage(wl.model).share == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the hook runner
        prof = profile(wl.model, wl.calib, schemes=["bf16", "w8a8"], progress=False)
    assert prof.info["runner"].startswith("graph:")
    assert (prof.pivot("sqnr_db").loc[["lstm", "gru"]] > 30).all().all()
    x = wl.example_input
    cost = measure_cost(wl.model, x, schemes=["fp32", "w8a8"], backend="cpu", repeats=1)
    for plan in ("w8a8", {"lstm": "w8a8", "gru": "fp32", "head": "fp32"}):
        quantized = quantize(wl.model, plan, backend="cpu")
        assert cost.memory_bytes(plan) == held_bytes(quantized)
        with torch.no_grad():
            assert _rel(quantized(x), wl.model(x)) < 0.05
