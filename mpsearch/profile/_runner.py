"""Running one layer's quantized variants through the rest of the model.

Two runners share one interface:

- ``GraphRunner`` (the fast path): the model is captured as one graph (``torch.fx``, else
  ``torch.export``: :mod:`mpsearch.profile._capture`). One fp32 pass per
  calibration batch stores the values the later runs need: each layer's input and output, and
  every value a layer's *suffix* (the nodes downstream of it) reads from outside the suffix.
  For a (layer, batch), the S quantized outputs are computed from the cached input and only the
  suffix is re-executed: several schemes at once, concatenated along the batch dimension, when
  the model was checked to be batch-independent and that saves work (small activations, or
  large weights used for few rows: see ``CONCAT_BYTES``), else once per scheme. Nodes run in a
  ``torch.fx.Interpreter`` started from an initial environment (the cached values), and a slow
  CPU operation with an exact faster equivalent (max pooling) runs that
  (:mod:`mpsearch.profile._fastops`).
  A layer called more than once (weights shared across depth, as in ALBERT, or a cell
  applied at every step of a loop) has every call in its suffix: each variant re-runs the
  nodes from its first call on, in the layer's place at every call.
- ``HookRunner`` (the fallback when no capture works): a forward hook substitutes the layer's
  output and the whole model is re-run per scheme.

An ``nn.MultiheadAttention``'s ``out_proj`` is never called (its weight and bias are passed to
``F.multi_head_attention_forward``), but the attention module's first output is exactly
``out_proj`` of its attention output: the attention module stands for it (its *host*, see
:func:`host_of`). Its local error is measured on that first output, and a quantized variant's
output is the attention module re-run on its own inputs with ``out_proj`` swapped for the
variant (:func:`mpsearch.layers.swapped`).

A runner's ``mode`` names it and how the graph was captured (``graph:fx``,
``graph:fx(concrete_args)``, ``graph:fx(values)``, ``graph:export``, ``hooks``); ``fallbacks`` gives why each capture
tried before it failed.

Both measure local errors on the leading ``n_local_batches`` calibration batches (how many:
:func:`mpsearch.profile._e2e.choose_local_samples`; the graph runner on the e2e batches where
:func:`mpsearch.profile._e2e.local_on_e2e` says so) and end-to-end errors on the *e2e batches*
(``prepare_e2e``): all calibration samples, their first ones, or a classifier's least certain
ones (how many: :func:`mpsearch.profile._e2e.choose_e2e_samples`; which:
``mpsearch.profile._profile._pick``). The leading e2e batches that are whole
calibration batches are *shared* (``n_shared``): one run gives a layer's local pairs and its
final outputs there. The graph runner keeps everything a suffix reads only for the batches it
will share, and the start's inputs for the other local batches; a cut batch gets its own fp32
pass, and the batches past both get one only when :meth:`GraphRunner.all_outputs` is asked
for (to pick the least certain samples).
"""

from __future__ import annotations

import copy
import math
import operator
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle

from mpsearch._data import Batch, batch_size, copied, main_output, output_tensor, run_model
from mpsearch._validation import exception_line
from mpsearch.backends._quantize import read_directly
from mpsearch.layers import is_quantizable, swapped
from mpsearch.layers._batchnorm import fold_graph
from mpsearch.layers._experts import is_expert_bank
from mpsearch.layers._layers import TENSOR_METADATA
from mpsearch.profile._capture import CAPTURES, Capture, Unsupported
from mpsearch.profile._e2e import (
    choose_e2e_samples,
    first_samples,
    local_batches,
    rows_per_sample,
    total_samples,
    whole_batches,
)
from mpsearch.profile._fastops import fast_call, has_node

Pair = tuple[Tensor, Tensor]
Finals = list[Tensor]
"""A layer's variants' final outputs on one batch, one each (a variant may change the
output's shape: :func:`mpsearch.profile._profile.stack_finals`)."""
HostCall = tuple[tuple[Any, ...], dict[str, Any], Any]
"""One call of a layer's host in an fp32 pass: its arguments, keyword arguments and output."""

HOOK_CACHE_BYTES = 512 * 1024**2
"""Most bytes of host inputs and outputs the hook runner keeps from its fp32 passes over the
local batches: one recording pass per batch then gives every layer's local pairs (replayed on
the host alone). Past it, each layer's local pairs take a whole-model fp32 pass of their own
per batch."""

CONCAT_BYTES = 256 * 1024
"""How many of a layer's quantized variants are re-run downstream at once, concatenated along
the batch dimension: as many as keep the run's largest value (per variant, times the number of
variants) within this many bytes, or within the bytes of the suffix's weight-bound weights when
those are more (see :data:`WEIGHT_REUSE`). Concatenation saves per-operation overhead on small
tensors and re-reads of large weights; on large activations it only grows the working set.
Measured at 1 thread (profile time / fp32 pass, all variants at once -> this rule): digits CNN
7.7 -> 6.8 (10x fewer page faults), text transformer 11.4 -> 9.9, ResNet-18 7.8 -> 7.7, the
char MLP (1536-wide Linear layers at batch 32) 9.9 either way, 11.3 one variant at a time."""

WEIGHT_REUSE = 256
"""A weight used for fewer multiply-accumulates per element than this in one run (e.g. a Linear
layer on 32 rows) is weight-bound: each separate run streams it from memory again."""

_INPLACE_FUNCTIONS: dict[Any, Any] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def _set_copy(target: Tensor, key: Any, value: Any) -> Tensor:
    """A copy of ``target`` with ``copy[key] = value``."""
    out = target.clone()
    out[key] = value
    return out


def _remove_inplace(gm: fx.GraphModule) -> None:
    """Rewrite in-place ops out of ``gm`` so that cached values are never mutated by later ops.

    An in-place method ``x.scatter_(...)`` becomes its out-of-place form, and an item
    assignment ``x[key] = value`` a copy of ``x`` with the item set: the nodes after it that
    read ``x`` read the result. Where ``x`` is a view of another value the model reads later,
    that value misses the change: the check of the graph against the model's own output
    refuses such a graph.
    """
    changed = False
    for module in gm.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    position = {node: i for i, node in enumerate(gm.graph.nodes)}

    def read_after(node: fx.Node, new: fx.Node) -> None:
        """The nodes after ``node`` that read its first argument read ``new`` instead."""
        target = node.args[0]
        for user in list(target.users):
            if user in position and position[user] > position[node]:
                user.replace_input_with(target, new)

    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is operator.setitem:
            with gm.graph.inserting_before(node):
                copied = gm.graph.call_function(_set_copy, node.args)
            read_after(node, copied)
            gm.graph.erase_node(node)
            changed = True
        elif node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
            node.target = _INPLACE_FUNCTIONS[node.target]
            changed = True
        elif (
            node.op == "call_method"
            and node.target.endswith("_")
            and not node.target.startswith("_")
        ):
            plain = node.target[:-1]
            if hasattr(torch.Tensor, plain):  # x.scatter_(...): x read later is the result
                node.target = plain
                read_after(node, node)
                changed = True
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            changed = True
    if changed:
        gm.recompile()


