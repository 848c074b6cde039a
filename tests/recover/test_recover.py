"""``recover``: quantization-aware recovery fine-tune of a plan, distilled from fp32."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from backends.test_layer_kinds import Conv1D  # Hugging Face's Conv1D: weight [in, out]
from helpers import ReadsWeights
from sklearn.datasets import load_digits
from torch import nn

from mpsearch import PrecisionPlan, quantize
from mpsearch.recover import RecoverOptions, RecoveryResult, recover
from mpsearch.recover._recover import _recover, _Stopped

pytestmark = pytest.mark.usefixtures("one_thread")


def kl(student: torch.Tensor, teacher: torch.Tensor) -> float:
    log_p = F.log_softmax(teacher, dim=-1)
    return float((log_p.exp() * (log_p - F.log_softmax(student, dim=-1))).sum(-1).mean())


def held_out_kl(model: nn.Module, teacher: nn.Module, batches: list[torch.Tensor]) -> float:
    """The sample-weighted KL over ``batches`` (what recover reports as its held-out loss)."""
    with torch.no_grad():
        total = sum(kl(model(b), teacher(b)) * len(b) for b in batches)
    return total / sum(len(b) for b in batches)


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, list[torch.Tensor]]:
    """An MLP trained on digits (96% of the training set) and 8 held-out calibration batches."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(200):
        i = (step * 128) % 1408
        opt.zero_grad()
        F.cross_entropy(net(x[i : i + 128]), y[i : i + 128]).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        assert (net(x[1536:]).argmax(1) == y[1536:]).float().mean() > 0.85
    return net, list(x[1536:].split(32))[:8]


FAST = RecoverOptions(eval_every=5, val_batches=2)


def test_w2a16_recovers_what_rounding_loses(digits: tuple[nn.Module, list[torch.Tensor]]) -> None:
    net, calib = digits
    before = copy.deepcopy(net.state_dict())
    res = recover(net, "w2a16", calib, steps=40, lr=1e-3, options=FAST, progress=False)
    assert isinstance(res, RecoveryResult)
    # the held-out loss recover reports is the simulate backend's, before and after
    held_out = calib[-2:]
    rtn = held_out_kl(quantize(net, "w2a16", backend="simulate"), net, held_out)
    recovered = held_out_kl(quantize(res.model, "w2a16", backend="simulate"), net, held_out)
    assert res.loss_before == pytest.approx(rtn, rel=1e-5)
    assert res.loss_after == pytest.approx(recovered, rel=1e-5)
    assert rtn > 0.05  # 2-bit rounding hurts this model...
    assert res.loss_after < 0.5 * res.loss_before  # ...and recovery wins most of it back
    assert res.best_step > 0 and res.steps_done == 40
    assert res.trained == ["0", "2", "4"] and res.frozen == {} and res.resumed_from is None
    h = res.history
    assert list(h.columns) == ["step", "train_loss", "val_loss"]
    assert list(h["step"]) == list(range(41))
    assert h["val_loss"].notna().sum() == 1 + 40 // 5
    assert h.loc[0, "val_loss"] == res.loss_before and math.isnan(h.loc[0, "train_loss"])
    assert h.loc[res.best_step, "val_loss"] == res.loss_after == h["val_loss"].min()
    # the user's model is untouched; the result has its module types, names and modes
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert [type(m) for m in res.model.modules()] == [type(m) for m in net.modules()]
    assert list(res.model.state_dict()) == list(net.state_dict())
    assert not res.model.training
    assert all(p.requires_grad for p in res.model.parameters())


def test_real_kernels_run_the_recovered_model(digits: tuple[nn.Module, list[torch.Tensor]]) -> None:
    net, calib = digits
    plan = PrecisionPlan({"0": "w4a8_pc", "2": "w4a16"}, default="w8a8")
    res = recover(net, plan, calib, steps=20, lr=1e-3, options=FAST, progress=False)
    assert res.loss_after <= res.loss_before
    assert res.loss_after < res.loss_before
    x = torch.cat(calib)
    with torch.no_grad():
        real = quantize(res.model, plan, backend="cpu")(x)
        sim = quantize(res.model, plan, backend="simulate")(x)
    # bf16 arithmetic of w4a16 in two kernels: a few bf16 ulps of the logits apart
    assert (real - sim).abs().max() <= 0.02 * sim.abs().max()
    assert (real.argmax(1) == sim.argmax(1)).float().mean() >= 0.98


