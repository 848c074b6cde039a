"""End-to-end metrics scored for all schemes and batches at once equal the metric of each
output on its own batch."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from mpsearch._data import is_multi_label
from mpsearch.profile import (
    auto_metric,
    bernoulli_kl,
    kl_divergence,
    kl_divergence_channels,
    mean_squared_error,
)
from mpsearch.profile._metrics import E2EScorer, answers_agree

metrics_module = importlib.import_module("mpsearch.profile._metrics")

BUILTIN = [
    ("kl", kl_divergence),
    ("kl_channels", kl_divergence_channels),
    ("bernoulli_kl", bernoulli_kl),
    ("mse", mean_squared_error),
]


def _where(b: int, i: int) -> str:
    return f"batch {b}, output {i}"


def _case(sizes: list[int], *trailing: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """References per batch and 3 outputs per batch near them."""
    g = torch.Generator().manual_seed(sum(sizes))
    refs = [torch.randn(n, *trailing, generator=g) * 3 for n in sizes]
    outs = [r + 0.1 * torch.randn(3, *r.shape, generator=g) for r in refs]
    return refs, outs


@pytest.mark.parametrize(("name", "fn"), BUILTIN)
@pytest.mark.parametrize(
    ("sizes", "trailing"),
    [([16, 16, 16], (10,)), ([16, 16, 5], (10,)), ([4, 4], (5, 7)), ([3, 2], (5, 4, 6))],
)
def test_builtin_metrics_equal_one_output_at_a_time(name, fn, sizes, trailing) -> None:
    refs, outs = _case(sizes, *trailing)
    scorer = E2EScorer(refs, name, fn)
    assert scorer.joint is not None  # one set of operations for every batch
    got = scorer(outs, _where)
    want = [[fn(ref, out) for out in batch] for ref, batch in zip(refs, outs, strict=True)]
    assert len(got) == len(sizes)
    for g_row, w_row in zip(got, want, strict=True):
        assert g_row == pytest.approx(w_row, rel=1e-12, abs=1e-15)
        assert all(v > 0 for v in g_row)


def test_batches_of_other_shapes_are_scored_one_batch_at_a_time() -> None:
    g = torch.Generator().manual_seed(0)
    refs = [torch.randn(4, 5, 7, generator=g), torch.randn(4, 3, 7, generator=g)]
    outs = [torch.stack([r, r + 0.2]) for r in refs]
    scorer = E2EScorer(refs, "kl", kl_divergence)
    assert scorer.joint is None
    got = scorer(outs, _where)
    assert got[0][0] == got[1][0] == 0.0
    for b in range(2):
        assert got[b][1] == pytest.approx(kl_divergence(refs[b], outs[b][1]), rel=1e-12)


@pytest.mark.parametrize(("name", "fn"), BUILTIN)
def test_non_finite_output_scores_inf_and_others_are_kept(name, fn) -> None:
    refs, outs = _case([8, 8], 10)
    outs[0][1, 3, 2] = torch.inf
    outs[1][2, 0, 0] = torch.nan
    outs[1][0, 1, 1] = -torch.inf
    got = E2EScorer(refs, name, fn)(outs, _where)
    assert got[0][1] == got[1][2] == got[1][0] == math.inf
    assert got[0][0] == pytest.approx(fn(refs[0], outs[0][0]), rel=1e-12)
    assert got[1][1] == pytest.approx(fn(refs[1], outs[1][1]), rel=1e-12)


def test_callable_metric_is_called_per_finite_output_with_where_in_errors() -> None:
    refs, outs = _case([8, 8], 10)
    outs[1][2, 0, 0] = torch.inf
    calls = []

    def max_abs(r: torch.Tensor, o: torch.Tensor) -> float:
        calls.append(o.shape)
        return float((r - o).abs().max())

    got = E2EScorer(refs, "max_abs", max_abs)(outs, _where)
    assert len(calls) == 5 and got[1][2] == math.inf
    assert got[0] == [max_abs(refs[0], o) for o in outs[0]]

    def nan_metric(r: torch.Tensor, o: torch.Tensor) -> float:
        return math.nan

    with pytest.raises(RuntimeError, match="'nan_metric' returned NaN on batch 0, output 0"):
        E2EScorer(refs, "nan_metric", nan_metric)(outs, _where)


def test_kl_terms_in_row_blocks_equal_one_block(monkeypatch) -> None:
    """Blocks of rows (the float64 temporaries kept small) give the very same per-row terms,
    and each output's mean is its own KL divergence."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 5, 7, generator=g) * 3
    outs = ref + 0.1 * torch.randn(3, 6, 5, 7, generator=g)
    whole = metrics_module.KLAgainst(ref).terms(outs)
    monkeypatch.setattr(metrics_module, "CHUNK_ELEMENTS", 3 * 7 * 4)  # 4 rows per block
    blocks = metrics_module.KLAgainst(ref).terms(outs)
    assert blocks.shape == (3, 30) and torch.equal(blocks, whole)
    for i in range(3):
        assert float(blocks[i].mean()) == pytest.approx(kl_divergence(ref, outs[i]), rel=1e-12)
    assert torch.equal(metrics_module.KLAgainst(ref).terms(ref[None]), torch.zeros(1, 30))


