from __future__ import annotations

import warnings

import pytest
import torch
from helpers import ReadsWeights
from torch import nn

import mpsearch as mps
from mpsearch.backends import quantize
from mpsearch.layers import coverage, fold_batchnorm, quantizable_layers, swapped, weight_shapes
from mpsearch.layers._layers import watched
from mpsearch.plan import PrecisionPlan


def test_finds_linear_and_conv_layers_by_name(tiny_cnn) -> None:
    assert list(quantizable_layers(tiny_cnn)) == ["conv1", "conv2", "fc1", "fc2"]
    nested = nn.Sequential(nn.Sequential(nn.Conv1d(2, 4, 3)), nn.Flatten(), nn.Linear(8, 2))
    assert list(quantizable_layers(nested)) == ["0.0", "2"]


def test_model_without_quantizable_layers_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"no quantizable layers: mpsearch quantizes Linear, Conv1d"
    ):
        quantizable_layers(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(TypeError, match="'model' argument must be a torch.nn.Module"):
        quantizable_layers("resnet")


def test_apply_then_restore_is_bit_identical(tiny_cnn, tiny_input) -> None:
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    ref = tiny_cnn(tiny_input)
    layers = quantizable_layers(tiny_cnn)
    sim = quantize(tiny_cnn, PrecisionPlan({"re:fc.*": "w4a8"}, default="w8a8"), inplace=False)
    replacements = {n: sim.get_submodule(n) for n in layers}
    with swapped(tiny_cnn, replacements):
        changed = tiny_cnn(tiny_input)
        assert not torch.equal(changed, ref)
    after = tiny_cnn.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)), k
    assert torch.equal(tiny_cnn(tiny_input), ref)


def test_swap_restores_even_when_forward_raises(tiny_cnn) -> None:
    original = tiny_cnn.fc1
    with pytest.raises(RuntimeError), swapped(tiny_cnn, {"fc1": nn.Linear(3, 3)}):
        tiny_cnn(torch.randn(2, 1, 8, 8))
    assert tiny_cnn.fc1 is original


def test_replacements_stand_in_for_the_weight_dtype_model_code_reads() -> None:
    model = ReadsWeights().eval()
    x = torch.randn(8, 64)
    with torch.inference_mode():
        want = model(x)
        for backend in ("simulate", "cpu"):
            q = quantize(model, {"proj": "w8a8", "head": "w8a8"}, backend=backend)
            assert q.proj.weight.dtype == torch.float32
            assert q.proj.weight.shape == model.proj.weight.shape  # a broadcast NaN
            assert q.proj.weight.isnan().all() and q.proj.in_features == 64
            assert "proj.weight" not in q.state_dict()
            assert (q(x) - want).abs().max() < 0.1 * want.abs().max()
        # the recorder the cost model swaps in reads through to the layer itself
        seen = []
        with watched(model, {"proj": seen.append}):
            assert model.proj.weight is not None and torch.equal(model(x), want)
        assert len(seen) == 1