def _close(a: Tensor, b: Tensor, rtol: float) -> bool:
    """Whether ``a`` reproduces ``b``: the same shape, NaN and infinities at the same places
    (a model whose output is not finite is refused by the caller, not by a capture), the
    rest within ``rtol`` of ``b``'s largest value."""
    if a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    if not bool(finite.all()):
        special = (torch.isnan, torch.isposinf, torch.isneginf)
        if not all(torch.equal(f(a), f(b)) for f in special):
            return False
        a, b = a[finite], b[finite]
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool((a - b).abs().max() <= rtol * (scale + 1e-12)) if a.numel() else True


class GraphRunner:
    """The fast path on a captured graph (see the module docstring)."""

    def __init__(
        self,
        capture: Capture,
        batches: Sequence[Batch],
        layers: Sequence[str],
        *,
        mode: str,
        e2e_samples: Any = None,
        local_samples: Any = None,
    ) -> None:
        gm = capture.gm
        self.gm = gm
        self.capture = capture
        self.mode = mode
        self.fallbacks: dict[str, str] = {}
        self.capture_s = 0.0  # seconds spent capturing the graph (set by build_runner)
        self.output_name: str | None = None  # the main output's name (set by build_runner)
        self.batches = batches
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.output_node = next(n for n in self.nodes if n.op == "output")
        hosted = {host_of(gm, name): name for name in layers}
        calls: dict[str, list[fx.Node]] = {}
        for node in self.nodes:
            if node.op == "call_module" and node.target in hosted:
                calls.setdefault(hosted[node.target], []).append(node)
        for name, found in calls.items():
            plain = found[0].target == name and not is_expert_bank(gm.get_submodule(name))
            if len(found) > 1 and not plain:
                raise Unsupported(f"layer {name!r} is called {len(found)} times by its host")
        self.layer_node = {name: found[0] for name, found in calls.items()}
        self.layer_calls = calls
        self.repeated = {name for name, found in calls.items() if len(found) > 1}
        self.called = set(self.layer_node)
        # candidates, confirmed on the model by ``_graph_runner``: a flattened graph does not
        # say which module read a weight tied to another (Llama's lm_head and embedding)
        self.read_directly = _params_read(gm, self.nodes, self.called)
        position = {node: i for i, node in enumerate(self.nodes)}
        self.suffix: dict[str, list[fx.Node]] = {}
        self.boundary: dict[str, set[fx.Node]] = {}
        keep: set[fx.Node] = set()
        local_keep: set[fx.Node] = set()
        for name, found in calls.items():
            start = found[0]
            down = set(found)
            for node in self.nodes[position[start] + 1 :]:
                if any(a in down for a in node.all_input_nodes):
                    down.add(node)
            # a layer called once: its quantized output is given, the nodes after it re-run;
            # called more often: every call runs (in place of the layer) with what precedes it.
            # The output always runs: a layer may not reach the main output (an audio codec's
            # decoder where that output is a loss), which its variants then leave unchanged
            down.add(self.output_node)
            suffix = [n for n in self.nodes if n in down and (n is not start or len(found) > 1)]
            border = {a for n in suffix for a in n.all_input_nodes if a not in down}
            self.suffix[name] = suffix
            self.boundary[name] = border
            calls_io = {n for call in found for n in (call, *call.all_input_nodes)}
            keep |= border | calls_io
            local_keep |= calls_io
        keep |= set(self.output_node.all_input_nodes)
        self.keep = keep
        self.local_keep = local_keep
        self.layers = list(layers)
        self.executor = _Executor(gm)
        with torch.inference_mode():
            env, self.node_cost = self._execute_counting(batches[0])
        self.outputs: list[Tensor] = [self._final(env)]  # checked by the caller
        self.node_bytes = {n: _nbytes(v) for n, v in env.items()}
        self.streamed = _streamed_weights(self.gm, self.nodes, env, self.node_cost)
        self._choose_samples(e2e_samples, local_samples)
        self.n_full = whole_batches(batches, self.n_e2e)  # leading batches stored with ``keep``
        self.store: list[dict[fx.Node, Any]] = [
            {n: env[n] for n in (keep if self.n_full else local_keep)}
        ]
        self.e2e_batches: Sequence[Batch] = batches
        self.e2e_store = self.store
        self.reference = self.outputs
        self.n_shared = len(batches)
        self.local_on_e2e = False
        self.batchable: dict[str, bool] = {}
        self.kinds: dict[fx.Node, str] = {}
        self.group: dict[str, int] = {}

    def _choose_samples(self, e2e_samples: Any, local_samples: Any) -> None:
        """``n_e2e`` (:func:`choose_e2e_samples`), and the ``n_local_batches`` local batches,
        ``n_local`` samples (:func:`local_batches`)."""
        self.n_e2e = choose_e2e_samples(
            e2e_samples,
            total_samples(self.batches),
            self.downstream_passes(),
            rows_per_sample=rows_per_sample(self.outputs[0]),
        )
        self.n_local_batches, self.n_local = local_batches(local_samples, self.batches, self.n_e2e)

    def all_outputs(self) -> list[Tensor]:
        """The fp32 outputs of every calibration batch: those not run yet get a pass (storing
        what the local errors read, nothing past them) the first time they are asked for."""
        self._fill_store(self.n_local_batches)
        with torch.inference_mode():
            for i in range(len(self.outputs), len(self.batches)):
                self.outputs.append(self._checked(i, self._execute_all(self.batches[i], set())))
        return self.outputs

    def _checked(self, i: int, env: dict[fx.Node, Any]) -> Tensor:
        """The output of calibration batch ``i`` in ``env`` (see :func:`checked_output`)."""
        return checked_output(i, self._final(env))

    def _fill_store(self, n: int) -> None:
        """Store the values of the first ``n`` calibration batches the later runs read: all of
        ``keep`` for the :attr:`n_full` leading ones, the layers' inputs and outputs for the
        others. Filled when the batches to share are known: a classifier's least certain
        samples share none, and storing values costs fresh memory (on the zoo's ``flag_net``,
        a pass that keeps them ran 2.6x slower than one that drops them)."""
        with torch.inference_mode():
            for i in range(len(self.store), n):
                wanted = self.keep if i < self.n_full else self.local_keep
                env = self._execute_all(self.batches[i], wanted)
                self.store.append({node: env[node] for node in wanted})
                if i == len(self.outputs):
                    self.outputs.append(self._checked(i, env))

    def downstream_passes(self) -> float:
        """End-to-end work per scheme on all batches, in fp32 passes: sum of suffix costs."""
        total = sum(self.node_cost.values())
        if total <= 0:
            return float(len(self.layer_node))
        down = sum(self.node_cost[n] for suffix in self.suffix.values() for n in suffix)
        return down / total

    def prepare_e2e(self, e2e_batches: Sequence[Batch]) -> None:
        """Measure end-to-end errors on ``e2e_batches``: the leading ones that are calibration
        batches with a full store are shared, the others get an fp32 pass."""
        shared = 0
        while (
            shared < min(len(e2e_batches), self.n_full)
            and e2e_batches[shared] is self.batches[shared]
        ):
            shared += 1
        self._fill_store(max(shared, self.n_local_batches))
        self.e2e_store, self.reference = self.store[:shared], self.outputs[:shared]
        with torch.inference_mode():
            for batch in e2e_batches[shared:]:
                env = self._execute_all(batch)
                self.e2e_store.append({n: env[n] for n in self.keep})
                self.reference.append(self._final(env))
        self.e2e_batches = e2e_batches
        self.n_shared = shared
        self.batchable = self._check_batching(self.layers)
        for name, start in self.layer_node.items():
            largest = max(self.node_bytes.get(n, 0) for n in (start, *self.suffix[name]))
            streamed = sum(self.streamed.get(n, 0) for n in self.suffix[name])
            self.group[name] = max(1, max(CONCAT_BYTES, streamed) // max(largest, 1))

    # -- execution -------------------------------------------------------------------------
    def _input_env(self, batch: Batch) -> dict[fx.Node, Any]:
        """The placeholders' values for ``batch``."""
        return dict(zip(self.placeholders, self.capture.inputs(batch), strict=True))

    def output_of(self, batch: Batch) -> Tensor:
        """The fp32 output of ``batch`` (the main output tensor, float)."""
        return self._final(self._execute_all(batch, set()))

    def _final(self, env: dict[fx.Node, Any]) -> Tensor:
        """The main output tensor (float) in a completed environment."""
        return self.capture.output(env[self.output_node]).float()

    def _execute_all(self, batch: Batch, keep: set[fx.Node] | None = None) -> dict[fx.Node, Any]:
        """The values of the nodes in ``keep`` (default ``self.keep``) and the output on
        ``batch``."""
        keep = self.keep if keep is None else keep
        return self.executor.execute(self._input_env(batch), self.nodes, keep=keep)

    def _execute_counting(self, batch: Batch) -> tuple[dict[fx.Node, Any], dict[fx.Node, float]]:
        """Every node's value on ``batch`` and its work estimate (see :func:`_node_costs`)."""
        env, flops = self.executor.execute_counting(self._input_env(batch))
        return env, _node_costs(self.nodes, env, flops)

    def _check_batching(self, layers: Sequence[str]) -> dict[str, bool]:
        """Which layers' suffixes may run all schemes at once, concatenated along dim 0.

        The first batch is also run as its first half. The model must give the same outputs
        for that half (so samples do not interact), and every value a suffix reads from
        outside must either have the batch as its leading dimension or not depend on the batch
        size at all (a batch size read as an int would break concatenation).
        """
        no = dict.fromkeys(self.layer_node, False)
        batch = self.e2e_batches[0]
        full = batch_size(batch)
        half = full // 2
        env = _first_half(batch, self.reference[0], self._execute_all, self._final)
        if env is None:
            return no
        kinds: dict[fx.Node, str] = {}
        for node in self.keep:
            kinds[node] = _kind(self.e2e_store[0][node], env[node], full, half)
        result = {}
        for name, start in self.layer_node.items():
            result[name] = (
                name not in self.repeated
                and kinds[start] == "batch"
                and all(kinds[n] != "unsafe" for n in self.boundary[name])
            )
        self.kinds = kinds
        return result

    def _quantized(
        self, layer: str, qlayers: Sequence[nn.Module], store: dict[fx.Node, Any]
    ) -> tuple[Any, list[Any]]:
        """The fp32 output of ``layer``'s node and each variant's (a tuple for an attention
        module hosting its ``out_proj``)."""
        start = self.layer_node[layer]
        args, kwargs = fx.node.map_arg((start.args, start.kwargs), store.__getitem__)
        host = self.executor.modules[start.target]
        return store[start], _variants(self.gm, layer, qlayers, host, args, kwargs)

    def _downstream(
        self, layer: str, outs_q: Sequence[Tensor], store: dict[fx.Node, Any]
    ) -> Finals:
        """Final outputs, one per output in ``outs_q``: the suffix of ``layer`` re-run on each.

        Batchable layers run up to ``self.group[layer]`` variants at once, concatenated along
        the batch dimension (fewer, larger operations); the others one variant at a time (a
        layer whose node gives a tuple, e.g. an attention module hosting its ``out_proj``, is
        never batchable: :func:`_kind` finds it ``unsafe``).
        """
        size = self.group.get(layer, 1) if self.batchable.get(layer, False) else 1
        if size > 1:
            try:
                return self._downstream_in_groups(layer, outs_q, store, size)
            except Exception:  # samples the suffix cannot take together (a PackedSequence's
                self.batchable[layer] = False  # lengths repeated are unsorted): one at a time
        return self._downstream_in_groups(layer, outs_q, store, 1)

    def _downstream_in_groups(
        self, layer: str, outs_q: Sequence[Tensor], store: dict[fx.Node, Any], size: int
    ) -> Finals:
        """:meth:`_downstream`, ``size`` variants per run."""
        start = self.layer_node[layer]
        border = self.boundary[layer]
        finals = []
        for i in range(0, len(outs_q), size):
            chunk = outs_q[i : i + size]
            n = len(chunk)
            env: dict[fx.Node, Any] = {}
            if n > 1:
                for node in border:
                    value = store[node]
                    env[node] = _repeat(value, n) if self.kinds[node] == "batch" else value
                env[start] = torch.cat(chunk)
            else:
                env.update((node, store[node]) for node in border)
                env[start] = chunk[0]
            out = self._final(self.executor.execute(env, self.suffix[layer]))
            finals.extend(out.unflatten(0, (n, -1)).unbind(0) if n > 1 else [out])
        return finals

    def _substituted(
        self, layer: str, qlayers: Sequence[nn.Module], store: dict[fx.Node, Any]
    ) -> Finals:
        """Final outputs, one per variant, of a layer called more than once: per variant,
        the suffix (every call included) re-run with the variant in the layer's place."""
        target = self.layer_node[layer].target
        original = self.executor.modules[target]
        finals = []
        for q in qlayers:
            self.executor.modules[target] = q
            try:
                env = {node: store[node] for node in self.boundary[layer]}
                finals.append(self._final(self.executor.execute(env, self.suffix[layer])))
            finally:
                self.executor.modules[target] = original
        return finals

    def run(
        self, layer: str, qlayers: Sequence[nn.Module], b: int
    ) -> tuple[list[list[Pair]], Finals]:
        """Local (reference, quantized) output pairs and final outputs on shared batch b
        (one per variant)."""
        return self._run(layer, qlayers, self.store[b])

    def local(self, layer: str, qlayers: Sequence[nn.Module], b: int) -> list[list[Pair]]:
        """Local (reference, quantized) output pairs of ``layer`` on calibration batch b."""
        return self._run(layer, qlayers, self.store[b], downstream=False)[0]

    def e2e(
        self, layer: str, qlayers: Sequence[nn.Module], b: int
    ) -> tuple[list[list[Pair]], Finals]:
        """Local pairs and final outputs on e2e batch b (one per variant of the layer)."""
        return self._run(layer, qlayers, self.e2e_store[b])

    def _run(
        self,
        layer: str,
        qlayers: Sequence[nn.Module],
        store: dict[fx.Node, Any],
        *,
        downstream: bool = True,
    ) -> tuple[list[list[Pair]], Finals]:
        """Local pairs, at each call of ``layer`` on its fp32 input, and (if ``downstream``, else
        none) the final outputs."""
        none: Finals = []
        if layer in self.repeated:
            inputs = [
                (c, fx.node.map_arg((c.args, c.kwargs), store.__getitem__))
                for c in self.layer_calls[layer]
            ]
            pairs = [[(store[c], q(*a, **k)) for c, (a, k) in inputs] for q in qlayers]
            return pairs, self._substituted(layer, qlayers, store) if downstream else none
        y_ref, outs_q = self._quantized(layer, qlayers, store)
        finals = self._downstream(layer, outs_q, store) if downstream else none
        return [[(y_ref, y)] for y in outs_q], finals

    def use_e2e_for_local(self) -> None:
        """Measure local errors on the e2e batches, from the runs that give the end-to-end
        errors, instead of on separate runs over the leading calibration batches."""
        self.local_on_e2e = True
        self.n_local_batches, self.n_local = 0, self.n_e2e


class _Executor(fx.Interpreter):
    """Runs the graph from an initial environment: nodes already in it are not re-run.

    Operations with an exact faster stand-in (:mod:`mpsearch.profile._fastops`) run it, and
    modules are looked up once (the runner's graph module is not modified after tracing and
    folding). A value is dropped after its last use unless the caller keeps it: the memory of
    dead intermediates is reused, as in the module's own forward (keeping every value made
    each pass page-fault fresh memory: a BERT pass ran 2x slower than the module's).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.modules = dict(gm.named_modules())
        self.fast: dict[fx.Node, Callable[..., Any]] = {}
        for node in gm.graph.nodes:
            module = self.modules.get(str(node.target)) if node.op == "call_module" else None
            call = fast_call(node, module)
            if call is not None:
                self.fast[node] = call
        # argument lookups resolved once for the (usual) nodes whose graph values are all
        # top-level positional arguments; the others go through fx's generic lookup
        self.flat: dict[fx.Node, tuple[list[tuple[bool, Any]], dict[str, Any]]] = {
            node: ([(isinstance(a, fx.Node), a) for a in node.args], dict(node.kwargs))
            for node in gm.graph.nodes
            if not any(_nested_node(a) for a in node.args)
            and not any(has_node(v) for v in node.kwargs.values())
        }
        self.nodes = list(gm.graph.nodes)
        self.last_uses: dict[fx.Node, list[fx.Node]] = {}  # node -> the values it reads last
        seen: set[fx.Node] = set()
        for node in reversed(self.nodes):
            for arg in node.all_input_nodes:
                if arg not in seen:
                    seen.add(arg)
                    self.last_uses.setdefault(node, []).append(arg)
        self.counter: FlopCounterMode | None = None
        self.flops: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        if self.counter is None:
            return self._call(n)
        before = self.counter.get_total_flops()
        value = self._call(n)
        self.flops[n] = self.counter.get_total_flops() - before
        return value

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        flat = self.flat.get(n)
        if flat is None:
            return super().fetch_args_kwargs_from_env(n)
        env, (slots, kwargs) = self.env, flat
        return tuple([env[a] if is_node else a for is_node, a in slots]), kwargs

    def _call(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        fast = self.fast.get(n)
        if fast is not None:
            return fast(*args, **kwargs)
        return getattr(self, n.op)(n.target, args, kwargs)

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.modules[target](*args, **kwargs)

    def execute(
        self, env: dict[fx.Node, Any], nodes: Sequence[fx.Node], *, keep: Collection[fx.Node] = ()
    ) -> dict[fx.Node, Any]:
        """``env`` with ``nodes`` (in graph order) run where not already in it; a value read
        for the last time is then dropped from ``env`` unless it is in ``keep``."""
        self.env = env
        for node in nodes:
            if node in env:
                continue
            env[node] = self.run_node(node)
            for dead in self.last_uses.get(node, ()):
                if dead not in keep:
                    env.pop(dead, None)
        return env

    def execute_counting(
        self, env: dict[fx.Node, Any]
    ) -> tuple[dict[fx.Node, Any], dict[fx.Node, int]]:
        """Every node's value (none dropped), and the floating-point operations each node ran
        (``torch.utils.flop_counter``: matrix products, convolutions, attention)."""
        self.flops = {}
        counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
        counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
        with counter:
            self.counter = counter
            try:
                self.execute(env, self.nodes, keep=frozenset(self.nodes))
            finally:
                self.counter = None
        return env, self.flops


class _GlobalOnly:
    """Stands for ``FlopCounterMode``'s module tracker, which counts per module: only the
    total is needed, and the tracker's hook on every module call fails under inference mode
    when a module is called on parameters (a weight-normed layer's parametrization, as in
    wav2vec2's positional convolution: ``'NoneType' object has no attribute
    'next_functions'``)."""

    parents = ("Global",)

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *_: object) -> None:
        return None


def slices_by_sample(runner: GraphRunner | HookRunner) -> bool:
    """Whether the first half of the first calibration batch, cut as :func:`first_samples`
    cuts batches (every tensor by its leading dimension), gives the first half of that
    batch's fp32 output rows. A sequence-first model's (``[time, batch, ...]``, an
    ``nn.MultiheadAttention`` default) leading dimension is not its samples: cut so, its
    mask and its input disagreed and the profile raised."""
    batch = runner.batches[0]
    if batch_size(batch) < 2:
        return True
    return _first_half(batch, runner.outputs[0], runner.output_of, lambda out: out) is not None


def _first_half(
    batch: Batch, reference: Tensor, run: Callable[[Batch], Any], output: Callable[[Any], Tensor]
) -> Any:
    """``run`` on the first half of ``batch``'s samples (cut as :func:`first_samples` cuts)
    where its ``output`` is the first half of ``reference``'s rows (the fp32 output of
    ``batch``), else ``None`` (also where the run raises, or the batch has one sample)."""
    full = batch_size(batch)
    half = full // 2
    if half < 1 or reference.shape[:1] != (full,):
        return None
    try:
        with torch.inference_mode():
            result = run(first_samples([batch], half)[0])
    except Exception:
        return None
    out = output(result)
    if out.shape != reference[:half].shape or not _close(out, reference[:half], 1e-4):
        return None
    return result


def _check_deterministic(model: nn.Module, batch: Batch, output: Tensor) -> None:
    """Raise where ``model`` run again on ``batch`` does not give ``output`` (its fp32 output on
    it): a forward that samples at random. Every graph capture is refused on such a model (its
    check against the model's output fails), so the hook runner is where it arrives."""
    with torch.inference_mode():
        again = output_tensor(run_model(model, batch)).float()
    if _close(again, output, 1e-4):
        return
    if again.shape != output.shape:
        how = f"shape {tuple(output.shape)}, then {tuple(again.shape)}"
    else:
        how = f"largest difference {float((again - output).abs().max()):.3g}"
    raise ValueError(
        "argument 'model': its output on calibration batch 0 changes from one fp32 run to the "
        f"next ({how}): its forward samples at random (noise as a text-to-speech model adds, "
        "dropout called with training=True, random sampling). A profile compares each "
        "quantized layer's output with the fp32 output on the same batch, so the forward must "
        "be deterministic: turn the sampling off (a Hugging Face VITS model: "
        "model.noise_scale = model.noise_scale_duration = 0) or seed it inside forward."
    )


def checked_output(i: int, out: Tensor) -> Tensor:
    """``out``, the fp32 output of calibration batch ``i``; raises where it is not finite."""
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"The fp32 model's output on calibration batch {i} is not finite (NaN or inf); "
            "check the 'calib_data' batches and the model before profiling."
        )
    return out