def test_kl_channels_is_the_mean_kl_of_each_pixels_class_distribution() -> None:
    """A segmentation model's ``[B, C, H, W]``: one distribution over C per pixel (was: KL over
    the last dimension, the image's width)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) * 2
    out = ref + 0.3 * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    p, q = ref.softmax(1), out.softmax(1)
    per_pixel = (p * (p.log() - q.log())).sum(1)  # [B, H, W]
    assert kl_divergence_channels(ref, out) == pytest.approx(float(per_pixel.mean()), rel=1e-12)
    assert kl_divergence_channels(ref, out) != pytest.approx(kl_divergence(ref, out), rel=1e-3)


@pytest.mark.parametrize(
    ("shape", "name", "expected"),
    [
        ((4, 10), None, "kl"),  # a classifier
        ((4, 10), "logits", "kl"),
        ((4, 12, 50), None, "kl"),  # a language model, as a tuple's item
        ((4, 12), "start_logits", "kl"),  # question answering: a distribution over positions
        ((4, 10), "out", "kl"),
        ((4, 1), None, "mse"),  # a regressor
        ((4,), "logits", "mse"),
        ((4, 12, 32), "last_hidden_state", "mse"),  # a base model's hidden states
        ((4, 16000), "waveform", "mse"),  # text to speech
        ((4, 24, 7), "prediction_outputs", "mse"),  # a forecaster
        ((4, 21, 8, 8), "logits", "kl_channels"),  # Hugging Face segmentation
        ((4, 21, 8, 8), "out", "kl_channels"),  # torchvision segmentation
        ((4, 3, 16, 16), "reconstruction", "mse"),  # super-resolution
        ((4, 3, 16, 16), None, "mse"),  # an image, returned as it is
        ((4, 1, 8, 8), "logits", "mse"),
    ],
)
def test_auto_metric_reads_the_outputs_name_and_shape(shape, name, expected) -> None:
    assert auto_metric(torch.zeros(shape), name) == expected
    assert auto_metric(torch.zeros(shape, dtype=torch.long), name) == "mse"


def test_bernoulli_kl_sums_each_labels_kl_per_sample() -> None:
    """A multi-label classifier's logits: per sample the sum over labels of the two Bernoulli
    distributions' KL, which is the binary cross-entropy against the reference's sigmoid minus
    its entropy (torch's own ``binary_cross_entropy_with_logits``); the mean over samples."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    out = ref + 0.5 * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    p = ref.sigmoid()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    per_label = bce(out, p, reduction="none") - bce(ref, p, reduction="none")
    assert bernoulli_kl(ref, out) == pytest.approx(float(per_label.sum(1).mean()), rel=1e-12)
    assert bernoulli_kl(ref, ref) == 0.0
    # not the softmax KL over the labels: adding a constant to every logit changes every sigmoid
    assert bernoulli_kl(ref, ref + 1.0) > 0.1 and kl_divergence(ref, ref + 1.0) < 1e-12


def test_auto_metric_of_a_multi_label_classifier() -> None:
    """``[B, L]`` logits of a multi-label classifier (a Hugging Face config's ``problem_type``)
    are compared by ``bernoulli_kl``; its hidden states and other shapes are not logits."""

    class Config:
        problem_type = "multi_label_classification"

    model = torch.nn.Linear(2, 2)
    assert not is_multi_label(model)
    model.config = Config()
    assert is_multi_label(model)
    assert auto_metric(torch.zeros(4, 6), "logits", multi_label=True) == "bernoulli_kl"
    assert auto_metric(torch.zeros(4, 6), None, multi_label=True) == "bernoulli_kl"
    assert auto_metric(torch.zeros(4, 6), "logits") == "kl"
    assert auto_metric(torch.zeros(4, 7, 6), "last_hidden_state", multi_label=True) == "mse"
    assert auto_metric(torch.zeros(4, 6), "pooler_output", multi_label=True) == "mse"


def test_answers_agree_compares_classes_or_label_sets() -> None:
    ref = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -1.0, -0.5]])
    out = torch.tensor([[0.1, -5.0, 4.0], [-3.0, 0.2, -0.5]])  # same set; one label flipped
    assert answers_agree(out, ref, "bernoulli_kl").tolist() == [True, False]
    assert answers_agree(out, ref, "kl").tolist() == [False, False]  # arg-max 2 vs 0; 1 vs 2
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 1, 0, 0] = 1.0
    assert answers_agree(maps, torch.zeros(1, 3, 2, 2), "kl_channels").tolist() == [
        [[False, True], [True, True]]
    ]
    assert answers_agree(out, ref, "mse").tolist() == [False, False]  # arg-max of the last dim


@pytest.mark.parametrize(("name", "fn"), [("kl", kl_divergence), ("mse", mean_squared_error)])
def test_padding_is_left_out_of_per_token_metrics(name, fn) -> None:
    """A token mask per batch: each output's metric is the metric over the real tokens alone,
    in one set of operations for every batch (equal shapes) and batch by batch (unequal)."""
    g = torch.Generator().manual_seed(0)
    for lengths in ([5, 5], [5, 3]):
        refs = [torch.randn(3, t, 6, generator=g) * 3 for t in lengths]
        outs = [r + 0.3 * torch.randn(2, *r.shape, generator=g) for r in refs]
        masks = [torch.arange(t) < torch.tensor([[t], [2], [1]]) for t in lengths]
        for out in outs:  # garbage at the padding, where it must not count
            out[:, 1, 3:, 0] += 100.0
        scorer = E2EScorer(refs, name, fn, masks)
        assert (scorer.joint is not None) == (lengths[0] == lengths[1])
        got = scorer(outs, _where)
        for b, (ref, batch, mask) in enumerate(zip(refs, outs, masks, strict=True)):
            want = [fn(ref[mask], out[mask]) for out in batch]
            assert got[b] == pytest.approx(want, rel=1e-12)
        unmasked = E2EScorer(refs, name, fn)(outs, _where)
        assert unmasked[0][0] > 10 * got[0][0]
