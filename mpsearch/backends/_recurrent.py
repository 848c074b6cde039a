"""LSTM and GRU layers: fake-quantized (``simulate``) and on PyTorch's dynamic int8 kernels (``cpu``).

An ``nn.LSTMCell`` / ``nn.GRUCell`` (one step, as research code calls it in a loop) keeps
the cell's inputs and outputs (``cell(x, hx) -> h'`` or ``(h', c')``). In a float dtype
(``fp32``, ``bf16``, ``fp16``, a weight-only scheme's compute) it runs itself, on its rounded
weights; where activations are quantized (the dynamic int8 kernel, ``simulate``'s loop) it
runs as the one-layer LSTM / GRU with the same gates on a sequence of one step
(:func:`as_rnn`).

Every weight matrix (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``_reverse`` too) is quantized by
the scheme's weight spec with one row per output channel: a per-channel scale is one scale per
gate row (4 gates x hidden rows for an LSTM, 3 for a GRU). Activations are quantized as PyTorch's
dynamic quantized RNN kernel (``torch.quantized_lstm`` / ``torch.quantized_gru`` on CPU) does
it: each layer's input sequence in one piece (one per-tensor range over every time step, the
input projection of both directions computed from it), the hidden state at every step. The
biases, the gate nonlinearities and the cell state stay in float32.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils import _pytree as pytree

from mpsearch.backends._kernels import (
    TORCH_DTYPES,
    RealLayer,
    _PackedInt8,
    _weight_codes,
    int8_kernel_scheme,
)
from mpsearch.layers import layer_weights
from mpsearch.schemes import Scheme, fake_quantize

CELL_TYPES = (nn.LSTMCell, nn.GRUCell)
RNN_TYPES = (nn.LSTM, nn.GRU, *CELL_TYPES)
"""The recurrent layers mpsearch quantizes: LSTM, GRU and their one-step cells."""


def as_rnn(layer: nn.Module) -> nn.RNNBase:
    """``layer`` itself, or for a cell the one-layer LSTM / GRU computing it on one step,
    holding the cell's tensors (``weight_ih`` as ``weight_ih_l0``...: PyTorch's cells and
    layers order their gates alike).

    >>> cell = nn.GRUCell(4, 8)
    >>> as_rnn(cell).weight_hh_l0 is cell.weight_hh
    True
    """
    if not isinstance(layer, CELL_TYPES):
        return layer
    kind = nn.LSTM if isinstance(layer, nn.LSTMCell) else nn.GRU
    rnn = kind(layer.input_size, layer.hidden_size, bias=layer.bias, device="meta")
    for name, tensor in layer.named_parameters():
        setattr(rnn, f"{name}_l0", tensor)
    return rnn.train(layer.training)


def _cell_call(forward: Any, x: Tensor, hx: Any) -> Any:
    """A cell's ``(h', c')`` (a GRU cell's ``h'``) from ``forward``, its layer's (x, hx) ->
    (output, hidden) on sequences: ``x`` ``[batch, in]`` or ``[in]`` as one step."""
    if hx is not None:
        hx = tuple(h.unsqueeze(0) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(0)
    _, hidden = forward(x.unsqueeze(0), hx)
    return tuple(h[0] for h in hidden) if isinstance(hidden, tuple) else hidden[0]


INT8_RNN_SCHEMES = ("w8a8", "w4a8_pc")
"""Schemes PyTorch's dynamic int8 RNN kernel runs (:class:`Int8DynamicRNN`)."""