def test_resume_is_bit_identical(
    digits: tuple[nn.Module, list[torch.Tensor]], tmp_path: Path
) -> None:
    net, calib = digits
    kw = {"steps": 12, "lr": 1e-3, "progress": False}
    opts = RecoverOptions(eval_every=4, checkpoint_every=3, val_batches=2)
    straight = recover(net, "w4a16", calib, options=opts, **kw)
    path = tmp_path / "ckpt" / "recover.pt"
    with pytest.raises(_Stopped):  # killed during step 8: the last checkpoint is at step 6
        _recover(net, "w4a16", calib, options=opts, checkpoint=path, stop_after=7, **kw)
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    resumed = recover(net, "w4a16", calib, options=opts, checkpoint=path, **kw)
    assert resumed.resumed_from == 6
    for (name, a), (_, b) in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert straight.history.equals(resumed.history)
    assert (resumed.best_step, resumed.loss_after) == (straight.best_step, straight.loss_after)
    # a finished checkpoint returns at once, with the same result
    again = recover(net, "w4a16", calib, options=opts, checkpoint=path, **kw)
    assert again.resumed_from == 12 and again.steps_done == 12
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.model.parameters(), straight.model.parameters(), strict=True)
    )
    # another run's arguments are refused, naming the checkpoint and what differs
    with pytest.raises(ValueError, match=r"recover\.pt.*different lr"):
        recover(net, "w4a16", calib, options=opts, checkpoint=path, steps=12, lr=2e-3)
    with pytest.raises(ValueError, match="different plan"):
        recover(net, "w4a8_pc", calib, options=opts, checkpoint=path, **kw)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.proj = Conv1D(32, 64)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))  # [B, 8, 8, 8]
        h = torch.relu(self.conv1d(h.flatten(2))).mean(1)  # [B, 64]
        return self.head(torch.relu(self.proj(h)))


@pytest.fixture
def conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = ConvNet()
    net.bn.running_mean.uniform_(-0.2, 0.2)
    net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_convolutions_and_hf_conv1d_train_as_simulate_runs_them(conv_net: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 1, 8, 8, generator=gen) for _ in range(4)]
    running = conv_net.bn.running_mean.clone()
    conv_net.train()  # the user's mode is put back afterwards; training runs in eval mode
    res = recover(conv_net, "w4a8_pc", calib, steps=15, lr=1e-3, options=FAST, progress=False)
    assert conv_net.training and conv_net.bn.training
    conv_net.eval()
    assert torch.equal(conv_net.bn.running_mean, running)
    assert torch.equal(res.model.bn.running_mean, running)  # BatchNorm statistics frozen
    assert res.trained == ["conv", "conv1d", "proj", "head"]
    assert type(res.model.proj) is Conv1D and res.model.proj.weight.shape == (64, 32)
    rtn = held_out_kl(quantize(conv_net, "w4a8_pc", backend="simulate"), conv_net, calib[-2:])
    assert res.loss_before == pytest.approx(rtn, rel=1e-5)
    assert res.loss_after < res.loss_before
    assert not torch.equal(res.model.proj.weight, conv_net.proj.weight)


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.lstm(x)[0]))


