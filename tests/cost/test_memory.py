"""``CostModel.memory_bytes(plan)`` equals the bytes the quantized model really holds."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import SharedEmbedding
from torch import nn

from mpsearch.backends import quantize, storage_bytes
from mpsearch.backends._kernels import tensor_bytes
from mpsearch.cost import held_bytes, measure_cost
from mpsearch.cost._model import ideal_layer_bytes
from mpsearch.layers import coverage, quantizable_layers
from mpsearch.schemes import get_scheme
from mpsearch.workloads import ZOO, load_workload
from mpsearch.workloads._zoo import zoo_available

SCHEMES = {"simulate": ["w8a8", "w4a16", "bf16"], "cpu": ["w8a8", "bf16", "w8a16"]}
FAST = {"flag_net", "speaker_lstm", "attention_net", "hf_qwen2"}


def _plans(cost, layers: list[str], schemes: list[str]) -> list[object]:
    """Each uniform plan the backend runs everywhere, and one mixed plan (last layer fp32)."""
    uniform = [s for s in schemes if all(cost.supported(n, s) for n in layers)]
    others = schemes[1:]
    mixed = {}
    for i, n in enumerate(layers):
        scheme = others[i % len(others)]
        mixed[n] = scheme if cost.supported(n, scheme) else "fp32"
    mixed[layers[-1]] = "fp32"
    return [*uniform, mixed]


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n,
            marks=[
                *([] if n in FAST else [pytest.mark.slow]),
                pytest.mark.skipif(not zoo_available(n), reason=f"needs {ZOO[n].needs}"),
            ],
        )
        for n in ZOO
    ],
)
def test_predicted_memory_is_what_the_quantized_zoo_model_holds(name: str, backend: str) -> None:
    wl = load_workload(name, n_calib=16, n_test=16)
    schemes = SCHEMES[backend]
    cost = measure_cost(
        wl.model, wl.example_input, schemes=schemes, backend=backend, repeats=1, warmup=0
    )
    assert cost.fp32_memory_bytes == held_bytes(wl.model)
    plans = _plans(cost, cost.layers, ["fp32", *schemes])  # a uniform plan: never-called too
    assert len(plans) >= 3
    for plan in plans:
        assert cost.memory_bytes(plan) == held_bytes(quantize(wl.model, plan, backend=cost.backend))


class _Tied(nn.Module):
    """An embedding tied to the output layer, and two Linears sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.b.weight = self.a.weight
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(self.emb(ids)))))


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
def test_tied_weights_count_once_and_every_copy_kept_counts(backend: str) -> None:
    torch.manual_seed(0)
    model = _Tied().eval()
    cost = measure_cost(
        model, torch.randint(0, 64, (4, 8)), schemes=["w8a8", "w4a16"], backend=backend,
        repeats=1, warmup=0,
    )  # fmt: skip
    emb, ab = 64 * 32 * 4, 32 * 32 * 4  # the two shared fp32 weights
    biases = 2 * 32 * 4
    assert cost.fp32_memory_bytes == emb + ab + biases == held_bytes(model)
    if backend == "simulate":  # fp32 layers stay as they are
        assert cost.memory_bytes("fp32") == cost.fp32_memory_bytes
    plans = [
        "fp32",
        "w8a8",  # head gets its own copy, the embedding keeps the fp32 one
        {"a": "w8a8", "b": "fp32", "head": "w8a8"},  # b keeps the shared fp32 weight (simulate)
        {"a": "w8a8", "b": "w8a8", "head": "fp32"},
    ]
    for plan in plans:  # on cpu, fp32 layers run as copies or as they are: what autotuning kept
        assert cost.memory_bytes(plan) == held_bytes(quantize(model, plan, backend=cost.backend))
    if backend == "simulate":
        w8 = get_scheme("w8a8")
        layers = quantizable_layers(model)
        quantized = sum(ideal_layer_bytes(layers[n], w8) for n in ("emb", "a", "b", "head"))
        assert cost.memory_bytes("w8a8") == quantized
        plan = {"emb": "fp32", "a": "w8a8", "b": "w8a8", "head": "w8a8"}
        assert cost.memory_bytes(plan) == emb + quantized - ideal_layer_bytes(layers["emb"], w8)