def _cpu_attention_flops(
    query: Sequence[int], key: Sequence[int], value: Sequence[int], *_: Any, **__: Any
) -> int:
    """Flops of CPU attention (``softmax(q k^T) v``, as counted for the other attention ops)."""
    *batch, s_q, d_q = query
    s_k, d_v = key[-2], value[-1]
    return 2 * math.prod(batch) * s_q * s_k * (d_q + d_v)


def _native_attention_flops(query: Sequence[int], key: Sequence[int], *_: Any, **__: Any) -> int:
    """Flops of ``nn.MultiheadAttention``'s fused inference kernel: the query, key, value and
    output projections (embedding width E) and attention over E-wide heads."""
    *batch, s_q, e = query
    s_k = key[-2]
    return 2 * math.prod(batch) * e * (e * (2 * s_q + 2 * s_k) + 2 * s_q * s_k)


def _cell_flops(
    x: Sequence[int], _hx: Any, w_ih: Sequence[int], w_hh: Sequence[int], *_: Any, **__: Any
) -> int:
    """Flops of one LSTM / GRU cell step: its input and hidden matrix products."""
    return 2 * math.prod(x[:-1]) * w_ih[0] * (w_ih[1] + w_hh[1])


def _linear_flops(x: Sequence[int], w: Sequence[int], *_: Any, **__: Any) -> int:
    """Flops of ``F.linear``: its matrix product."""
    return 2 * math.prod(x[:-1]) * w[0] * w[1]