def test_lstm_is_frozen_and_reported() -> None:
    torch.manual_seed(0)
    net = Tagger().eval()
    calib = [torch.randn(8, 5, 16) for _ in range(8)]
    plan = PrecisionPlan({"head": "w2a16_pc"}, default="w8a8")
    opts = RecoverOptions(eval_every=1, val_batches=2)
    res = recover(net, plan, calib, steps=20, lr=1e-3, options=opts, progress=False)
    assert res.trained == ["head"]
    assert list(res.frozen) == ["lstm"] and "LSTM" in res.frozen["lstm"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(res.model.lstm.parameters(), net.lstm.parameters(), strict=True)
    )
    assert torch.equal(res.model.norm.weight, net.norm.weight)  # train="layers"
    rtn = held_out_kl(quantize(net, plan, backend="simulate"), net, calib[-2:])
    assert res.loss_before == pytest.approx(rtn, rel=1e-5)  # the LSTM ran quantized
    assert res.loss_after < res.loss_before
    everything = recover(
        net, plan, calib, steps=20, lr=1e-3, options=replace(opts, train="all"), progress=False
    )
    assert everything.best_step > 0
    assert not torch.equal(everything.model.norm.weight, net.norm.weight)
    assert torch.equal(everything.model.lstm.weight_hh_l0, net.lstm.weight_hh_l0)


class Attender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(self.att(h, h, h)[0])


def test_embedding_and_attention_out_proj_are_frozen() -> None:
    torch.manual_seed(0)
    net = Attender().eval()
    calib = [torch.randint(0, 50, (4, 6)) for _ in range(6)]
    res = recover(net, "w4a16_pc", calib, steps=4, lr=1e-3, options=FAST, progress=False)
    assert res.trained == ["head"]
    assert list(res.frozen) == ["emb", "att.out_proj"]
    assert "Embedding" in res.frozen["emb"] and "MultiheadAttention" in res.frozen["att.out_proj"]
    rtn = held_out_kl(quantize(net, "w4a16_pc", backend="simulate"), net, calib[-2:])
    assert res.loss_before == pytest.approx(rtn, rel=1e-5)  # both ran quantized
    assert torch.equal(res.model.att.out_proj.weight, net.att.out_proj.weight)
    assert type(res.model.att.out_proj) is type(net.att.out_proj)


def test_a_diverging_run_stops_and_keeps_the_best(
    digits: tuple[nn.Module, list[torch.Tensor]],
) -> None:
    net, calib = digits

    def nan_in_training(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student, teacher) * (math.nan if torch.is_grad_enabled() else 1.0)

    opts = RecoverOptions(loss=nan_in_training)
    with pytest.warns(RuntimeWarning, match="became nan at step 1"):
        res = recover(net, "w4a16", calib, steps=10, options=opts, progress=False)
    assert res.steps_done == 1 and res.best_step == 0
    assert math.isfinite(res.loss_before) and res.loss_after == res.loss_before
    assert all(
        torch.equal(a, b) for a, b in zip(res.model.parameters(), net.parameters(), strict=True)
    )