def test_tied_layers_keep_one_tensor_where_they_store_it_alike() -> None:
    """fp32: the model's own tensor (an fp32 embedding was copied); bf16 on both sides of a tie:
    one bf16 tensor (each side held its own); the cost model predicts what is held."""
    torch.manual_seed(0)
    model = _Tied().eval()
    ids = torch.randint(0, 64, (4, 8))
    fp32 = quantize(model, "fp32", backend="cpu")
    assert fp32.emb.weight is fp32.head.weight and held_bytes(fp32) == held_bytes(model)
    bf16 = quantize(model, "bf16", backend="cpu")
    assert bf16.emb.inner.weight is bf16.head.inner.weight
    assert bf16.a.inner.weight is bf16.b.inner.weight
    emb, ab = 64 * 32, 32 * 32
    assert held_bytes(bf16) == 2 * (emb + ab + 2 * 32)  # each weight once, biases, in bf16
    torch.testing.assert_close(bf16(ids), model(ids), atol=0.05, rtol=0.05)
    cost = measure_cost(model, ids, schemes=["bf16", "w8a16"], backend="cpu", repeats=1, warmup=0)
    plans = [
        "fp32",
        "bf16",
        {"emb": "bf16", "a": "bf16", "b": "fp32", "head": "fp32"},
        {"emb": "fp32", "a": "w8a16", "b": "bf16", "head": "bf16"},
        {"emb": "w8a16", "a": "bf16", "b": "bf16", "head": "bf16"},
    ]
    for plan in plans:
        assert cost.memory_bytes(plan) == held_bytes(quantize(model, plan, backend=cost.backend))
    assert cost.memory_bytes("bf16") == held_bytes(bf16)


def test_a_never_called_tied_copy_is_not_said_to_stay_in_full_precision() -> None:
    torch.manual_seed(0)
    model = SharedEmbedding().eval()
    ids = torch.randint(0, 64, (4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said "stay in full precision: ['shared']" before
        cost = measure_cost(model, ids, schemes=["w8a16"], backend="cpu", repeats=1, warmup=0)
    plan = {"shared": "w8a16", "enc": "w8a16"}  # what a search gives it: its copy's scheme
    quantized = quantize(model, plan, backend="cpu")
    assert type(quantized.shared) is type(quantized.enc) is not nn.Embedding
    assert cost.memory_bytes(plan) == held_bytes(quantized)


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
def test_speaker_lstm_w8a8_memory_is_what_the_quantized_lstm_holds(backend: str) -> None:
    wl = load_workload("speaker_lstm", n_calib=4, n_test=4)
    cost = measure_cost(
        wl.model, wl.example_input, schemes=["w8a8"], backend=backend, repeats=1, warmup=0
    )
    q = quantize(wl.model, "w8a8", backend=cost.backend)
    assert cost.memory_bytes("w8a8") == held_bytes(q)
    assert cost.supported("lstm", "w8a8") and cost.table["latency_ms"].notna().all()
    # int8 codes of the 12 gate matrices, a float32 scale per gate row, float32 biases; the
    # Linear as ever, on either int8 kernel the autotuner picks (oneDNN's weight zero points
    # are views of one shared zero: no bytes, as fbgemm holds none)
    lstm = wl.model.lstm
    weights = sum(p.numel() for n, p in lstm.named_parameters() if n.startswith("weight"))
    rows = sum(p.shape[0] for n, p in lstm.named_parameters() if n.startswith("weight"))
    biases = sum(p.numel() for n, p in lstm.named_parameters() if n.startswith("bias"))
    proj = 64 * 128 + 64 * 4 + 64 * 4
    assert held_bytes(q) == weights + 4 * rows + 4 * biases + proj
    if backend == "cpu":  # the default kernels (oneDNN's Linear), whatever autotuning picked
        default = quantize(wl.model, "w8a8", backend="cpu")
        assert type(default.proj).__name__ == "Int8Linear"
        assert held_bytes(default) == held_bytes(q)


def test_held_bytes_counts_packed_kernel_weights_and_shared_storage_once() -> None:
    net = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64, bias=False))
    net[1].weight = nn.Parameter(net[0].weight.t())  # a view of the same storage
    assert held_bytes(net) == (64 * 32 + 32) * 4
    q = quantize(nn.Sequential(nn.Linear(64, 32)), "w8a8", backend="cpu")
    assert held_bytes(q) == 64 * 32 + 32 * 4 + 32 * 4  # codes, scales, bias: no zero points
    assert held_bytes(q) == ideal_layer_bytes(nn.Linear(64, 32), get_scheme("w8a8"))