def _with_overloads(formulas: dict[Any, Any]) -> dict[Any, Any]:
    """``formulas`` keyed by operator packet and by each of its overloads: the counter looks an
    operator's formula up by overload before running it, and decomposes the operator into its
    elementary operations where it finds none (the packet alone is only read when counting)."""
    keyed = dict(formulas)
    for packet, formula in formulas.items():
        keyed.update({getattr(packet, name): formula for name in packet.overloads()})
    return keyed


_EXTRA_FLOPS: dict[Any, Any] = _with_overloads(
    {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        torch.ops.aten._native_multi_head_attention: _native_attention_flops,
        torch.ops.aten.lstm_cell: _cell_flops,
        torch.ops.aten.gru_cell: _cell_flops,
        torch.ops.aten.linear: _linear_flops,
    }
)
"""Flop formulas ``torch.utils.flop_counter`` lacks: its CPU attention kernels (without them a
model's attention counts as no work and its downstream work D comes out too small), and the
composite LSTM / GRU cells and ``F.linear``, which it would otherwise run decomposed into their
elementary operations (on the zoo's ``cell_decoder`` the counting pass took 15 ms against 3 ms
for a plain pass; 4.6 ms with the formulas)."""


def _nested_node(value: Any) -> bool:
    """A graph value inside a container argument (a plain node argument is looked up directly)."""
    return not isinstance(value, fx.Node) and has_node(value)


