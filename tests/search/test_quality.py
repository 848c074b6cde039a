"""Fidelity to the fp32 model: arg-max agreement, or ``1 - MSE / Var`` for regression outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mpsearch as mps
from mpsearch.search._quality import Fidelity


class _Boxes(nn.Module):
    """Per-anchor class logits and box offsets in one tensor, as a detector's raw head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 6 * 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).unflatten(-1, (6, 7))


def _data(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, generator=g) for _ in range(n)]


def test_regression_fidelity_is_one_minus_mse_over_the_references_variance() -> None:
    torch.manual_seed(0)
    ref, other = _Boxes().eval(), _Boxes().eval()
    data = _data(2, 1)
    with torch.no_grad():
        rs, os = [ref(x) for x in data], [other(x) for x in data]
    error = sum(float((o - r).square().sum()) for o, r in zip(os, rs, strict=True))
    spread = sum(float((r - r.mean()).square().sum()) for r in rs)  # each batch's own mean
    expected = 1 - error / spread
    r, o = torch.cat(rs), torch.cat(os)
    assert Fidelity(ref, data, regression=True)(other) == pytest.approx(expected, rel=1e-6)
    agreement = float((o.argmax(-1) == r.argmax(-1)).float().mean())
    assert Fidelity(ref, data)(other) == pytest.approx(agreement)


def test_a_profile_measured_with_mse_makes_the_search_score_by_regression_fidelity() -> None:
    torch.manual_seed(0)
    model, calib, held_out = _Boxes().eval(), _data(3, 1), _data(2, 2)
    cost = mps.measure_cost(model, calib[0], schemes=["fp32", "w8a8"], backend="simulate")
    for metric, regression in (("mse", True), ("kl", False)):
        prof = mps.profile(model, calib, schemes=["w8a8"], metric=metric, progress=False)
        res = mps.search(model, profile=prof, cost=cost, eval_data=held_out, n_trials=3, seed=0)
        fidelity = Fidelity(model, held_out, regression=regression)
        for plan, quality in zip(res.plans, res.pareto["quality"], strict=True):
            quantized = mps.quantize(model, plan, backend="simulate")
            assert quality == pytest.approx(fidelity(quantized), abs=1e-6)


class _Trimmed(_Boxes):
    """Drops its last anchor on a batch whose first value is positive (a predicted length)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out[:, :-1] if bool(x[0, 0] > 0) else out


def test_a_batch_whose_output_changes_shape_agrees_nowhere() -> None:
    """Bug: Fidelity raised the size mismatch of the comparison. Such a batch now scores as
    no agreement, or as predicting the reference's mean (0 on it)."""
    torch.manual_seed(0)
    ref = _Boxes().eval()
    trimmed = _Trimmed().eval()
    trimmed.load_state_dict(ref.state_dict())
    data = _data(2, 1)
    data[0][0, 0], data[1][0, 0] = 1.0, -1.0  # batch 0 trimmed, batch 1 not
    assert Fidelity(ref, data)(trimmed) == pytest.approx(0.5)  # batch 1 agrees everywhere
    with torch.no_grad():
        spread = [float((r - r.mean()).square().sum()) for r in (ref(x) for x in data)]
    expected = 1 - spread[0] / sum(spread)  # batch 1 exact
    assert Fidelity(ref, data, regression=True)(trimmed) == pytest.approx(expected, rel=1e-6)


class _Segmenter(nn.Module):
    """Per-pixel class logits ``[B, 5, 4, 6]`` in a dict, as a segmentation model returns."""

    def __init__(self, key: str = "logits") -> None:
        super().__init__()
        self.key = key
        self.fc = nn.Linear(8, 5 * 4 * 6)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.key: self.fc(x).unflatten(-1, (5, 4, 6))}


def test_segmentation_agreement_is_per_pixel_over_the_classes() -> None:
    """Bug: the arg-max was taken over the last dimension (the image's width); it is now the
    class of each pixel, as the profile's ``kl_channels`` compares them."""
    torch.manual_seed(0)
    ref, other = _Segmenter().eval(), _Segmenter().eval()
    data = _data(2, 1)
    with torch.no_grad():
        r = torch.cat([ref(x)["logits"] for x in data])
        o = torch.cat([other(x)["logits"] for x in data])
    per_pixel = float((o.argmax(1) == r.argmax(1)).float().mean())
    assert per_pixel != pytest.approx(float((o.argmax(-1) == r.argmax(-1)).float().mean()))
    assert Fidelity(ref, data)(other) == pytest.approx(per_pixel)
    assert Fidelity(ref, data, metric="kl_channels")(other) == pytest.approx(per_pixel)


