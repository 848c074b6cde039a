"""The profiler: known rankings, fast path = slow path, inputs of every shape, bad inputs."""

from __future__ import annotations

import importlib
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from profile_models import (
    SENSITIVITY,
    ConvBN,
    DataDependent,
    DictInput,
    KnownSensitivity,
    TinyTransformer,
    batches,
    chain,
)
from torch import nn

from mpsearch.profile import COLUMNS, SensitivityProfile, heatmap_data, profile
from mpsearch.schemes import SCHEMES

ORDER = sorted(SENSITIVITY, key=SENSITIVITY.get)  # least to most sensitive


def _order(prof: SensitivityProfile, scheme: str, metric: str) -> list[str]:
    return list(prof.pivot(metric)[scheme].sort_values().index)


@pytest.fixture(scope="module")
def known() -> SensitivityProfile:
    model = KnownSensitivity().eval()
    calib = batches(4, 128, 64)
    fp32 = [model(x).detach() for x in calib]

    def evaluate(m: nn.Module) -> float:
        return -sum(float((m(x) - r).pow(2).mean()) for x, r in zip(calib, fp32, strict=True))

    def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return 0.5 * out.pow(2).mean()

    return profile(
        model,
        calib,
        schemes=["bf16", "w8a8", "w4a16"],
        metric="mse",
        evaluate=evaluate,
        loss_fn=loss_fn,
        hessian_samples=32,
        progress=False,
    )


@pytest.mark.parametrize("scheme", ["bf16", "w8a8", "w4a16"])
@pytest.mark.parametrize("metric", ["mse", "e2e", "task_drop", "hessian"])
def test_known_ranking_every_metric(known: SensitivityProfile, scheme: str, metric: str) -> None:
    assert _order(known, scheme, metric) == ORDER


@pytest.mark.parametrize("scheme", ["bf16", "w8a8", "w4a16"])
def test_known_ranking_sqnr_falls_with_sensitivity(known: SensitivityProfile, scheme: str) -> None:
    assert _order(known, scheme, "sqnr_db") == ORDER[::-1]


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_known_sensitivity_is_k_times(known: SensitivityProfile, scheme: str) -> None:
    for metric in ("mse", "e2e", "hessian"):
        col = known.pivot(metric)[scheme]
        ratios = {name: col[name] / col["b1"] for name in SENSITIVITY}
        for name, k in SENSITIVITY.items():
            assert ratios[name] == pytest.approx(k, rel=0.15), (metric, ratios)
    # task_drop is the e2e MSE summed over the 4 batches: the same numbers
    np.testing.assert_allclose(
        known.pivot("task_drop")[scheme], 4 * known.pivot("e2e")[scheme], rtol=1e-6
    )


def test_table_columns_sizes_and_attributes(known: SensitivityProfile) -> None:
    t = known.table
    assert list(t.columns) == list(COLUMNS)
    assert len(t) == 4 * 3 and set(t["status"]) == {"ok"} and set(t["runner"]) == {"graph:fx"}
    row = t[(t.layer == "b0") & (t.scheme == "w4a16")].iloc[0]
    assert row["params"] == 64 * 64 and row["layer_type"] == "Linear"
    assert row["bits_per_weight"] == SCHEMES["w4a16"].bits_per_weight((64, 64))
    assert row["weight_bytes"] == SCHEMES["w4a16"].weight_storage_bits((64, 64)) / 8
    assert known.schemes == ["bf16", "w8a8", "w4a16"] and known.layers == list(SENSITIVITY)
    assert known.e2e_metric == "mse" and known.baseline_quality == 0.0


def test_auto_metric_and_no_evaluate_gives_nan() -> None:
    prof = profile(KnownSensitivity().eval(), batches(2, 16, 64), schemes=["w8a8"], progress=False)
    assert prof.e2e_metric == "kl"
    assert prof.table["task_drop"].isna().all() and prof.table["hessian"].isna().all()
    assert _order(prof, "w8a8", "e2e") == ORDER
    regressor = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    assert (
        profile(regressor, batches(2, 4, 8), schemes=["w8a8"], progress=False).e2e_metric == "mse"
    )


def test_callable_metric() -> None:
    def max_abs(ref: torch.Tensor, out: torch.Tensor) -> float:
        return float((ref - out).abs().max())

    prof = profile(KnownSensitivity().eval(), batches(2, 16, 64), schemes=["w8a8"], metric=max_abs)
    assert prof.e2e_metric == "max_abs"
    assert (prof.table["e2e"] > 0).all()