def _kind(full_value: Any, half_value: Any, full: int, half: int) -> str:
    if isinstance(full_value, torch.Tensor):
        if not isinstance(half_value, torch.Tensor):
            return "unsafe"
        if full_value.shape == half_value.shape:
            return "const"
        if (
            full_value.dim() >= 1
            and full_value.shape[0] == full
            and half_value.shape[0] == half
            and full_value.shape[1:] == half_value.shape[1:]
        ):
            return "batch"
        return "unsafe"
    leaves = pytree.tree_leaves(full_value)
    if any(isinstance(v, torch.Tensor) for v in leaves):
        return "unsafe"
    try:
        return "const" if full_value == half_value else "unsafe"
    except Exception:
        return "unsafe"


_WEIGHT_FUNCTIONS = (
    torch.nn.functional.linear,
    torch.nn.functional.conv1d,
    torch.nn.functional.conv2d,
    torch.nn.functional.conv3d,
    torch.ops.aten.linear.default,  # the same in an exported graph
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
)


def _node_costs(
    nodes: Sequence[fx.Node], env: dict[fx.Node, Any], flops: dict[fx.Node, int]
) -> dict[fx.Node, float]:
    """A deterministic work estimate per node from one batch's values (no timings).

    Multiply-accumulates (half the flops ``torch.utils.flop_counter`` counts) for matrix
    products, convolutions and attention; the number of output elements for every other
    operation.
    """
    costs: dict[fx.Node, float] = {}
    for node in nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            costs[node] = 0.0
        elif flops.get(node, 0) > 0:
            costs[node] = flops[node] / 2
        else:
            leaves = pytree.tree_leaves(env[node])
            costs[node] = float(sum(t.numel() for t in leaves if isinstance(t, torch.Tensor)))
    return costs