def _states(layer: Any, hx: Any, batch: int, ref: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(h0, c0)`` shaped ``[layers * directions, batch, hidden]`` (``c0`` ``None`` for a GRU)
    for ``layer``, an LSTM / GRU or an :class:`Int8DynamicRNN`."""
    shape = (layer.num_layers * (2 if layer.bidirectional else 1), batch, layer.hidden_size)
    is_lstm = isinstance(layer, nn.LSTM) or getattr(layer, "is_lstm", False)
    if hx is None:
        zeros = ref.new_zeros(shape)
        return zeros, zeros if is_lstm else None
    if is_lstm:
        return hx[0].float().reshape(shape), hx[1].float().reshape(shape)
    return hx.float().reshape(shape), None


def _sorted_states(layer: Any, hx: Any, x: PackedSequence) -> tuple[Tensor, Tensor | None]:
    """:func:`_states` for a packed sequence, in its sorted order (as PyTorch's RNN layers
    permute them)."""
    h0, c0 = _states(layer, hx, int(x.batch_sizes[0]), x.data)
    if x.sorted_indices is None:
        return h0, c0
    return h0.index_select(1, x.sorted_indices), (
        None if c0 is None else c0.index_select(1, x.sorted_indices)
    )


def _unsorted(hidden: Any, x: PackedSequence) -> Any:
    """A packed sequence's final states back in the caller's order."""
    if x.unsorted_indices is None:
        return hidden
    return pytree.tree_map_only(Tensor, lambda t: t.index_select(1, x.unsorted_indices), hidden)


def _quantizes_activations(scheme: Scheme) -> bool:
    """Whether ``scheme`` rounds activations to an integer grid (``w8a8``), which the fused RNN
    kernel cannot do between time steps; a float cast (``bf16``) it does by its dtype."""
    act = scheme.activation
    return act is not None and not act.is_identity and act.format not in TORCH_DTYPES


def _kernel_computes_the_same(layer: nn.RNNBase, scheme: Scheme) -> bool:
    """Whether :class:`Int8DynamicRNN` runs ``scheme`` on ``layer`` exactly as
    :class:`SimulatedRNN` computes it (see its docstring)."""
    return (
        scheme.name in INT8_RNN_SCHEMES
        and "fbgemm" in torch.backends.quantized.supported_engines
        and all(w.device.type == "cpu" for w in layer.parameters())
        and int8_kernel_scheme(scheme) is scheme
    )


def _needs_grad(x: Tensor) -> bool:
    """Whether a gradient flows back through ``x`` (the int8 kernel has no autograd)."""
    return torch.is_grad_enabled() and x.requires_grad


def _lstm_cell(xw: Tensor, hw: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
    i, f, g, o = (xw + hw).chunk(4, dim=-1)
    assert c is not None
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(xw: Tensor, hw: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, None]:
    xr, xz, xn = xw.chunk(3, dim=-1)
    hr, hz, hn = hw.chunk(3, dim=-1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h, None


class SimulatedRNN(nn.Module):
    """An LSTM or GRU with fake-quantized weights (per gate row for per-channel schemes) whose
    input sequence and hidden states are fake-quantized as the dynamic int8 kernel quantizes
    them (see the module docstring); the recurrence runs in float32.

    Weight-only and float schemes (``w4a16``, ``bf16``...) quantize the weights alone: the
    layer then runs in the scheme's compute dtype on PyTorch's own fused RNN kernel, as a
    :class:`SimulatedLayer` runs its matrix product (for ``bf16`` that is exactly the ``cpu``
    backend's :class:`CastRNN`), instead of a Python loop over time steps. ``w8a8`` and
    ``w4a8_pc`` on CPU tensors run :class:`Int8DynamicRNN` where it computes this very
    arithmetic (fbgemm present, codes not narrowed by :func:`int8_kernel_scheme`): the same
    numbers up to the order of float32 sums, about twice as fast as the loop (the kernel is
    held outside the module tree: CPU-only, not part of the state; it has no autograd, so
    an input needing a gradient takes the loop). While ``torch.export``
    traces it (``.pt2`` and ONNX export), the loop runs: plain operations every exporter
    takes, where for float schemes the input, the states and the weights are rounded to the
    compute dtype and the arithmetic is float32 (ONNX has no bf16 LSTM). ``native=False``
    keeps that loop for float schemes too: the profiler's emulation on CPUs without bf16 /
    fp16 units, where the fused kernel in those dtypes takes a slow path.
    Activation ranges are always dynamic, as in the real kernel: a static ``act_range`` is not
    taken. Inputs: a tensor (batched or not), ``batch_first`` as the layer; ``hx`` optional.
    """

    def __init__(
        self,
        layer: nn.RNNBase,
        scheme: Scheme,
        *,
        act_range: tuple[float, float] | None = None,
        native: bool = True,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.layer_type = type(layer).__name__
        self.is_cell = isinstance(layer, CELL_TYPES)
        given, layer = layer, as_rnn(layer)
        self.inner = layer
        self.cell = _lstm_cell if isinstance(layer, nn.LSTM) else _gru_cell
        dtype = TORCH_DTYPES[scheme.compute_dtype]
        rounded = {
            name: fake_quantize(w.detach().float(), scheme.weight).to(dtype)
            for name, w in layer_weights(layer).items()
        }
        self.weights_q = nn.ParameterList(
            nn.Parameter(w.float(), requires_grad=False) for w in rounded.values()
        )
        self.fused: CastRNN | None = None
        if native and not _quantizes_activations(scheme):
            self.fused = CastRNN(given, scheme)  # a cell as a cell, as on ``cpu``
            with torch.no_grad():
                for name, w in rounded.items():
                    own = name.removesuffix("_l0") if self.is_cell else name
                    getattr(self.fused.inner, own).copy_(w)
        self.kernel: tuple[Int8DynamicRNN, ...] = ()  # a tuple: not a submodule
        if _kernel_computes_the_same(layer, scheme):
            self.kernel = (Int8DynamicRNN(layer, scheme),)

    def _act(self, x: Tensor) -> Tensor:
        act = self.scheme.activation
        return x if act is None or act.is_identity else fake_quantize(x, act)

    def _bias(self, name: str) -> Tensor | None:
        bias = getattr(self.inner, name, None) if self.inner.bias else None
        return None if bias is None else bias.detach().float()

    def forward(self, x: Tensor, hx: Any = None) -> Any:
        if self.fused is not None and not torch.compiler.is_exporting():
            return self.fused(x, hx)
        if self.is_cell:
            return _cell_call(self._sequence, x, hx)
        return self._sequence(x, hx)

    def _sequence(self, x: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
        if not torch.compiler.is_exporting():
            data = x.data if isinstance(x, PackedSequence) else x
            if self.kernel and data.device.type == "cpu" and not _needs_grad(data):
                return self.kernel[0](x, hx)
        if isinstance(x, PackedSequence):
            return self._packed_sequence(x, hx)
        layer = self.inner
        out_dtype = x.dtype
        batched = x.dim() == 3
        seq = x if not batched else (x.transpose(0, 1) if layer.batch_first else x)
        seq = (seq if batched else seq.unsqueeze(1)).float()
        if hx is not None and not batched:
            hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        steps, batch = seq.shape[:2]
        rows, hidden = self._steps(
            seq.flatten(0, 1), [batch] * steps, *_states(layer, hx, batch, seq)
        )
        out = rows.unflatten(0, (steps, batch))
        out = out if not batched else (out.transpose(0, 1) if layer.batch_first else out)
        out = out.to(out_dtype) if batched else out.squeeze(1).to(out_dtype)
        hidden = pytree.tree_map_only(Tensor, lambda t: t.to(out_dtype), hidden)
        if not batched:
            hidden = pytree.tree_map_only(Tensor, lambda t: t.squeeze(1), hidden)
        return out, hidden

    def _packed_sequence(self, x: PackedSequence, hx: Any) -> tuple[PackedSequence, Any]:
        """A packed sequence, its states in sorted order (see :meth:`_steps`)."""
        rows, hidden = self._steps(
            x.data.float(), x.batch_sizes.tolist(), *_sorted_states(self.inner, hx, x)
        )
        out_dtype = x.data.dtype
        out = PackedSequence(
            rows.to(out_dtype), x.batch_sizes, x.sorted_indices, x.unsorted_indices
        )
        return out, _unsorted(pytree.tree_map_only(Tensor, lambda t: t.to(out_dtype), hidden), x)

    def _steps(
        self, data: Tensor, sizes: list[int], h0: Tensor, c0: Tensor | None
    ) -> tuple[Tensor, Any]:
        """The layers on ``data``, the rows of every step in turn (step ``t``: the first
        ``sizes[t]`` sequences, those still running, as a packed batch holds them), as the
        kernel steps through them: each layer's input projection from all its rows at once,
        then at each step the running sequences' hidden states quantized together. The
        output rows and the final ``h_n`` (``(h_n, c_n)`` for an LSTM)."""
        layer = self.inner
        starts = [0, *itertools.accumulate(sizes)]
        directions = 2 if layer.bidirectional else 1
        h_n: list[Tensor] = []
        c_n: list[Tensor | None] = []
        for k in range(layer.num_layers):
            xq = self._act(data)  # all steps at once, as the kernel's input projection
            outs = []
            for d in range(directions):
                j = k * directions + d
                sfx = f"_l{k}{'_reverse' if d else ''}"
                xw = F.linear(xq, self.weights_q[2 * j], self._bias(f"bias_ih{sfx}"))
                w_hh, b_hh = self.weights_q[2 * j + 1], self._bias(f"bias_hh{sfx}")
                h, c = h0[j], None if c0 is None else c0[j]
                ys: list[Tensor] = [h] * len(sizes)
                for t in range(len(sizes) - 1, -1, -1) if d else range(len(sizes)):
                    n, rows = sizes[t], xw[starts[t] : starts[t] + sizes[t]]
                    hw = F.linear(self._act(h[:n]), w_hh, b_hh)
                    h_t, c_t = self.cell(rows, hw, h[:n], None if c is None else c[:n])
                    # the sequences that finished keep their last state
                    h = h_t if n == len(h) else torch.cat([h_t, h[n:]])
                    if c is not None and c_t is not None:
                        c = c_t if n == len(c) else torch.cat([c_t, c[n:]])
                    ys[t] = h_t
                outs.append(torch.cat(ys))
                h_n.append(h)
                c_n.append(c)
            data = torch.cat(outs, dim=1) if directions == 2 else outs[0]
        h_t = torch.stack(h_n)
        return data, h_t if c0 is None else (h_t, torch.stack(c_n))  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"{self.layer_type}, scheme={self.scheme.name!r}"


def _is_packed(value: Any) -> bool:
    return isinstance(value, PackedSequence)


class CastRNN(RealLayer):
    """The LSTM / GRU (or cell) itself with its weights in the scheme's dtype (``fp32``,
    ``bf16``, ``fp16``): inputs cast to it, outputs cast back to the input's dtype. A cell runs
    as a cell: in fp32 the user's cell took 39 us a step where its one-step LSTM took 127 us
    (hidden 96, batch 8, AMD EPYC Zen 4, 2 threads)."""

    def __init__(
        self, layer: nn.Module, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        self.dtype = TORCH_DTYPES[scheme.compute_dtype]
        self.inner = copy.deepcopy(layer).to(self.dtype).requires_grad_(False)

    def forward(self, x: Tensor, hx: Any = None) -> Any:
        out_dtype = x.data.dtype  # a PackedSequence's too
        if out_dtype == self.dtype:
            return self.inner(x, hx)
        if hx is not None:
            hx = tuple(h.to(self.dtype) for h in hx) if isinstance(hx, tuple) else hx.to(self.dtype)
        out = self.inner(x.to(self.dtype), hx)  # a PackedSequence's indices keep their dtype
        return pytree.tree_map_only(
            (Tensor, PackedSequence), lambda t: t.to(out_dtype), out, is_leaf=_is_packed
        )


class Int8DynamicRNN(_PackedInt8):
    """``w8a8`` (and ``w4a8_pc``: 4-bit codes held in int8) LSTM / GRU on PyTorch's dynamic
    quantized RNN kernel (``torch.quantized_lstm`` / ``torch.quantized_gru``, fbgemm packed
    weights), as ``torch.ao.nn.quantized.dynamic.LSTM`` / ``GRU`` run it.

    Built as ``torch.ao.quantization.quantize_dynamic`` builds those modules (each matrix
    quantized, packed with its bias by ``quantized::linear_prepack``, a layer-direction's pair
    made into cell parameters by ``quantized::make_quantized_cell_params_dynamic``) with two
    differences: the weights are the scheme's per-gate-row codes and scales (those of
    ``simulate``; 7-bit where the int8 kernels saturate, :func:`int8_kernel_scheme`), and the
    activations keep their 8 bits (``reduce_range=False``; PyTorch passes ``True``, 7 bits).
    Per-tensor dynamic activations only: a static ``act_range`` is not taken.

    Stored: the int8 codes of every matrix (packed by fbgemm, counted from their shape), their
    float32 scales and the float32 biases.
    """

    def __init__(
        self, layer: nn.RNNBase, scheme: Scheme, *, act_range: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        self.scheme_name = scheme.name
        self.is_cell = isinstance(layer, CELL_TYPES)
        layer = as_rnn(layer)
        self.is_lstm = isinstance(layer, nn.LSTM)
        self.num_layers, self.bidirectional = layer.num_layers, layer.bidirectional
        self.batch_first = layer.batch_first
        self.hidden_size = layer.hidden_size
        kernel_scheme = int8_kernel_scheme(scheme)
        weights = layer_weights(layer)
        self.shapes = [tuple(w.shape) for w in weights.values()]
        codes = []
        for i, (name, w) in enumerate(weights.items()):
            c, scale, _ = _weight_codes(w, kernel_scheme)
            codes.append(c.reshape(-1))
            self.register_buffer(f"w_scale_{i}", scale.float().contiguous())
            bias_name = name.replace("weight", "bias")
            bias = getattr(layer, bias_name) if layer.bias else torch.zeros(w.shape[0])
            self.register_buffer(f"bias_{i}", bias.detach().float().clone())
        self._packed = self._pack(torch.cat(codes).to(torch.int8))

    def _pack(self, codes: Tensor) -> Any:
        """One ``CellParamsBase`` per layer and direction from the flat int8 codes."""
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            packed, start = [], 0
            for i, shape in enumerate(self.shapes):
                n = shape[0] * shape[1]
                scale = getattr(self, f"w_scale_{i}")
                with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors
                    warnings.simplefilter("ignore", UserWarning)
                    qweight = torch._make_per_channel_quantized_tensor(
                        codes[start : start + n].reshape(shape).contiguous(),
                        scale.double(),
                        torch.zeros(shape[0], dtype=torch.long),
                        0,
                    )
                packed.append(
                    torch.ops.quantized.linear_prepack(qweight, getattr(self, f"bias_{i}"))
                )
                start += n
            make = torch.ops.quantized.make_quantized_cell_params_dynamic
            return [
                make(packed[i], packed[i + 1], self.bias_at(i), self.bias_at(i + 1), False)
                for i in range(0, len(packed), 2)
            ]
        finally:
            torch.backends.quantized.engine = engine

    def bias_at(self, i: int) -> Tensor:
        return getattr(self, f"bias_{i}")

    def _dense(self) -> Tensor:
        dense = []
        for cell in self._packed:
            # state: (version, [biases], [], [reduce_range], [packed w_ih, packed w_hh])
            for p in cell.__getstate__()[0][4]:
                qweight, _ = torch.ops.quantized.linear_unpack(p)
                dense.append(qweight.int_repr().reshape(-1))
        return torch.cat(dense)

    def packed_tensors(self) -> dict[str, Tensor]:
        numel = sum(a * b for a, b in self.shapes)
        return {"packed_weight": torch.empty(numel, dtype=torch.int8, device="meta")}

    def forward(self, x: Tensor, hx: Any = None) -> Any:
        if self.is_cell:
            return _cell_call(self._sequence, x, hx)
        return self._sequence(x, hx)

    def _sequence(self, x: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
        if isinstance(x, PackedSequence):
            return self._packed_sequence(x, hx)
        out_dtype = x.dtype
        x = x.float()
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(1)
        batch = x.shape[0] if batched and self.batch_first else x.shape[1]
        shape = (self.num_layers * (2 if self.bidirectional else 1), batch, self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(shape)
            hx = (zeros, zeros) if self.is_lstm else zeros
        elif isinstance(hx, tuple):
            hx = tuple(h.float().reshape(shape) for h in hx)
        else:
            hx = hx.float().reshape(shape)
        batch_first = self.batch_first and batched
        if self.is_lstm:
            out, h, c = torch.quantized_lstm(
                x, hx, self._packed, True, self.num_layers, 0.0, False, self.bidirectional,
                batch_first, dtype=torch.qint8, use_dynamic=True,
            )  # fmt: skip
            hidden: Any = (h, c)
        else:
            out, hidden = torch.quantized_gru(
                x, hx, self._packed, True, self.num_layers, 0.0, False, self.bidirectional,
                batch_first,
            )  # fmt: skip
        if not batched:
            out = out.squeeze(1)
            hidden = tuple(t.squeeze(1) for t in hidden) if self.is_lstm else hidden.squeeze(1)
        if self.is_lstm:
            return out.to(out_dtype), tuple(t.to(out_dtype) for t in hidden)
        return out.to(out_dtype), hidden.to(out_dtype)

    def _packed_sequence(self, x: PackedSequence, hx: Any) -> tuple[PackedSequence, Any]:
        """A packed sequence: the kernel's packed form, as the dynamic quantized LSTM / GRU
        modules call it (states in sorted order)."""
        out_dtype = x.data.dtype
        h0, c0 = _sorted_states(self, hx, x)
        data, sizes = x.data.float(), x.batch_sizes
        settings = (True, self.num_layers, 0.0, False, self.bidirectional)
        if self.is_lstm:
            out, h, c = torch.quantized_lstm(
                data, sizes, (h0, c0), self._packed, *settings,
                dtype=torch.qint8, use_dynamic=True,
            )  # fmt: skip
            hidden: Any = (h.to(out_dtype), c.to(out_dtype))
        else:
            out, h = torch.quantized_gru(data, sizes, h0, self._packed, *settings)
            hidden = h.to(out_dtype)
        packed = PackedSequence(out.to(out_dtype), sizes, x.sorted_indices, x.unsorted_indices)
        return packed, _unsorted(hidden, x)


__all__ = ["CELL_TYPES", "RNN_TYPES", "CastRNN", "Int8DynamicRNN", "SimulatedRNN", "as_rnn"]