def test_custom_and_mse_losses(digits: tuple[nn.Module, list[torch.Tensor]]) -> None:
    net, calib = digits

    def l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return (student - teacher).abs().mean()

    res = recover(
        net, "w4a16", calib, steps=10, lr=1e-3, options=RecoverOptions(loss=l1), progress=False
    )
    held_out = calib[-1]
    with torch.no_grad():
        expected = float(l1(quantize(net, "w4a16", backend="simulate")(held_out), net(held_out)))
    assert res.loss_before == pytest.approx(expected, rel=1e-5)
    mse = recover(
        net, "w4a16", calib, steps=10, lr=1e-3, options=RecoverOptions(loss="mse"), progress=False
    )
    with torch.no_grad():
        expected = float(
            F.mse_loss(quantize(net, "w4a16", backend="simulate")(held_out), net(held_out))
        )
    assert mse.loss_before == pytest.approx(expected, rel=1e-5)
    with pytest.raises(TypeError, match="scalar tensor"):
        recover(
            net,
            "w4a16",
            calib,
            steps=2,
            options=RecoverOptions(loss=lambda s, t: 1.0),
            progress=False,
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"calib": [torch.randn(4, 64)] * 3}, ValueError, "12 samples in 3 batches.*at least 16"),
        ({"calib": [torch.randn(32, 64)]}, ValueError, "1 batch.*at least 2"),
        ({"steps": 0}, ValueError, "'steps' argument must be a positive integer. Got 0"),
        ({"steps": 2.5}, ValueError, "'steps' argument must be a positive integer"),
        ({"lr": -1e-3}, ValueError, "'lr' argument must be a positive number. Got -0.001"),
        ({"lr": "fast"}, ValueError, "'lr' argument"),
        ({"plan": {"fc9": "w4a16"}}, ValueError, "fc9"),
        ({"options": {"loss": "kl"}}, TypeError, "must be a RecoverOptions or None. Got dict"),
        ({"checkpoint": 3}, ValueError, "'checkpoint' argument"),
    ],
)
def test_errors_before_any_work(kwargs: dict, error: type, match: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    args = {"plan": "w4a16", "calib": [torch.randn(8, 64) for _ in range(3)], **kwargs}
    plan, calib = args.pop("plan"), args.pop("calib")
    with pytest.raises(error, match=match):
        recover(net, plan, calib, progress=False, **args)


def test_options_are_checked() -> None:
    with pytest.raises(
        ValueError,
        match="'loss' option must be one of 'auto', 'bernoulli_kl', 'kl', 'kl_channels', 'mse'",
    ):
        RecoverOptions(loss="hinge")
    with pytest.raises(ValueError, match="'temperature' option"):
        RecoverOptions(temperature=0)
    with pytest.raises(ValueError, match="'weight_decay' option"):
        RecoverOptions(weight_decay=-1)
    opts = RecoverOptions(loss="mse", eval_every=3)
    assert RecoverOptions.from_dict(opts.to_dict()) == opts


def test_a_plan_with_calibrated_rounding_starts_from_it_and_returns_the_rtn_plan() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    batches = [torch.randn(16, 32) for _ in range(4)]
    plan = PrecisionPlan({"0": "w4a16+gptq"}, default="w2a16")
    res = recover(net, plan, batches, steps=10, lr=1e-3, progress=False)
    assert res.plan.resolve_choices(net) == {"0": "w4a16", "2": "w2a16"}
    rtn = recover(net, res.plan, batches, steps=10, lr=1e-3, progress=False)
    assert res.loss_before != rtn.loss_before  # GPTQ's start differs from round to nearest's
    quantize(res.model, res.plan, backend="simulate")  # runs without calibration data


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_an_expert_bank_trains_in_weight_only_schemes_from_its_calibrated_rounding(
    family: str,
) -> None:
    from helpers import HFMoE

    net = HFMoE(4, 32, 64, family).eval()
    gen = torch.Generator().manual_seed(2)
    calib = [torch.randn(16, 32, generator=gen) for _ in range(6)]
    plan = PrecisionPlan({"experts": "w2a16+gptq", "router": "fp32"})
    res = recover(net, plan, calib, steps=20, lr=1e-3, options=FAST, progress=False)
    assert res.trained == ["experts"] and not res.frozen
    sim = quantize(net, plan, backend="simulate", calib=calib[:-2])  # GPTQ on the train split
    # the fine-tune starts from the GPTQ rounding, the bank emulated in float32 on operands
    # rounded to bf16 (the simulated expert Linears round their outputs to bf16 too)
    assert res.loss_before == pytest.approx(held_out_kl(sim, net, calib[-2:]), rel=0.05)
    assert res.loss_after < res.loss_before
    assert not torch.equal(res.model.experts.down_proj, net.experts.down_proj)
    assert res.plan.resolve_choices(net)["experts"] == "w2a16"
    frozen = recover(net, "w8a8", calib, steps=2, options=FAST, progress=False)
    assert frozen.trained == ["router"] and "activations" in frozen.frozen["experts"]
    assert torch.equal(frozen.model.experts.gate_up_proj, net.experts.gate_up_proj)
    with pytest.raises(ValueError, match="(?s)'plan' argument leaves recover no layer.*'experts'"):
        recover(net, {"experts": "w8a8"}, calib, steps=2, options=FAST, progress=False)


def test_a_layer_whose_weight_is_read_not_called_stays_fp32() -> None:
    """``gate``'s weight is read directly (as Mamba's ``dt_proj``): its bf16 fake-quantized
    weight met the fp32 activations in a matrix product and training stopped with a dtype
    error. It now stays fp32, as ``quantize`` with calibration batches keeps it, and says why."""
    model = ReadsWeights().eval()
    batches = [torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with pytest.warns(UserWarning, match=r"1 layer\(s\) stay fp32.*'gate'"):
        res = recover(model, "w4a16_pc+gptq", batches, steps=4, lr=1e-3, progress=False)
    assert res.trained == ["proj", "head"]
    assert "reads its weights directly" in res.frozen["gate"]
    assert res.plan.resolve(model) == {"proj": "w4a16_pc", "gate": "fp32", "head": "w4a16_pc"}
    assert torch.equal(res.model.gate.weight, model.gate.weight)
    assert res.loss_after <= res.loss_before


def test_a_weight_normed_layer_trains_as_a_plain_one_and_the_users_model_keeps_its_own() -> None:
    """wav2vec2's positional conv is weight-normed: the fine-tune trains the weight its
    parametrization computes, as a plain parameter of the student's layer; the user's model
    (whose parametrized class torch's deepcopy shares with the student) is left as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 32, 3, padding=1)),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    ).eval()
    before = copy.deepcopy(model.state_dict())
    batches = [torch.randn(16, 4, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    res = recover(model, "w4a16_pc", batches, steps=6, lr=1e-3, progress=False)
    assert res.trained == ["0", "3"] and res.loss_after <= res.loss_before
    assert type(res.model[0]) is nn.Conv1d and "0.weight" in res.model.state_dict()
    assert nn.utils.parametrize.is_parametrized(model[0], "weight")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    with torch.inference_mode():
        quantize(res.model, res.plan, backend="simulate")(batches[0])


class _Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(torch.relu(self.conv(x))) * 3}


def test_auto_loss_of_segmentation_logits_is_kl_over_each_pixels_classes() -> None:
    """The default loss follows the profile's default metric: per-pixel KL over dimension 1
    (was: over the last dimension, the image's width)."""
    torch.manual_seed(0)
    net = _Segmenter().eval()
    calib = [torch.randn(8, 3, 6, 7) for _ in range(6)]
    opts = RecoverOptions()
    res = recover(net, "w4a8_pc", calib, steps=2, options=opts, progress=False)
    held_out = calib[-1]
    t = opts.temperature
    with torch.no_grad():
        student = quantize(net, "w4a8_pc", backend="simulate")(held_out)["logits"] / t
        teacher = net(held_out)["logits"] / t
    per_pixel = F.kl_div(
        student.log_softmax(1), teacher.log_softmax(1), log_target=True, reduction="none"
    ).sum(1)
    assert res.loss_before == pytest.approx(float(per_pixel.mean()) * t**2, rel=1e-5)


class _MultiLabel(nn.Module):
    """A multi-label classifier as Hugging Face configures one (``problem_type``)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"problem_type": "multi_label_classification"})()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) * 3


def test_auto_loss_of_a_multi_label_classifier_is_each_labels_bernoulli_kl() -> None:
    """The default loss of a multi-label classifier: the KL of each label's Bernoulli at the
    temperature (torch's binary cross-entropy against the teacher's sigmoid minus its
    entropy), the mean over labels; not a softmax over its labels."""
    torch.manual_seed(0)
    net = _MultiLabel().eval()
    calib = [torch.randn(8, 16) for _ in range(6)]
    opts = RecoverOptions()
    res = recover(net, "w4a8_pc", calib, steps=2, options=opts, progress=False)
    t = opts.temperature
    with torch.no_grad():
        student = quantize(net, "w4a8_pc", backend="simulate")(calib[-1]) / t
        teacher = net(calib[-1]) / t
    p = teacher.sigmoid()
    bce = F.binary_cross_entropy_with_logits
    per_label = bce(student, p, reduction="none") - bce(teacher, p, reduction="none")
    assert res.loss_before == pytest.approx(float(per_label.mean()) * t**2, rel=1e-4)