def test_conv3d_and_transposed_convs_are_quantizable_and_batchnorm3d_folds() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm3d(8),
        nn.ReLU(),
        nn.ConvTranspose3d(8, 4, (1, 2, 2), stride=(1, 2, 2)),
    )
    with torch.no_grad():  # running statistics other than (0, 1)
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    net.eval()
    assert list(quantizable_layers(net)) == ["0", "3"]
    assert [m.module for m in coverage(net).left_out] == ["1"]  # the BatchNorm alone
    assert weight_shapes(net[3]) == [(4, 8, 1, 2, 2)]  # by output channel
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    x = torch.randn(2, 3, 2, 6, 6)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_a_transposed_conv_subclass_that_computes_as_its_base_is_quantizable() -> None:
    class Logged(nn.ConvTranspose2d):
        def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
            return super().forward(x, output_size)

    class Doubled(nn.ConvTranspose2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    net = nn.Sequential(Logged(2, 4, 3, padding=3), Doubled(4, 4, 3, padding=3)).eval()
    # Doubled computes otherwise, through its base's forward: quantized, its doubling kept
    assert list(quantizable_layers(net)) == ["0", "1"]
    x = torch.randn(1, 2, 9, 9)
    with torch.inference_mode():
        got, want = mps.quantize(net, "bf16", backend="cpu")(x), net(x)
    assert (got - want).norm() < 0.02 * want.norm()


def test_hugging_face_models_that_read_their_layers_run_quantized() -> None:
    """CLIP reads ``position_embedding.weight.shape[0]``, Whisper its embedding's
    ``num_embeddings`` and its convs' ``stride[0]``: a quantized layer answers as the layer
    did (the shape was 0, the attribute missing, an int8 conv's stride its own 2-D form)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16,
        )
    ).eval()  # fmt: skip
    whisper = transformers.WhisperModel(
        transformers.WhisperConfig(
            vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=8,
            pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
        )
    ).eval()  # fmt: skip
    inputs = [
        (clip, {"input_ids": torch.randint(0, 64, (2, 8))}),
        (whisper, {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": torch.ones(2, 3, dtype=torch.long)}),
    ]  # fmt: skip
    for model, x in inputs:
        with torch.inference_mode():
            want = model(**x).last_hidden_state
            for plan in ("w8a8", "bf16"):
                got = mps.quantize(model, plan, backend="cpu")(**x).last_hidden_state
                assert got.shape == want.shape and torch.isfinite(got).all()
                assert (got - want).norm() < 0.2 * want.norm()


class ScaledEmbedding(nn.Embedding):
    """Gemma's scaled word embedding: the base lookup times a scale buffer."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__(n, dim)
        self.register_buffer("embed_scale", torch.tensor(dim**0.5), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class PositionsFromMask(nn.Embedding):
    """OPT's learned positions: computed from a mask and an offset (two inputs)."""

    def forward(self, mask: torch.Tensor, past: int = 0) -> torch.Tensor:
        return super().forward(mask.cumsum(1) + past)


class _ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = ScaledEmbedding(32, 16)
        self.pos = PositionsFromMask(40, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids) + self.pos(torch.ones_like(ids))).mean(1)


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
def test_a_subclass_that_calls_its_base_forward_is_quantized_with_its_own_forward(
    backend: str,
) -> None:
    """Gemma's embedding (``super().forward(ids) * scale``) was left out (18 % of a small
    Gemma); it is quantized, and its scale kept: the quantized base lookup runs inside the
    subclass's own forward. OPT-style positions (two inputs) stay left out, with the reason."""
    import io

    from mpsearch.cost import held_bytes, measure_cost
    from mpsearch.layers import coverage

    model = _ScaledNet().eval()
    ids = torch.randint(0, 32, (8, 6), generator=torch.Generator().manual_seed(1))
    assert list(quantizable_layers(model)) == ["emb", "fc"]
    left_out = coverage(model).left_out[0]  # OPT-style: left out, and why
    assert left_out.module == "pos" and "the base's forward on its one input" in left_out.reason
    cost = measure_cost(model, ids, schemes=["bf16", "w8a16"], backend=backend, repeats=1)
    with torch.inference_mode():
        want = model(ids)
        for scheme in ("bf16", "w8a16"):
            q = mps.quantize(model, {"emb": scheme}, backend=cost.backend)
            assert isinstance(q.emb, ScaledEmbedding) and q.emb.weight.shape == (32, 16)
            assert torch.equal(q.emb(ids), q.emb.quantized(ids) * q.emb.embed_scale)
            assert (q(ids) - want).norm() < 0.02 * want.norm()  # the scale once, not twice
            assert cost.memory_bytes({"emb": scheme}) == held_bytes(q)
            buffer = io.BytesIO()
            torch.save(q, buffer)
            buffer.seek(0)
            assert torch.equal(torch.load(buffer, weights_only=False)(ids), q(ids))
    prof = mps.profile(model, [ids, ids], schemes=["bf16"], progress=False)
    assert prof.info["runner"].startswith("graph:")
    assert prof.error("emb", "bf16") < 1e-3  # the scaled lookup's error, not 8x its output


class _CachesOnItself(nn.Module):
    """Conv + BatchNorm whose ``forward`` stores a buffer back on its module, then (``branch``)
    decides on data: fx cannot trace that, after the trace has set the buffer to a proxy."""

    def __init__(self, *, branch: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.branch = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), branch
        self.register_buffer("table", torch.rand(1, 4, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.table = self.table.to(x.dtype)
        h = self.bn(self.conv(x)) * self.table
        return -h if self.branch and bool(h.sum() > 1e9) else h


@pytest.mark.parametrize("branch", [False, True], ids=["traced", "untraceable"])
def test_fold_batchnorm_of_a_forward_that_caches_a_buffer_on_itself(branch) -> None:
    """The copy (folded or, where tracing fails, as it is) held the trace's proxy."""
    torch.manual_seed(0)
    model, x = _CachesOnItself(branch=branch).eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = fold_batchnorm(model)
    assert bool(caught) == branch
    assert type(folded.table) is torch.Tensor
    assert any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == branch
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
