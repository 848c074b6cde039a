"""``select_output``: the scored output chosen by the user, layer names and plans unchanged."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from profile_models import batches
from torch import nn

import mpsearch as mps
from mpsearch._validation import InvalidTypeError
from mpsearch.profile import E2E_METRICS


class Detector(nn.Module):
    """Class logits and box offsets as two fields of a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 32)
        self.cls = nn.Linear(32, 5)
        self.box = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {"logits": self.cls(h), "pred_boxes": self.box(h) * scale}


def _boxes_of_first_half(output: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"pred_boxes": output["pred_boxes"][:, :2]}


def test_the_selected_model_keeps_names_parameters_and_the_users_model() -> None:
    torch.manual_seed(0)
    net = Detector().eval()
    boxes = mps.select_output(net, "pred_boxes")
    x = torch.randn(3, 8)
    assert [n for n, _ in boxes.named_modules()] == [n for n, _ in net.named_modules()]
    assert boxes.state_dict().keys() == net.state_dict().keys()
    assert boxes.body is net.body and isinstance(boxes, Detector)
    assert list(boxes(x)) == ["pred_boxes"] and list(net(x)) == ["logits", "pred_boxes"]
    torch.testing.assert_close(boxes(x, scale=2.0)["pred_boxes"], net(x, scale=2.0)["pred_boxes"])
    # hooks put on it and children replaced in it stay off the user's model
    hooked = mps.select_output(net, "pred_boxes")
    hooked.register_forward_hook(lambda m, a, out: out)
    hooked.cls = nn.Identity()
    assert not net._forward_hooks and isinstance(net.cls, nn.Linear)
    # selecting again replaces the selector; copies and pickles keep it
    again = mps.select_output(boxes, "logits")
    assert list(again(x)) == ["logits"] and list(boxes(x)) == ["pred_boxes"]
    for twin in (copy.deepcopy(boxes), pickle.loads(pickle.dumps(boxes))):
        assert twin.body is not net.body
        torch.testing.assert_close(twin(x)["pred_boxes"], boxes(x)["pred_boxes"])
    func = mps.select_output(net, _boxes_of_first_half)
    assert pickle.loads(pickle.dumps(func))(x)["pred_boxes"].shape == (3, 2)


@pytest.mark.parametrize(("output", "metric"), [("pred_boxes", "mse"), ("logits", "kl")])
def test_the_profile_scores_the_selected_field_on_the_graph(output, metric) -> None:
    torch.manual_seed(0)
    net = Detector().eval()
    calib = batches(2, 16, 8)
    prof = mps.profile(
        mps.select_output(net, output), calib, schemes=["w8a8"], progress=False, e2e_samples=None
    )
    assert prof.info["runner"].startswith("graph:") and prof.e2e_metric == metric
    fn = E2E_METRICS[metric]
    for layer in prof.layers:
        quantized = mps.quantize(net, {layer: "w8a8"})  # the user's own model
        with torch.inference_mode():
            want = np.mean([fn(net(x)[output], quantized(x)[output]) for x in calib])
        assert prof.error(layer, "w8a8") == pytest.approx(want, rel=1e-4)


def test_a_plan_searched_on_the_selected_model_quantizes_the_users_model() -> None:
    torch.manual_seed(0)
    net = Detector().eval()
    boxes = mps.select_output(net, "pred_boxes")
    calib = batches(3, 16, 8)
    prof = mps.profile(boxes, calib[:2], schemes=["w8a8", "w4a16"], progress=False)
    cost = mps.measure_cost(boxes, calib[0], schemes=["fp32", "w8a8", "w4a16"], backend="simulate")
    res = mps.search(boxes, profile=prof, cost=cost, eval_data=calib[2:], n_trials=4, seed=0)
    assert prof.e2e_metric == "mse"
    for plan, quality in zip(res.plans, res.pareto["quality"], strict=True):
        with torch.inference_mode():
            ref, out = net(calib[2])["pred_boxes"], mps.quantize(net, plan)(calib[2])["pred_boxes"]
        expected = 1 - float((out - ref).square().sum() / (ref - ref.mean()).square().sum())
        assert quality == pytest.approx(expected, abs=1e-6)


def test_bad_selectors_are_refused_with_what_is_accepted() -> None:
    net = Detector().eval()
    with pytest.raises(InvalidTypeError, match="'output' argument must be a field name"):
        mps.select_output(net, 3)
    with pytest.raises(InvalidTypeError, match="'model' argument must be a torch.nn.Module"):
        mps.select_output(lambda x: x, "logits")
    with pytest.raises(KeyError, match="no field 'boxes'; its fields: 'logits', 'pred_boxes'"):
        mps.select_output(net, "boxes")(torch.zeros(1, 8))