def test_predict_pivot_error(known: SensitivityProfile) -> None:
    plan = {"b0": "w8a8", "b1": "fp32", "b2": "w4a16"}
    expected = known.error("b0", "w8a8") + known.error("b2", "w4a16")
    assert known.predict(plan) == expected
    assert known.predict({"b0": "fp32"}) == 0.0
    assert known.pivot("mse").shape == (4, 3)
    with pytest.raises(ValueError, match="additive"):
        known.predict(plan, metric="sqnr_db")
    with pytest.raises(ValueError, match="'layer'"):
        known.error("nope", "w8a8")
    with pytest.raises(ValueError, match="'scheme'"):
        known.error("b0", "fp8")


def test_heatmap_data(known: SensitivityProfile) -> None:
    matrix, rows, cols = heatmap_data(known, "e2e")
    assert rows == known.layers and cols == known.schemes
    assert matrix[rows.index("b2"), cols.index("w8a8")] == known.error("b2", "w8a8")


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_round_trip(known: SensitivityProfile, tmp_path, fmt: str) -> None:
    path = tmp_path / f"prof.{fmt}"
    getattr(known, f"to_{fmt}")(path)
    back = getattr(SensitivityProfile, f"read_{fmt}")(path)
    pd.testing.assert_frame_equal(back.table, known.table, check_exact=True)
    for attr in ("schemes", "layers", "e2e_metric", "baseline_quality", "info"):
        assert getattr(back, attr) == getattr(known, attr)