def _weight_of(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            return module.weight
    elif node.op == "call_function" and node.target in _WEIGHT_FUNCTIONS and len(node.args) > 1:
        weight = node.args[1]
        return env.get(weight) if isinstance(weight, fx.Node) else weight
    return None


def _streamed_weights(
    gm: fx.GraphModule, nodes: Sequence[fx.Node], env: dict[fx.Node, Any], costs: dict
) -> dict[fx.Node, int]:
    """Bytes of each node's weight when the node is weight-bound (see :data:`WEIGHT_REUSE`)."""
    streamed = {}
    for node in nodes:
        weight = _weight_of(gm, node, env)
        if isinstance(weight, Tensor) and weight.numel():
            if costs.get(node, 0.0) < WEIGHT_REUSE * weight.numel():
                streamed[node] = weight.numel() * weight.element_size()
    return streamed


def _nbytes(value: Any) -> int:
    leaves = pytree.tree_leaves(value)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _repeat(t: Tensor, n: int) -> Tensor:
    return t.repeat(n, *([1] * (t.dim() - 1)))


def _params_read(gm: fx.GraphModule, nodes: Sequence[fx.Node], layers: Collection[str]) -> set[str]:
    """The ``layers`` whose parameters a node of the graph reads besides the layers' own calls
    (a call is one node, so such a read is model code's, as ``F.linear(h, embed.weight)``);
    reading a parameter's shape or dtype is not a read."""
    holders: dict[int, set[str]] = {}
    for name in layers:
        for param in gm.get_submodule(name).parameters():
            holders.setdefault(id(param), set()).add(name)
    found: set[str] = set()
    for node in nodes:
        if node.op == "get_attr" and not all(_metadata_only(user) for user in node.users):
            value = fx.graph_module._get_attr(gm, str(node.target))
            found |= holders.get(id(value), set())
    return found


def _metadata_only(user: fx.Node) -> bool:
    """Whether node ``user`` reads only the metadata of its argument (``w.shape``)."""
    if user.op == "call_method":
        return str(user.target) in TENSOR_METADATA
    if user.op == "call_function" and user.target is getattr:
        return str(user.args[1]) in TENSOR_METADATA
    return user.op == "call_function" and str(user.target).startswith("aten.sym_")


class HookRunner:
    """The fallback: substitute a layer's output with a forward hook and re-run the whole model."""

    mode = "hooks"
    capture_s = 0.0
    output_name: str | None = None
    side_by_side: bool | None = None
    """Whether a layer's variants run side by side in one run (:meth:`_substituted`); ``None``
    until a layer decided it."""

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        layers: Sequence[str],
        *,
        e2e_samples: Any = None,
        local_samples: Any = None,
    ) -> None:
        self.gm = model
        self.fallbacks: dict[str, str] = {}
        self.batches = batches
        counts = dict.fromkeys(layers, 0)  # calls in the pass running now
        calls = dict.fromkeys(layers, 0)  # the most calls in one pass
        handles = []
        for name in layers:

            def count(_m: nn.Module, _args: Any, _name: str = name) -> None:
                counts[_name] += 1

            host = model.get_submodule(host_of(model, name))
            handles.append(host.register_forward_pre_hook(count))
        self.outputs: list[Tensor] = []
        try:
            with torch.inference_mode():
                for batch in batches:
                    output, self.output_name = main_output(run_model(model, batch))
                    self.outputs.append(output.float())
                    for name, c in counts.items():
                        calls[name], counts[name] = max(calls[name], c), 0
        finally:
            for h in handles:
                h.remove()
        _check_deterministic(model, batches[0], self.outputs[0])
        self.calls = calls
        self.called = {name for name, c in calls.items() if c}
        self.read_directly = set(read_directly(model, batches, sorted(self.called), warn=False))
        self.n_e2e = choose_e2e_samples(
            e2e_samples,
            total_samples(batches),
            len(self.called),
            rows_per_sample=rows_per_sample(self.outputs[0]),
        )
        self.n_local_batches, self.n_local = local_batches(local_samples, batches, self.n_e2e)
        self.e2e_batches: Sequence[Batch] = batches
        self.reference = self.outputs
        self.n_shared = len(batches)
        self.local_on_e2e = False  # later calls of a layer would get quantized inputs
        self._recorded: dict[int, dict[str, list[HostCall]]] | None = {}
        self._replayed: set[str] = set()  # layers whose host replay gave its recorded output
        self._not_replayed: set[str] = set()

    def all_outputs(self) -> list[Tensor]:
        """The fp32 outputs of every calibration batch (all computed when counting calls)."""
        return self.outputs

    def downstream_passes(self) -> float:
        """End-to-end work per scheme, in fp32 passes: the whole model once per layer."""
        return float(len(self.called))

    def output_of(self, batch: Batch) -> Tensor:
        """The fp32 output of ``batch`` (the main output tensor, float)."""
        return output_tensor(run_model(self.gm, batch)).float()

    def prepare_e2e(self, e2e_batches: Sequence[Batch]) -> None:
        """Measure end-to-end errors on ``e2e_batches``: all shared when they are
        ``self.batches`` itself, else none (a layer's later calls in a shared run would get
        quantized inputs, where :meth:`local` gives them fp32 ones)."""
        if e2e_batches is self.batches:
            return
        with torch.inference_mode():
            self.reference = [output_tensor(run_model(self.gm, b)).float() for b in e2e_batches]
        self.e2e_batches = e2e_batches
        self.n_shared = 0

    def _hook(
        self, layer: str, qlayers: Sequence[nn.Module], record: Callable[[Any, list[Any]], Any]
    ) -> RemovableHandle:
        """A forward hook on ``layer``'s host (:func:`host_of`): at each call, ``record(fp32
        output, outputs of qlayers in its place)``, whose return value (if not ``None``)
        replaces the output."""
        host = self.gm.get_submodule(host_of(self.gm, layer))
        original = self.gm.get_submodule(layer)

        def hook(_m: nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
            if self.gm.get_submodule(layer) is not original:
                return None  # the host re-run by _variants, an identity swapped in
            return record(out, _variants(self.gm, layer, qlayers, host, args, kwargs))

        return host.register_forward_hook(hook, with_kwargs=True)

    def _substituted(
        self, layer: str, qlayers: Sequence[nn.Module], batch: Batch
    ) -> tuple[list[list[Pair]], Finals]:
        """Local pairs and final outputs on ``batch``, the variants in the layer's place: side
        by side in one run (:meth:`_side_by_side`) once the first layer that could showed it
        gives the same outputs in less time than one run per variant, else one by one."""
        if self.calls[layer] != 1 or len(qlayers) < 2 or self.side_by_side is False:
            return self._one_by_one(layer, qlayers, batch)
        if self.side_by_side is True:
            side = self._side_by_side(layer, qlayers, batch)
            return side if side is not None else self._one_by_one(layer, qlayers, batch)
        start = time.perf_counter()
        one = self._one_by_one(layer, qlayers, batch)
        one_s = time.perf_counter() - start
        start = time.perf_counter()
        side = self._side_by_side(layer, qlayers, batch)
        if side is not None:  # decided on this layer: where it could not, the next one tries
            faster = time.perf_counter() - start < one_s
            self.side_by_side = faster and all(
                _close(a, b, 1e-4) for a, b in zip(side[1], one[1], strict=True)
            )
        return one

    def _side_by_side(
        self, layer: str, qlayers: Sequence[nn.Module], batch: Batch
    ) -> tuple[list[list[Pair]], Finals] | None:
        """Local pairs and final outputs from one run of ``batch`` repeated once per variant
        (every tensor whose leading dimension is the batch size), variant i in the layer's
        place on the i-th copy, or ``None`` where the layer's host gets a value it cannot be so
        cut (copies not along its leading dimension: sequence-first, a recurrent state), or the
        repeated batch does not run or its output cannot be cut (``side_by_side`` is then
        ``False`` for every layer)."""
        n, size = len(qlayers), batch_size(batch)
        repeated = pytree.tree_map_only(
            Tensor, lambda t: _repeat(t, n) if t.dim() and t.shape[0] == size else t, batch
        )
        host = self.gm.get_submodule(host_of(self.gm, layer))
        original = self.gm.get_submodule(layer)
        all_pairs: list[list[Pair]] = [[] for _ in qlayers]

        def hook(_m: nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
            if self.gm.get_submodule(layer) is not original:
                return None  # the host re-run by _variants, an identity swapped in
            outs, parts = _copies(out, n), _copies((args, kwargs), n)
            if (
                outs is None
                or parts is None
                or not all(_close(output_tensor(o), output_tensor(outs[0]), 1e-5) for o in outs[1:])
            ):
                raise _NotSideBySide
            try:
                ys = [
                    _variants(self.gm, layer, [q], host, a, k)[0]
                    for q, (a, k) in zip(qlayers, parts, strict=True)
                ]
                joined = _joined(ys)
            except Exception as exc:
                raise _NotSideBySide from exc
            for pairs, o, y in zip(all_pairs, outs, ys, strict=True):
                pairs.append((o, y))
            return joined

        handle = host.register_forward_hook(hook, with_kwargs=True)
        try:
            final = output_tensor(run_model(self.gm, repeated)).float()
        except _NotSideBySide:
            return None
        except Exception:  # the repeated batch does not run (its tensors not batch-first)
            final = torch.zeros(())
        finally:
            handle.remove()
        if not all(all_pairs):  # the model caught the hook's exception and went on
            return None
        finals = _copies(final, n)
        if finals is None:
            self.side_by_side = False
            return None
        return all_pairs, finals

    def _one_by_one(
        self, layer: str, qlayers: Sequence[nn.Module], batch: Batch
    ) -> tuple[list[list[Pair]], Finals]:
        """Local pairs and final outputs on ``batch``, one run per variant in the layer's place.
        A layer called more than once has its pairs from an fp32 run (:meth:`local`): at its
        later calls, a substituted run would give it quantized inputs."""
        all_pairs, finals = [], []
        for q in qlayers:
            pairs: list[Pair] = []

            def substitute(out: Any, ys: list[Any], _p: list = pairs) -> Any:
                _p.append((out, ys[0]))
                return ys[0]

            handle = self._hook(layer, [q], substitute)
            try:
                finals.append(output_tensor(run_model(self.gm, batch)).float())
            finally:
                handle.remove()
            all_pairs.append(pairs)
        if self.calls[layer] > 1:
            all_pairs = self._fp32_pairs(layer, qlayers, batch)
        return all_pairs, finals

    def run(
        self, layer: str, qlayers: Sequence[nn.Module], b: int
    ) -> tuple[list[list[Pair]], Finals]:
        """Local (reference, quantized) output pairs and final outputs on shared batch b
        (one per variant)."""
        return self._substituted(layer, qlayers, self.batches[b])

    def local(self, layer: str, qlayers: Sequence[nn.Module], b: int) -> list[list[Pair]]:
        """Local pairs on batch b (every call of the layer, fp32 inputs): the layer's host
        replayed on the inputs it got in a recording fp32 pass of the batch (one pass for all
        layers, :meth:`_host_calls`), else from an fp32 pass of the whole model where the
        recordings would pass :data:`HOOK_CACHE_BYTES` or a replay does not give the recorded
        output (the host reads state its arguments do not carry)."""
        calls = self._host_calls(b)
        if calls is None or layer in self._not_replayed:
            return self._fp32_pairs(layer, qlayers, self.batches[b])
        host_name = host_of(self.gm, layer)
        host = self.gm.get_submodule(host_name)
        recorded = calls.get(host_name, [])
        if recorded and layer not in self._replayed:
            args, kwargs, out = recorded[0]
            original = self.gm.get_submodule(layer)
            again = _variants(self.gm, layer, [original], host, args, kwargs)[0]
            if not _close(output_tensor(again).float(), output_tensor(out).float(), 1e-5):
                self._not_replayed.add(layer)
                return self._fp32_pairs(layer, qlayers, self.batches[b])
            self._replayed.add(layer)
        all_pairs: list[list[Pair]] = [[] for _ in qlayers]
        for args, kwargs, out in recorded:
            ys = _variants(self.gm, layer, qlayers, host, args, kwargs)
            for y, pairs in zip(ys, all_pairs, strict=True):
                pairs.append((out, y))
        return all_pairs

    def _host_calls(self, b: int) -> dict[str, list[HostCall]] | None:
        """Every called layer's host calls on local batch b (recorded at the first ask), or
        ``None`` once the recordings would pass :data:`HOOK_CACHE_BYTES`."""
        if self._recorded is not None and b not in self._recorded:
            hosts = sorted({host_of(self.gm, name) for name in self.called})
            budget = HOOK_CACHE_BYTES // max(self.n_local_batches, 1)
            calls = _record_host_calls(self.gm, hosts, self.batches[b], budget)
            if calls is None:
                self._recorded = None
            else:
                self._recorded[b] = calls
        return None if self._recorded is None else self._recorded[b]

    def _fp32_pairs(
        self, layer: str, qlayers: Sequence[nn.Module], batch: Batch
    ) -> list[list[Pair]]:
        all_pairs: list[list[Pair]] = [[] for _ in qlayers]

        def record(out: Any, ys: list[Any]) -> None:
            for y, pairs in zip(ys, all_pairs, strict=True):
                pairs.append((out, y))

        handle = self._hook(layer, qlayers, record)
        try:
            run_model(self.gm, batch)
        finally:
            handle.remove()
        return all_pairs

    def e2e(
        self, layer: str, qlayers: Sequence[nn.Module], b: int
    ) -> tuple[list[list[Pair]], Finals]:
        """Local pairs and final outputs on e2e batch b (one per variant of the layer)."""
        return self._substituted(layer, qlayers, self.e2e_batches[b])


Runner = GraphRunner | HookRunner


def host_of(model: nn.Module, layer: str) -> str:
    """The module whose call stands for ``layer``: the ``nn.MultiheadAttention`` around an
    ``out_proj`` (never called itself), else ``layer``."""
    parent, _, attr = layer.rpartition(".")
    try:  # an exported graph module may lack the parent (an attention module decomposed)
        attention = isinstance(model.get_submodule(parent), nn.MultiheadAttention)
    except AttributeError:
        return layer
    return parent if attr == "out_proj" and attention else layer


class _NotSideBySide(Exception):
    """A layer's host got a value its variants' copies cannot be cut from."""


def _copies(value: Any, n: int) -> list[Any] | None:
    """``value`` cut into the ``n`` copies of a batch repeated ``n`` times: every tensor in it
    split along its leading dimension (``None`` where one's is not a multiple of ``n``)."""
    leaves, spec = pytree.tree_flatten(value)
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    if any(t.dim() == 0 or t.shape[0] % n for t in tensors):
        return None
    cut = [t.chunk(n) if isinstance(t, Tensor) else [t] * n for t in leaves]
    return [pytree.tree_unflatten([c[i] for c in cut], spec) for i in range(n)]


def _joined(values: Sequence[Any]) -> Any:
    """The values of :func:`_copies` put back together (tensors concatenated)."""
    leaves = [pytree.tree_flatten(v)[0] for v in values]
    spec = pytree.tree_flatten(values[0])[1]
    joined = [
        torch.cat(parts) if isinstance(parts[0], Tensor) else parts[0]
        for parts in zip(*leaves, strict=True)
    ]
    return pytree.tree_unflatten(joined, spec)


def _record_host_calls(
    model: nn.Module, hosts: Sequence[str], batch: Batch, budget: int
) -> dict[str, list[HostCall]] | None:
    """Copies of each host's arguments and output at its calls in one fp32 pass of ``batch``
    (``None`` where they pass ``budget`` bytes)."""
    calls: dict[str, list[HostCall]] = {name: [] for name in hosts}
    held = [0]

    def record(name: str, args: Any, kwargs: Any, out: Any) -> None:
        if held[0] > budget:
            return
        call = (copied(args), copied(kwargs), copied(out))
        held[0] += _nbytes(call)
        calls[name].append(call)

    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, a, k, o, _n=name: record(_n, a, k, o), with_kwargs=True
        )
        for name in hosts
    ]
    try:
        with torch.inference_mode():
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return None if held[0] > budget else calls