def test_a_field_holding_no_logits_is_scored_as_regression() -> None:
    torch.manual_seed(0)
    ref, other = _Segmenter("last_hidden_state").eval(), _Segmenter("last_hidden_state").eval()
    other.load_state_dict(ref.state_dict())
    data = _data(2, 1)
    as_regression = Fidelity(ref, data, regression=True)
    with torch.no_grad():
        other.fc.weight.add_(0.01)
    assert Fidelity(ref, data)(other) == as_regression(other) < 1.0
    assert Fidelity(ref, data, metric="mse")(other) == as_regression(other)


def test_a_forced_kl_on_one_output_column_is_scored_as_regression() -> None:
    """An arg-max over one column always agrees: such an output is scored by ``1 - MSE / Var``
    whatever metric the profile was forced to."""
    torch.manual_seed(0)
    ref, other = nn.Linear(8, 1).eval(), nn.Linear(8, 1).eval()
    data = _data(2, 1)
    assert Fidelity(ref, data, metric="kl")(other) == Fidelity(ref, data, regression=True)(other)
    assert Fidelity(ref, data, metric="kl")(other) < 1.0


class _MultiLabel(nn.Module):
    """A multi-label classifier as Hugging Face configures one: logits ``[B, 4]``, one sigmoid
    per label. ``shift`` adds to every logit of the samples whose first feature is positive."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.config = type("Config", (), {"problem_type": "multi_label_classification"})()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([x[:, 1], x[:, 2], -x[:, 3], x[:, 4] - 0.5], dim=1)
        return logits + self.shift * (x[:, :1] > 0)


def test_a_multi_label_classifier_agrees_where_its_whole_label_set_does() -> None:
    """Fidelity of a multi-label classifier counts the samples given the very set of labels
    the fp32 model gives, not the arg-max of its logits (a shift of every logit keeps the
    arg-max and changes the set) nor each label on its own."""
    data = _data(4, seed=3)
    fidelity = Fidelity(_MultiLabel(), data)
    assert fidelity.answers == "bernoulli_kl"
    x = torch.cat(data)
    logits = _MultiLabel()(x)
    shifted = logits + 0.3 * (x[:, :1] > 0)
    changed = ((shifted > 0) != (logits > 0)).any(1)
    assert 0 < int(changed.sum()) < len(x)
    assert fidelity(_MultiLabel(shift=0.3)) == pytest.approx(1 - float(changed.double().mean()))
    assert Fidelity(_MultiLabel(), data, metric="kl")(_MultiLabel(shift=0.3)) == 1.0


class _Tokens(nn.Module):
    """Per-token logits ``[B, T, 3]`` of a dict batch: class ``input_ids % 3`` at every token,
    turned to class 0 at the tokens ``flip`` marks."""

    def __init__(self, flip: torch.Tensor | None = None) -> None:
        super().__init__()
        self.flip = flip

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        classes = input_ids % 3
        if self.flip is not None:
            classes = torch.where(self.flip, torch.zeros_like(classes), classes)
        return {"logits": nn.functional.one_hot(classes, 3).float() * 4}


def test_per_token_agreement_leaves_the_padding_out() -> None:
    """Right-padded batches: a token flipped at the padding is no disagreement, one flipped at a
    real token is one of the real tokens (was: every position counted)."""
    ids = torch.tensor([[1, 2, 4, 5, 7], [2, 4, 1, 2, 5]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    data = [{"input_ids": ids, "attention_mask": mask}]
    fidelity = Fidelity(_Tokens(), data)
    at_padding = torch.zeros(2, 5, dtype=torch.bool)
    at_padding[0, 3:] = True
    assert fidelity(_Tokens(at_padding)) == 1.0
    at_token = torch.zeros(2, 5, dtype=torch.bool)
    at_token[1, 0] = True
    assert fidelity(_Tokens(at_token)) == pytest.approx(1 - 1 / 8)
