"""The main output tensor of a model output (``mpsearch._data.output_tensor``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mpsearch as mps
from mpsearch._data import main_output, output_tensor, token_mask


class _Detector(nn.Module):
    """Per-sample detections after post-processing: their number depends on the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.cls = nn.Conv2d(8, 3, 1)

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        scores = self.cls(torch.relu(self.conv(images))).flatten(2).softmax(1)
        detections = []
        for s in scores:
            best, label = s.max(0)
            keep = best > 0.5
            boxes = torch.nonzero(keep).float().repeat(1, 2)
            detections.append({"boxes": boxes, "scores": best[keep], "labels": label[keep]})
        return detections


def test_one_dict_per_sample_is_refused_with_what_to_profile_instead() -> None:
    torch.manual_seed(0)
    data = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    with pytest.raises(TypeError, match=r"one dict per sample \(a list of 4 dicts with 'boxes'"):
        mps.profile(_Detector().eval(), data, schemes=["w8a8"], progress=False)
    with pytest.raises(TypeError, match="raw predictions before post-processing"):
        output_tensor(_Detector().eval()(data[0]))


def test_per_sample_dicts_beside_a_tensor_leave_the_tensor_as_the_output() -> None:
    logits = torch.randn(2, 5)
    assert output_tensor((logits, [{"boxes": torch.zeros(3, 4)}] * 2)) is logits
    assert output_tensor({"logits": logits}) is logits


def test_a_scalar_loss_before_per_sample_outputs_is_passed_over() -> None:
    """A forecasting model given its targets returns its loss (the batch's mean) before its
    predicted distribution's parameters: the parameters are the output (was: the loss, so
    profiling compared one number per batch)."""
    loss, loc, scale = torch.tensor(0.7), torch.randn(4, 6), torch.rand(4, 6)
    assert output_tensor({"loss": loss, "params": (loc, scale)}) is loc
    assert output_tensor((loss, torch.zeros(4, dtype=torch.long), loc)) is loc
    assert output_tensor((loss,)) is loss  # nothing else: the scalar
    assert output_tensor((torch.zeros(4, dtype=torch.long), loss)) is loss  # floating first


def test_main_output_names_the_field_it_takes() -> None:
    hidden, logits, pixels = torch.ones(2, 3, 4), torch.ones(2, 5), torch.ones(2, 4, 8, 8)

    def taken(output: object) -> tuple[int, str | None]:
        tensor, name = main_output(output)
        assert tensor is output_tensor(output)
        return id(tensor), name

    assert taken(hidden) == (id(hidden), None)
    assert taken((torch.tensor(0.5), logits)) == (id(logits), None)
    loss = torch.tensor(0.5)
    assert taken({"loss": loss, "last_hidden_state": hidden}) == (id(hidden), "last_hidden_state")
    assert taken({"out": pixels, "aux": hidden}) == (id(pixels), "out")
    # a loss with a batch dimension (an audio codec's): passed over, as a scalar one
    per_sample = torch.ones(2)
    assert taken({"loss": per_sample, "audio_values": hidden}) == (id(hidden), "audio_values")
    assert taken({"vq_loss": per_sample}) == (id(per_sample), "vq_loss")
    # the innermost name: a tuple of dicts, a dict of a tuple
    assert taken((torch.tensor(0.5), {"waveform": hidden})) == (id(hidden), "waveform")
    assert taken({"decoder": (torch.zeros(2, dtype=torch.long), hidden)}) == (id(hidden), "decoder")

    class Output:  # an object with a ``logits`` attribute, not a mapping
        def __init__(self) -> None:
            self.logits = logits

    assert taken(Output()) == (id(logits), "logits")


def test_token_mask_marks_the_real_tokens_of_a_per_token_output() -> None:
    """A dict batch's ``[B, T]`` mask of an output's first two dimensions (a decoder's own mask
    first); none for other shapes, tensor batches, or a mask with no padding."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    decoder = torch.tensor([[1, 0, 0], [1, 1, 0]])
    batch = {"input_ids": mask, "attention_mask": mask, "decoder_attention_mask": decoder}
    assert torch.equal(token_mask(batch, torch.zeros(2, 4, 7)), mask.bool())
    assert torch.equal(token_mask(batch, torch.zeros(2, 3, 7)), decoder.bool())
    assert token_mask(batch, torch.zeros(2, 5, 7)) is None  # positions of something else
    assert token_mask(batch, torch.zeros(2, 7)) is None  # one answer per sample
    assert token_mask(mask, torch.zeros(2, 4, 7)) is None  # a tensor batch
    assert token_mask({"attention_mask": torch.ones(2, 4)}, torch.zeros(2, 4, 7)) is None