def test_round_trip_keeps_skips_and_infinities(tmp_path) -> None:
    net = nn.Sequential(nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with pytest.warns(UserWarning, match="skipped"):
        prof = profile(net, batches(2, 4, 9), schemes=["w4a16", "fp32"], progress=False)
    for fmt in ("parquet", "csv"):
        getattr(prof, f"to_{fmt}")(tmp_path / f"p.{fmt}")
        back = getattr(SensitivityProfile, f"read_{fmt}")(tmp_path / f"p.{fmt}")
        pd.testing.assert_frame_equal(back.table, prof.table, check_exact=True)


def test_group_size_skip_is_visible() -> None:
    net = nn.Sequential(nn.Linear(9, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    with pytest.warns(UserWarning, match="1 \\(layer, scheme\\) pairs were skipped"):
        prof = profile(net, batches(2, 4, 9), schemes=["w4a16", "w8a8"], progress=False)
    t = prof.table.set_index(["layer", "scheme"])
    assert t.loc[("0", "w4a16"), "status"] == "skipped"
    assert "does not divide" in t.loc[("0", "w4a16"), "reason"]
    assert math.isnan(t.loc[("0", "w4a16"), "e2e"])
    assert t.loc[("2", "w4a16"), "status"] == "ok" and t.loc[("0", "w8a8"), "reason"] == ""
    with pytest.raises(ValueError, match="skipped"):
        prof.predict({"0": "w4a16"})


def test_fp32_rows_are_zero() -> None:
    prof = profile(chain(3), batches(2, 4, 32), schemes=["fp32", "w8a8"], progress=False)
    zeros = prof.table[prof.table.scheme == "fp32"]
    assert (zeros["mse"] == 0).all() and (zeros["e2e"] == 0).all()
    assert (zeros["sqnr_db"] == math.inf).all()


def test_layers_subset_and_max_batches() -> None:
    prof = profile(chain(4), batches(5, 4, 32), schemes=["w8a8"], layers=["4", "0"], max_batches=2)
    assert prof.layers == ["0", "4"] and prof.info["batches"] == 2


# ---- the fast path equals the slow one ----------------------------------------------------


def _inputs(n: int = 3) -> list[dict[str, torch.Tensor]]:
    return [
        {"image": x, "extra": y}
        for x, y in zip(batches(n, 6, 16), batches(n, 6, 8, seed=1), strict=True)
    ]


def test_dict_input_graph_equals_hooks() -> None:
    torch.manual_seed(0)
    fast_model = DictInput().eval()
    slow_model = DataDependent().eval()
    slow_model.load_state_dict(fast_model.state_dict())
    schemes = ["bf16", "w8a8", "w8a16"]
    # exact mode in both: "auto" rates the hook runner's work higher (whole-model re-runs)
    fast = profile(fast_model, _inputs(), schemes=schemes, progress=False, e2e_samples=None)
    with pytest.warns(UserWarning, match="hook runner"):
        slow = profile(slow_model, _inputs(), schemes=schemes, progress=False, e2e_samples=None)
    assert fast.info["runner"] == "graph:fx" and slow.info["runner"] == "hooks"
    for metric in ("mse", "sqnr_db", "e2e"):
        np.testing.assert_allclose(fast.pivot(metric), slow.pivot(metric), rtol=1e-5)


def test_multi_tensor_tuple_input() -> None:
    torch.manual_seed(0)
    model = DictInput().eval()
    as_tuples = [(b["image"], b["extra"]) for b in _inputs()]
    a = profile(model, as_tuples, schemes=["w8a8"], progress=False)
    b = profile(model, _inputs(), schemes=["w8a8"], progress=False)
    pd.testing.assert_frame_equal(a.table, b.table)


def test_transformer_with_int_batch_sizes_matches_full_reruns() -> None:
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 32, (4, 12), generator=g) for _ in range(2)]
    schemes = ["bf16", "w8a8", "w4a16"]
    prof = profile(model, calib, schemes=schemes, progress=False)
    assert prof.info["runner"] == "graph:fx" and prof.e2e_metric == "kl"
    # the reference: each (layer, scheme) quantized with mpsearch.quantize and the whole model run
    from mpsearch.backends import quantize
    from mpsearch.profile import kl_divergence

    for layer in prof.layers:
        for scheme in schemes:
            qm = quantize(model, {layer: scheme})
            with torch.inference_mode():
                kl = np.mean([kl_divergence(model(x), qm(x)) for x in calib])
            assert prof.error(layer, scheme) == pytest.approx(kl, rel=1e-4, abs=1e-12)


def test_residual_cnn_with_bn_matches_quantize_on_folded_model() -> None:
    from mpsearch.backends import quantize
    from mpsearch.layers._batchnorm import fold_batchnorm
    from mpsearch.profile import kl_divergence

    model = ConvBN().eval()
    calib = batches(2, 4, 3, 6, 6)
    prof = profile(model, calib, schemes=["w8a8", "bf16"], progress=False)
    assert prof.info["runner"] == "graph:fx"
    assert model.relu.inplace is True  # the user's model is untouched (still in-place)
    folded = fold_batchnorm(model)
    for layer in prof.layers:
        for scheme in ("w8a8", "bf16"):
            qm = quantize(folded, {layer: scheme})
            with torch.inference_mode():
                kl = np.mean([kl_divergence(folded(x), qm(x)) for x in calib])
            assert prof.error(layer, scheme) == pytest.approx(kl, rel=1e-4, abs=1e-12)


class _Segmenter(nn.Module):
    """Per-pixel class logits ``[B, C, H, W]`` in a dict, with the hidden features beside."""

    def __init__(self, key: str = "logits") -> None:
        super().__init__()
        self.key = key
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.relu(self.conv(x))
        return {self.key: self.head(hidden) * 4, "hidden": hidden}


@pytest.mark.parametrize("hooks", [False, True])
@pytest.mark.parametrize(
    ("key", "metric"), [("logits", "kl_channels"), ("last_hidden_state", "mse")]
)
def test_default_metric_follows_the_outputs_name(monkeypatch, hooks, key, metric) -> None:
    """Segmentation logits are compared per pixel over their classes (dimension 1), a field
    holding no logits by MSE (was: KL over the last dimension, the image's width, for both),
    on the graph and on the hook runner."""
    from mpsearch.backends import quantize
    from mpsearch.profile import E2E_METRICS

    if hooks:
        monkeypatch.setattr(importlib.import_module("mpsearch.profile._runner"), "CAPTURES", {})
    torch.manual_seed(0)
    model = _Segmenter(key).eval()
    calib = batches(2, 4, 3, 6, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook runner's note
        prof = profile(model, calib, schemes=["w4a8_pc", "w8a8"], progress=False, e2e_samples=None)
    assert prof.info["runner"] == ("hooks" if hooks else "graph:fx")
    assert prof.e2e_metric == metric
    fn = E2E_METRICS[metric]
    for layer in prof.layers:
        for scheme in ("w4a8_pc", "w8a8"):
            qm = quantize(model, {layer: scheme})
            with torch.inference_mode():
                want = np.mean([fn(model(x)[key], qm(x)[key]) for x in calib])
            assert prof.error(layer, scheme) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("hooks", [False, True])
def test_a_multi_label_classifier_is_profiled_by_each_labels_bernoulli_kl(
    monkeypatch, hooks
) -> None:
    """A Hugging Face BERT configured for multi-label classification (random-initialised from
    its config): the profile reads ``problem_type`` and compares its sigmoids, not a softmax
    over its labels, on the graph and on the hook runner; each row equals the metric of the
    model with that layer quantized."""
    pytest.importorskip("transformers")
    from helpers import tiny_multi_label_bert

    from mpsearch.backends import quantize
    from mpsearch.profile import bernoulli_kl

    if hooks:
        monkeypatch.setattr(importlib.import_module("mpsearch.profile._runner"), "CAPTURES", {})
    model = tiny_multi_label_bert()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(1, 100, (8, 10), generator=g)} for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook runner's note
        prof = profile(model, calib, schemes=["w4a8_pc"], progress=False, e2e_samples=None)
    assert prof.info["runner"] == ("hooks" if hooks else "graph:fx(values)")
    assert prof.e2e_metric == "bernoulli_kl"
    for layer in prof.layers[-3:]:
        qm = quantize(model, {layer: "w4a8_pc"})
        with torch.inference_mode():
            want = np.mean([bernoulli_kl(model(**b).logits, qm(**b).logits) for b in calib])
        assert prof.error(layer, "w4a8_pc") == pytest.approx(want, rel=1e-4, abs=1e-12)


def test_the_padding_of_a_language_models_batches_is_left_out_of_its_rows() -> None:
    """A causal LM on right-padded batches (random-initialised GPT-2): each row is the KL over
    the real tokens of the model with that layer quantized, not over the padding too."""
    pytest.importorskip("transformers")
    from helpers import tiny_gpt2

    from mpsearch.backends import quantize
    from mpsearch.profile import kl_divergence

    model = tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    calib = []
    for _ in range(2):
        lengths = torch.randint(3, 11, (6,), generator=g)
        mask = (torch.arange(10) < lengths[:, None]).long()
        calib.append(
            {"input_ids": torch.randint(0, 64, (6, 10), generator=g), "attention_mask": mask}
        )
    prof = profile(model, calib, schemes=["w4a8_pc"], progress=False, e2e_samples=None)
    assert prof.info["runner"].startswith("graph:")
    for layer in prof.layers:
        qm = quantize(model, {layer: "w4a8_pc"})
        real, padded = [], []
        with torch.inference_mode():
            for b in calib:
                ref, out, mask = model(**b).logits, qm(**b).logits, b["attention_mask"].bool()
                real.append(kl_divergence(ref[mask], out[mask]))
                padded.append(kl_divergence(ref, out))
        assert prof.error(layer, "w4a8_pc") == pytest.approx(np.mean(real), rel=1e-4)
        assert prof.error(layer, "w4a8_pc") != pytest.approx(np.mean(padded), rel=1e-3)


def test_non_finite_quantized_output_is_inf_not_silent() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        net[0].weight.fill_(3e4)
    prof = profile(net, [torch.full((2, 4), 10.0)], schemes=["fp16"], metric="mse", progress=False)
    row = prof.table.set_index("layer").loc["0"]
    assert row["e2e"] == math.inf and row["reason"] == "quantized output not finite"


# ---- bad inputs: clear errors before any work ----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"schemes": ["w8a8", "int3"]}, ValueError, "'schemes'.*'w8a8'"),
        ({"schemes": []}, ValueError, "non-empty"),
        ({"schemes": ["w8a8", "w8a8"]}, ValueError, "duplicates"),
        ({"metric": "cosine"}, ValueError, "'metric'"),
        ({"layers": ["nope"]}, ValueError, "'layers'"),
        ({"max_batches": 0}, ValueError, "'max_batches'"),
        ({"backend": "tpu"}, ValueError, "'backend'"),
        ({"evaluate": 3}, ValueError, "'evaluate'"),
        ({"progress": "yes"}, ValueError, "'progress'"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        profile(chain(2), batches(1, 2, 32), **kwargs)


def test_empty_calibration_data() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        profile(chain(2), [])


def test_nan_calibration_output() -> None:
    calib = batches(2, 2, 32)
    calib[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 1 is not finite"):
        profile(chain(2), calib)


def test_nan_output_on_the_first_batch_is_refused_on_the_graph() -> None:
    """The graph reproduces the NaN: the error comes at once, not after the hook runner."""
    calib = batches(2, 2, 32)
    calib[0][0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the hook runner would warn
        with pytest.raises(ValueError, match="batch 0 is not finite"):
            profile(chain(2), calib)


def test_metric_that_raises_is_reported_up_front() -> None:
    def broken(ref: torch.Tensor, out: torch.Tensor) -> float:
        raise KeyError("oops")

    with pytest.raises(RuntimeError, match="'broken' failed on fp32 vs fp32.*KeyError"):
        profile(chain(2), batches(1, 2, 32), metric=broken)


def test_not_a_model() -> None:
    with pytest.raises(TypeError, match="'model'"):
        profile(lambda x: x, batches(1, 2, 32))


def test_silent_without_tty(capsys) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        profile(chain(2), batches(1, 2, 32), schemes=["w8a8"])
    assert capsys.readouterr().err == ""


class _TwiceCalled(nn.Module):
    """One Linear applied twice, with data-dependent control flow (the hook runner)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin(x))
        if bool(h.sum() > -1e9):  # data-dependent: not traceable
            h = torch.relu(self.lin(h))
        return self.head(h)


def test_a_schemes_rows_do_not_depend_on_the_other_schemes_profiled() -> None:
    """The hook runner's local pairs at a layer's second call are taken on its fp32 input (in
    a substituted run that input went through the quantized first call), so no scheme's rows
    depend on the others'."""
    torch.manual_seed(0)
    model = _TwiceCalled().eval()
    data = batches(3, 8, 16)
    with pytest.warns(UserWarning, match="hook runner"):
        both = profile(model, data, schemes=["w4a16", "w8a8"], progress=False, e2e_samples=None)
    with pytest.warns(UserWarning, match="hook runner"):
        alone = profile(model, data, schemes=["w8a8"], progress=False, e2e_samples=None)
    for metric in ("mse", "sqnr_db", "e2e"):
        np.testing.assert_allclose(
            both.pivot(metric)["w8a8"], alone.pivot(metric)["w8a8"], rtol=1e-6
        )


def test_profile_states_its_coverage_and_warns_when_most_is_left_out() -> None:
    class Mostly(nn.Module):  # a large module no scheme can take (nn.Bilinear), then a Linear
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Bilinear(16, 16, 16)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.mix(x, x))

    torch.manual_seed(0)
    model = Mostly().eval()
    with pytest.warns(UserWarning, match=r"cover 1\.6% .*left out: mix \(Bilinear"):
        prof = profile(model, [torch.randn(8, 16)], schemes=["w8a8"], progress=False)
    assert prof.info["coverage"] == pytest.approx(68 / (68 + 16 * 16 * 16 + 16))
    assert "mix (Bilinear" in prof.info["coverage_note"]


class _Durations(nn.Module):
    """A length predicted from the input sets the output's length, as a speech model's
    predicted durations set its waveform's: 1.35 > 1.34 in fp32 and bf16 (0.3496 + 1), 1.333
    after w4a16_pc rounds 0.35 to 5/15 (one scale for [0, 1]): one row shorter."""

    def __init__(self) -> None:
        super().__init__()
        self.dur = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.dur.weight.copy_(torch.tensor([[0.35, 1.0]]))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = 4 + int(bool(self.dur(x[:, 0, :2]).mean() > 1.34))
        return self.head(x)[:, :length]


def test_a_scheme_that_changes_the_outputs_shape_gets_an_infinite_error() -> None:
    """Bug: the profile raised torch.stack's size mismatch; the pair is now kept with an
    infinite end-to-end error (the search leaves it out), the reason and a warning."""
    torch.manual_seed(0)
    calib = []
    for b in batches(3, 8, 6, 4):
        b[:, 0, :2] = 1.0
        calib.append(b)
    with pytest.warns(UserWarning, match="infinite end-to-end error"):
        prof = profile(_Durations().eval(), calib, schemes=["bf16", "w4a16_pc"], progress=False)
    table = prof.table.set_index(["layer", "scheme"])
    assert table.loc[("dur", "w4a16_pc"), "e2e"] == math.inf
    assert table.loc[("dur", "w4a16_pc"), "reason"] == (
        "quantized output changes shape: (8, 4, 3) where the fp32 output is (8, 5, 3)"
    )
    assert np.isfinite(table.loc[("dur", "bf16"), "e2e"])
    assert np.isfinite(table.loc[("head", "w4a16_pc"), "e2e"])


def test_a_model_whose_output_changes_between_fp32_runs_is_refused() -> None:
    """A forward that samples at random: every graph capture is refused, and the hook runner
    says why before profiling rows that would compare noise."""

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + 0.1 * torch.randn(x.shape[0], 4)

    with (
        pytest.raises(ValueError, match=r"argument 'model'.*changes from one fp32 run to the next"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        profile(Noisy().eval(), batches(2, 4, 8), schemes=["w8a8"], progress=False)