def _variants(
    model: nn.Module,
    layer: str,
    qlayers: Sequence[nn.Module],
    host: nn.Module,
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> list[Any]:
    """What ``host(*args, **kwargs)`` gives with ``layer`` quantized as each of ``qlayers``:
    each on the same arguments when ``host`` is the layer itself (a recurrent layer's initial
    state, a Mixture-of-Experts bank's routing). An attention host is run once
    with an identity ``out_proj`` (exact in float32: the attention output before the
    projection, as :class:`~mpsearch.layers._layers.CalledOutProj` gives it to a swapped-in
    variant) and each variant projects that output; the host's other outputs are kept."""
    if host is model.get_submodule(layer):
        return [q(*args, **kwargs) for q in qlayers]
    with swapped(model, {layer: nn.Identity()}):
        attended, *rest = host(*args, **kwargs)
    return [(q(attended), *rest) for q in qlayers]


def _graph_runner(
    model: nn.Module,
    capture: Capture,
    batches: Sequence[Batch],
    layers: Sequence[str],
    *,
    method: str,
    fold: bool,
    e2e_samples: Any,
    local_samples: Any,
) -> GraphRunner:
    """The graph runner on ``capture`` (made by ``CAPTURES[method]``), checked against the
    model's own output on the first batch (raises when it is not reproduced)."""
    folded = fold and fold_graph(capture.gm) > 0
    _remove_inplace(capture.gm)
    runner = GraphRunner(
        capture,
        batches,
        layers,
        mode=f"graph:{method}",
        e2e_samples=e2e_samples,
        local_samples=local_samples,
    )
    with torch.inference_mode():
        direct, runner.output_name = main_output(run_model(model, batches[0]))
    if not _close(runner.outputs[0], direct.float(), 1e-4 if folded else 1e-6):
        folding = " with BatchNorm folded" if folded else ""
        raise Unsupported(f"the graph{folding} does not reproduce the model's output")
    if runner.read_directly:
        runner.read_directly = set(
            read_directly(model, batches, sorted(runner.read_directly), warn=False)
        )
    return runner


EXPORT_MIN_CALLS = 300
"""``torch.export`` is tried only where the hook runner would call the model at least this
many times for the end-to-end errors (layers x schemes x batches of the samples it would
use): an export capture cost 240 to 1,500 calls of a 16-sample batch on the state-space and
hybrid decoders of ``bench_architectures`` (Mamba 1.7 s, Qwen3-Next 16.5 s; Xeon with AMX,
1 thread), where their whole profile on the hook runner took 0.4-1.2 s (3 schemes, 256
samples). A count, not a timing: the same model and data always take the same runner."""


def _hook_calls(batches: Sequence[Batch], layers: Sequence[str], n_schemes: int, e2e: Any) -> int:
    """Model calls the hook runner would make for the end-to-end errors (one output row a
    sample assumed: at least as many samples as it would pick)."""
    n_e2e = choose_e2e_samples(e2e, total_samples(batches), float(len(layers)))
    per_batch = max(batch_size(batches[0]), 1)
    return len(layers) * n_schemes * math.ceil(n_e2e / per_batch)


def build_runner(
    model: nn.Module,
    batches: Sequence[Batch],
    layers: Sequence[str],
    *,
    fold_bn: bool,
    warn: Callable[[str], None],
    e2e_samples: Any = None,
    local_samples: Any = None,
    n_schemes: int | None = None,
) -> Runner:
    """The graph runner on the first capture in ``CAPTURES`` that works and reproduces the
    model's output (BatchNorm folded first when ``fold_bn``, else as it is), else the hook
    runner; ``runner.fallbacks`` says why the captures before failed. With ``n_schemes``,
    ``export`` is skipped where the hook runner would call the model fewer than
    :data:`EXPORT_MIN_CALLS` times (capturing would cost more than it saves). ``runner.n_e2e``: the
    number of samples ``e2e_samples`` picks (:func:`~mpsearch.profile._e2e.choose_e2e_samples`),
    ``runner.n_local`` those ``local_samples`` picks, in ``runner.n_local_batches`` batches.

    Each runner works on its own copy of the model. A capture only traces the copy, so one
    that fails leaves it for the next (a copy of a small Hugging Face model costs about as
    much as the two fx traces that fail on it: each puts back the attributes its trace set);
    a graph that was made, and maybe folded, and then failed its check takes its copy with
    it."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    fallbacks: dict[str, str] = {}
    work: nn.Module | None = None
    for method in CAPTURES:
        if method == "export" and n_schemes is not None:
            calls = _hook_calls(batches, layers, n_schemes, e2e_samples)
            if calls < EXPORT_MIN_CALLS:
                fallbacks["graph:export"] = (
                    f"not tried: the hook runner calls the model {calls} times, fewer than a "
                    f"torch.export capture costs ({EXPORT_MIN_CALLS} and up)"
                )
                continue
        for fold in (True, False) if (fold_bn and has_bn) else (False,):
            start = time.perf_counter()
            if work is None:
                work = copy.deepcopy(model).eval()
            try:
                capture = CAPTURES[method](work, batches, layers)
            except Exception as exc:
                fallbacks[f"graph:{method}"] = exception_line(exc)
                continue
            seconds = time.perf_counter() - start
            work = None  # the graph holds it now
            try:
                runner = _graph_runner(
                    model,
                    capture,
                    batches,
                    layers,
                    method=method,
                    fold=fold,
                    e2e_samples=e2e_samples,
                    local_samples=local_samples,
                )
            except Exception as exc:
                fallbacks[f"graph:{method}"] = exception_line(exc)
                continue
            runner.capture_s = seconds
            runner.fallbacks = fallbacks
            if fold_bn and has_bn and not runner.capture.folds_batchnorm:
                warn(
                    f"profile: BatchNorm is left unfolded (the {runner.mode} graph cannot fold it)."
                )
            return runner
    work = copy.deepcopy(model).eval() if work is None else work
    note = " BatchNorm is left unfolded." if (fold_bn and has_bn) else ""
    reasons = "; ".join(f"{name}: {why}" for name, why in fallbacks.items())
    if fallbacks.get("graph:export", "").startswith("not tried"):
        why = "the other graph captures fail and an export would cost more than it saves"
    else:
        why = "no graph capture works"
    warn(
        f"profile: using the hook runner (whole model re-run per layer and scheme) because "
        f"{why} ({reasons}).{note}"
    )
    quantizable = [n for n in layers if is_quantizable(work.get_submodule(n))]
    runner = HookRunner(
        work, batches, quantizable, e2e_samples=e2e_samples, local_samples=local_samples
    )
    runner.fallbacks = fallbacks
    return runner