def test_held_bytes_counts_each_opaque_packed_weight() -> None:
    """fbgemm's packed weights are counted from shape-only ``meta`` stand-ins: two of them are
    two weights (they once shared one key, ``data_ptr() == 0``, and counted once)."""
    from mpsearch.backends._kernels import FbgemmInt8Linear, storage_bytes

    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no fbgemm engine in this torch build")
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32)).eval()
    scheme = get_scheme("w8a8")
    packed = nn.Sequential(*(FbgemmInt8Linear(layer, scheme) for layer in net))
    assert held_bytes(packed) == storage_bytes(packed[0]) + storage_bytes(packed[1])
    assert held_bytes(packed) > 64 * 64 + 64 * 32  # both int8 weights at least


class _WeightNormed(nn.Module):
    """A weight-normed convolution (wav2vec2's positional convolution): its tensors sit in a
    ``parametrizations`` submodule of the layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(32, 32, 4, padding=2), dim=2)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=-1))


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
def test_a_weight_normed_layer_takes_its_parametrized_tensors_with_it(backend: str) -> None:
    model = _WeightNormed().eval()
    cost = measure_cost(
        model, torch.randn(4, 32, 16), schemes=["w8a8"], backend=backend, repeats=1, warmup=0
    )
    assert cost.fp32_memory_bytes == held_bytes(model)
    for plan in ({"conv": "w8a8"}, "w8a8"):
        assert cost.memory_bytes(plan) == held_bytes(quantize(model, plan, backend=cost.backend))


def test_a_weight_normed_layer_is_covered_with_its_parametrized_tensors() -> None:
    cov = coverage(_WeightNormed())
    assert cov.layers == ["conv", "head"] and cov.left_out == [] and cov.share == 1.0


class _Seq2Seq(nn.Module):
    """T5-style: ``shared`` never called, its encoder's and decoder's copies and the output
    layer hold its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(64, 32)
        self.enc = nn.Embedding(64, 32)
        self.dec = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64, bias=False)
        for m in (self.enc, self.dec, self.head):
            m.weight = self.shared.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(ids) + self.dec(ids.flip(-1)))


def test_tied_layers_in_one_integer_scheme_hold_one_set_of_codes() -> None:
    torch.manual_seed(0)
    model = _Seq2Seq().eval()
    ids = torch.randint(0, 64, (4, 8))
    q = quantize(model, "w8a16", backend="cpu")
    assert q.enc.codes is q.dec.codes is q.shared.codes
    assert q.enc.scales is q.dec.scales is q.shared.scales
    assert held_bytes(q) == tensor_bytes(q.enc.codes) + tensor_bytes(q.enc.scales) + storage_bytes(
        q.head
    )
    with torch.inference_mode():
        assert float((q(ids) - model(ids)).norm() / model(ids).norm()) < 0.02  # int8 rounding
    cost = measure_cost(  # shared, never called, follows its copies: no warning
        model, ids, schemes=["bf16", "w8a16", "w4a16"], backend="cpu", repeats=1, warmup=0
    )
    plans = [
        "w8a16",
        "w4a16",
        "bf16",
        {"shared": "fp32", "enc": "w8a16", "dec": "w8a16", "head": "bf16"},
        {"shared": "w8a16", "enc": "w4a16", "dec": "w8a16", "head": "w8a16"},
        {"shared": "bf16", "enc": "w8a16", "dec": "bf16", "head": "fp32"},
    ]
    for plan in plans:
        assert cost.memory_bytes(plan) == held_bytes(quantize(model, plan, backend=cost.backend))
    # one table where T5's shared embedding follows its copies (before: an fp32 one stayed)
    follow = {"shared": "w8a16", "enc": "w8a16", "dec": "w8a16", "head": "w8a16"}
    stay = {**follow, "shared": "fp32"}
    assert cost.memory_bytes(stay) - cost.memory_bytes(follow) == 64 * 32 * 4
