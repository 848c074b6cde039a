from __future__ import annotations

import dataclasses
import json
import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_gpt2, tiny_multi_label_bert
from torch import nn

from mpsearch.backends import quantize
from mpsearch.plan import PrecisionPlan
from mpsearch.runtime import CalibrateOptions, Controller
from mpsearch.runtime import _controller as controller_module
from mpsearch.runtime._scorers import GateScorer, ratio_score


def _ctrl(model: nn.Module, plans=("w8a8", "fp32"), **kwargs) -> Controller:
    return Controller(model, list(plans), backend="marker", order="given", **kwargs)


def _calibrated(model, make_inputs, plans=("w8a8", "fp32"), **kwargs):
    ctrl = _ctrl(model, plans, **kwargs)
    x, _ = make_inputs(400, seed=1)
    report = ctrl.calibrate(list(x.split(32)), max_disagreement=0.05, delta=0.1)
    return ctrl, report


def test_escalates_exactly_the_hard_inputs(model, make_inputs) -> None:
    ctrl, report = _calibrated(model, make_inputs)
    assert report.certified
    assert report.empirical_disagreement == 0.0
    x, _ = make_inputs(300, seed=2)
    y = ctrl(x)
    hard = x[:, 0] > 0.5
    audit = ctrl.audit
    assert audit["variant"].tolist() == hard.long().tolist()
    assert audit["passes"].tolist() == (hard.long() + 1).tolist()
    # Served outputs: the reference's on hard rows, the cheap variant's elsewhere.
    with torch.inference_mode():
        cheap = ctrl.variants[0].module(x)
        ref = model(x)
    torch.testing.assert_close(y[hard], ref[hard], rtol=0, atol=0)
    torch.testing.assert_close(y[~hard], cheap[~hard], rtol=0, atol=0)
    assert bool((y.argmax(-1) == ref.argmax(-1)).all())


def test_report_shares_and_cost(model, make_inputs) -> None:
    ctrl, report = _calibrated(model, make_inputs)
    x, _ = make_inputs(400, seed=1)
    hard_share = float((x[:, 0] > 0.5).float().mean())
    assert report.share["w8a8"] == pytest.approx(1 - hard_share)
    assert report.share["fp32"] == pytest.approx(hard_share)
    costs = report.variant_costs_ms
    expected = costs["w8a8"] + hard_share * costs["fp32"]
    assert report.expected_cost_ms == pytest.approx(expected)
    assert report.version == ctrl.thresholds_version == 1
    assert report.thresholds == (ctrl.threshold,)
    scores = ctrl.stage_scores(ctrl.stage_outputs([x]))[0]
    hard = (x[:, 0] > 0.5).numpy()
    assert scores[~hard].max() <= ctrl.threshold < scores[hard].min()  # splits easy from hard


def test_uncalibrated_controller_serves_the_reference(model, make_inputs) -> None:
    ctrl = _ctrl(model)
    x, _ = make_inputs(20, seed=3)
    y = ctrl(x)
    with torch.inference_mode():
        torch.testing.assert_close(y, model(x))
    assert set(ctrl.audit["variant"]) == {1}


def test_decisions_are_deterministic(model, make_inputs) -> None:
    a, _ = _calibrated(model, make_inputs)
    b, _ = _calibrated(make_model_copy(model), make_inputs)
    assert a.threshold == b.threshold
    x, _ = make_inputs(64, seed=4)
    ya1, ya2, yb = a(x), a(x), b(x)
    torch.testing.assert_close(ya1, ya2, rtol=0, atol=0)
    torch.testing.assert_close(ya1, yb, rtol=0, atol=0)
    log = a.audit
    first, second = log.iloc[:64], log.iloc[64:]
    assert first["variant"].tolist() == second["variant"].tolist()
    np.testing.assert_array_equal(first["score_0"].to_numpy(), second["score_0"].to_numpy())
    assert log["variant"].tolist()[:64] == b.audit["variant"].tolist()


def make_model_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_audit_matches_decisions(model, make_inputs) -> None:
    ctrl, _ = _calibrated(model, make_inputs)
    x1, _ = make_inputs(10, seed=5)
    x2, _ = make_inputs(7, seed=6)
    ctrl(x1)
    ctrl(x2)
    log = ctrl.audit
    assert log["input_id"].tolist() == list(range(17))
    assert log["call_id"].tolist() == [0] * 10 + [1] * 7
    assert log["position"].tolist() == list(range(10)) + list(range(7))
    assert log["batch_size"].tolist() == [10] * 10 + [7] * 7
    x = torch.cat([x1, x2])
    scores = ratio_score(ctrl.variants[0].module(x).detach())  # the default scorer
    np.testing.assert_allclose(log["score_0"].to_numpy(), scores.numpy(), rtol=1e-6)
    hard = (scores > ctrl.threshold).long().tolist()
    assert log["variant"].tolist() == hard
    assert log["plan"].tolist() == [["w8a8", "fp32"][v] for v in hard]
    assert (log["thresholds_version"] == 1).all()
    assert (log["threshold"] == ctrl.threshold).all()
    assert (log["latency_ms"] > 0).all()
    # An escalated input pays both passes: its cost share exceeds an easy input's in its call.
    call0 = log[log["call_id"] == 0]
    if call0["variant"].nunique() == 2:
        assert (
            call0[call0["variant"] == 1]["cost_ms"].min()
            > call0[call0["variant"] == 0]["cost_ms"].max() - 1e-12
        )


def test_three_variant_cascade(model, make_inputs) -> None:
    ctrl = _ctrl(model, ("w8a8", "bf16", "fp32"))
    x, _ = make_inputs(500, seed=7)
    report = ctrl.calibrate(list(x.split(50)), max_disagreement=0.05, delta=0.1)
    assert report.certified and report.empirical_disagreement == 0.0
    xt, _ = make_inputs(200, seed=8)
    y = ctrl(xt)
    marker = xt[:, 0]
    expected = torch.where(marker > 0.8, 2, torch.where(marker > 0.5, 1, 0))
    log = ctrl.audit
    assert log["variant"].tolist() == expected.tolist()
    # Stage-1 scores exist exactly for the inputs that reached stage 1.
    assert log["score_1"].notna().tolist() == (expected >= 1).tolist()
    with torch.inference_mode():
        torch.testing.assert_close(y.argmax(-1), model(xt).argmax(-1))
    assert sum(report.share.values()) == pytest.approx(1.0)


def test_concurrent_calls_equal_serial_calls(model, make_inputs) -> None:
    serial, _ = _calibrated(model, make_inputs)
    threaded, _ = _calibrated(make_model_copy(model), make_inputs)
    batches = [make_inputs(16, seed=100 + i)[0] for i in range(24)]
    expected = [serial(b) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(threaded, batches))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(e, g, rtol=0, atol=0)
    log = threaded.audit
    assert len(log) == 24 * 16
    assert sorted(log["input_id"]) == list(range(24 * 16))
    # Each call's rows are contiguous ids; decisions per call equal the serial ones.
    by_call = {cid: rows for cid, rows in log.groupby("call_id")}
    serial_log = serial.audit
    serial_decisions = sorted(tuple(rows["variant"]) for _, rows in serial_log.groupby("call_id"))
    threaded_decisions = sorted(tuple(rows["variant"]) for rows in by_call.values())
    assert serial_decisions == threaded_decisions
    for rows in by_call.values():
        ids = rows["input_id"].tolist()
        assert ids == list(range(ids[0], ids[0] + len(ids)))


def test_weights_never_mutated_and_fp32_plan_shares_model(model, make_inputs) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctrl, _ = _calibrated(model, make_inputs)
    cheap_before = {k: v.clone() for k, v in ctrl.variants[0].module.state_dict().items()}
    for seed in range(3):
        ctrl(make_inputs(32, seed=seed)[0])
    assert ctrl.variants[1].module is model and ctrl.variants[1].shared
    assert not ctrl.variants[0].shared
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in ctrl.variants[0].module.state_dict().items():
        assert torch.equal(v, cheap_before[k])


def test_identical_plans_share_one_variant(model) -> None:
    ctrl = _ctrl(model, ["w8a8", PrecisionPlan({"0": "w8a8"}), "fp32"])
    assert [v.name for v in ctrl.variants] == ["w8a8", "fp32"]


def _fake_timing(
    monkeypatch, model: nn.Module, costs: dict[str, float], threads: list[int] | None = None
) -> None:
    """Variants "measured" at known costs (ms per call), by the marker cutoff of their layer;
    the intra-op threads of each measurement appended to ``threads``."""
    names = {0.5: "w8a8", 0.8: "bf16"}

    def fake(module: nn.Module, batch, *, repeats: int = 3) -> float:
        if threads is not None:
            threads.append(torch.get_num_threads())
        if module is model:
            return costs["fp32"]
        return costs[names[module[0].cutoff]]

    monkeypatch.setattr(controller_module, "time_module", fake)


def test_orders_the_cheaper_stages_by_measured_cost(model, monkeypatch) -> None:
    _fake_timing(monkeypatch, model, {"w8a8": 2.0, "bf16": 1.0, "fp32": 8.0})
    ctrl = Controller(model, ["w8a8", "bf16"], backend="marker", example_input=torch.zeros(4, 8))
    assert [v.name for v in ctrl.variants] == ["bf16", "w8a8", "fp32"]
    assert [v.cost_ms for v in ctrl.variants] == [0.25, 0.5, 2.0]
    given = Controller(
        model, ["w8a8", "bf16"], backend="marker", example_input=torch.zeros(4, 8), order="given"
    )
    assert [v.name for v in given.variants] == ["w8a8", "bf16", "fp32"]


def test_the_reference_is_never_chosen_by_timing(model, make_inputs, monkeypatch) -> None:
    """A quantized variant measured slower than fp32 used to become the last stage and so the
    reference the guarantee was certified against; now the reference stays fp32 and the slower
    stage is dropped with a warning naming it and both timings."""
    _fake_timing(monkeypatch, model, {"w8a8": 5.0, "bf16": 0.5, "fp32": 1.0})
    with pytest.warns(UserWarning, match=r"'w8a8' measured 5 ms.*reference 'fp32' \(1 ms\)"):
        ctrl = Controller(
            model, ["w8a8", "fp32"], backend="marker", example_input=torch.zeros(1, 8)
        )
    assert [v.name for v in ctrl.variants] == ["fp32"] and ctrl.variants[-1].module is model
    with pytest.warns(UserWarning, match="'w8a8'.*dropped"):
        three = Controller(
            model, ["w8a8", "bf16", "fp32"], backend="marker", example_input=torch.zeros(1, 8)
        )
    assert [v.name for v in three.variants] == ["bf16", "fp32"]
    x, _ = make_inputs(400, seed=1)
    report = three.calibrate(list(x.split(32)), max_disagreement=0.05)
    served = three(x)
    with torch.inference_mode():
        agree = float((served.argmax(-1) == model(x).argmax(-1)).float().mean())
    assert report.certified and agree == 1.0  # certified and served against fp32 itself
    with pytest.warns(UserWarning, match=r"'w8a8'.*kept \(order='given'\)"):
        kept = Controller(
            model, ["w8a8"], backend="marker", example_input=torch.zeros(1, 8), order="given"
        )
    assert [v.name for v in kept.variants] == ["w8a8", "fp32"]


def test_the_reference_is_the_one_the_user_names(model) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctrl = _ctrl(model, ["w8a8"], reference="bf16")
    assert [v.name for v in ctrl.variants] == ["w8a8", "bf16"]
    assert not ctrl.variants[-1].shared
    # the default reference is the full-precision model itself, appended when not given
    default = _ctrl(model, ["w8a8"])
    assert [v.name for v in default.variants] == ["w8a8", "fp32"]
    assert default.variants[-1].module is model
    # a plan equal to the reference is the reference, wherever it was given
    first = _ctrl(model, ["fp32", "w8a8", "bf16"], reference="bf16")
    assert [v.name for v in first.variants] == ["fp32", "w8a8", "bf16"]
    with pytest.raises(ValueError, match=r"(?s)reference.*'marker'.*only runs"):
        _ctrl(model, ["w8a8"], reference="w8a16")


def test_gate_scorer_learns_the_marker(model, make_inputs) -> None:
    ctrl = _ctrl(model, scorer="gate")
    x, _ = make_inputs(600, seed=9)
    report = ctrl.calibrate(list(x.split(40)), max_disagreement=0.05, delta=0.1)
    assert isinstance(ctrl.scorer, GateScorer)
    assert report.n_fit == 180 and report.n_test == 420
    assert report.certified
    xt, _ = make_inputs(200, seed=10)
    ctrl(xt)
    assert ctrl.audit["variant"].tolist() == (xt[:, 0] > 0.5).long().tolist()


def test_callable_scorer(model, make_inputs) -> None:
    ctrl = _ctrl(model, scorer=lambda logits: -logits.max(-1).values)
    x, _ = make_inputs(600, seed=11)
    report = ctrl.calibrate(list(x.split(40)), max_disagreement=0.05, delta=0.1)
    assert report.n_fit == 180 and report.certified
    xt, _ = make_inputs(100, seed=12)
    ctrl(xt)
    assert ctrl.audit["variant"].tolist() == (xt[:, 0] > 0.5).long().tolist()


def test_quality_drop_target_with_labels(model, make_inputs) -> None:
    ctrl = _ctrl(model)
    x, y = make_inputs(400, seed=13)
    report = ctrl.calibrate(
        list(x.split(32)), labels=list(y.split(32)), max_quality_drop=0.05, delta=0.1
    )
    assert report.targets == {"quality_drop": 0.05}
    assert report.empirical_quality_drop == 0.0
    assert report.certified
    with pytest.raises(ValueError, match="needs labels"):
        ctrl.calibrate(list(x.split(32)), max_quality_drop=0.05)


def test_language_model_outputs_keep_their_shape() -> None:
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, 32)
            self.head = nn.Linear(32, 16)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(tokens))

    torch.manual_seed(0)
    lm = TinyLM().eval()
    ctrl = Controller(lm, ["w4a16", "fp32"], backend="simulate", order="given")
    tokens = torch.randint(0, 16, (12, 5), generator=torch.Generator().manual_seed(0))
    report = ctrl.calibrate([tokens], max_disagreement=0.5, delta=0.5)
    assert report.n_calibration == 12
    scores = ratio_score(ctrl.variants[0].module(tokens)[:, -1].detach())
    ctrl.set_threshold(float(scores.median()))
    out = ctrl(tokens)
    assert out.shape == (12, 5, 16)
    hard = scores > ctrl.threshold
    with torch.inference_mode():
        ref, cheap = lm(tokens), ctrl.variants[0].module(tokens)
    torch.testing.assert_close(out[hard], ref[hard], rtol=0, atol=0)
    torch.testing.assert_close(out[~hard], cheap[~hard], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, math.nan, "0.1", True])
def test_bad_epsilon_and_delta_are_refused(model, make_inputs, bad) -> None:
    ctrl = _ctrl(model)
    x, _ = make_inputs(50, seed=0)
    with pytest.raises(ValueError, match="'max_disagreement'"):
        ctrl.calibrate([x], max_disagreement=bad)
    with pytest.raises(ValueError, match="'delta'"):
        ctrl.calibrate([x], max_disagreement=0.1, delta=bad)
    with pytest.raises(ValueError, match="'max_quality_drop'"):
        ctrl.calibrate([x], max_quality_drop=bad, labels=[torch.zeros(50)])


def test_empty_calibration_data_is_refused(model) -> None:
    ctrl = _ctrl(model)
    with pytest.raises(ValueError, match="'data'.*non-empty"):
        ctrl.calibrate([])


def test_scorer_returning_nan_is_refused(model, make_inputs) -> None:
    ctrl = _ctrl(model, scorer=lambda logits: torch.full((logits.shape[0],), math.nan))
    x, _ = make_inputs(50, seed=0)
    with pytest.raises(ValueError, match="returned NaN"):
        ctrl.calibrate([x])
    with pytest.raises(ValueError, match="returned NaN"):
        ctrl(x)
    bad_shape = _ctrl(model, scorer=lambda logits: logits)
    with pytest.raises(ValueError, match=r"shape \[50\]"):
        bad_shape(x)


def test_plans_that_cannot_run_are_refused_before_work(model) -> None:
    with pytest.raises(ValueError, match=r"(?s)plans\[1\].*'marker'.*w8a16.*only runs"):
        Controller(model, ["w8a8", "w8a16"], backend="marker")
    with pytest.raises(ValueError, match="'nope'"):
        Controller(model, ["w8a8", PrecisionPlan({"nope": "bf16"})], backend="marker")
    with pytest.raises(ValueError, match="'backend'"):
        Controller(model, ["w8a8"], backend="no-such-backend")
    with pytest.raises(ValueError, match="'scorer'"):
        Controller(model, ["w8a8"], backend="marker", scorer="psychic")
    with pytest.raises(ValueError, match="'plans'"):
        Controller(model, [], backend="marker")
    with pytest.raises(TypeError, match="'model'"):
        Controller("model", ["w8a8"], backend="marker")


def test_audit_ring_buffer_and_sinks(model, make_inputs, tmp_path) -> None:
    jsonl = tmp_path / "audit.jsonl"
    ctrl = _ctrl(model, audit_size=50, audit_sink=jsonl)
    for seed in range(4):
        ctrl(make_inputs(20, seed=seed)[0])
    log = ctrl.audit
    assert len(log) == 50 and log["input_id"].tolist() == list(range(30, 80))
    ctrl.audit_log.close()
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["input_id"] for r in lines] == list(range(80))
    csv_path = tmp_path / "audit.csv"
    ctrl2 = _ctrl(model, audit_sink=csv_path)
    ctrl2(make_inputs(5, seed=0)[0])
    ctrl2.audit_log.close()
    frame = pd.read_csv(csv_path)
    assert frame["input_id"].tolist() == list(range(5))
    with pytest.raises(ValueError, match="'audit_sink'"):
        _ctrl(model, audit_sink=tmp_path / "audit.txt")


def test_overhead_is_accounted(model, make_inputs) -> None:
    ctrl, _ = _calibrated(model, make_inputs)
    ctrl(make_inputs(32, seed=0)[0])
    stats = ctrl.overhead
    assert stats["calls"] == 1 and stats["samples"] == 32
    assert stats["inference_s"] > 0 and stats["decision_s"] > 0
    assert stats["decision_share"] == stats["decision_s"] / stats["inference_s"]


def test_real_cpu_backend_cascade() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    ctrl = Controller(net, ["w8a8", "fp32"], backend="cpu", order="given")
    assert ctrl.scorer.name == "ratio"  # the default
    scores = ratio_score(ctrl.variants[0].module(x).detach())
    ctrl.set_threshold(float(scores.median()))
    y = ctrl(x)
    hard = scores > ctrl.threshold
    assert 0 < int(hard.sum()) < 40
    assert ctrl.audit["variant"].tolist() == hard.long().tolist()
    with torch.inference_mode():
        torch.testing.assert_close(y[hard], net(x)[hard], rtol=0, atol=0)
    assert ctrl.variants[1].module is net


# --- serving fast path, lazy audit, reused calibration outputs ----------------------------------


def test_small_and_large_batches_route_alike(model, make_inputs) -> None:
    """Single inputs, small and large batches: the same decisions."""
    ctrl, _ = _calibrated(model, make_inputs)
    x, _ = make_inputs(600, seed=5)
    hard = (x[:, 0] > 0.5).long().tolist()
    for chunk in (1, 7, 256, 257, 600):
        ctrl.audit_log.clear()
        for part in x.split(chunk):
            ctrl(part)
        assert ctrl.audit["variant"].tolist() == hard, chunk


@pytest.mark.parametrize("n", [1, 3, 300])
def test_nan_scores_are_refused_on_every_routing_path(model, make_inputs, n) -> None:
    def nan_on_second(logits: torch.Tensor) -> torch.Tensor:
        s = torch.zeros(logits.shape[0])
        s[min(1, len(s) - 1)] = math.nan
        return s

    ctrl = _ctrl(model, scorer=nan_on_second)
    ctrl.set_threshold(0.5)
    with pytest.raises(ValueError, match="NaN"):
        ctrl(make_inputs(n, seed=0)[0])


def test_audit_keeps_the_newest_rows_across_uneven_batches(model, make_inputs) -> None:
    ctrl = _ctrl(model, audit_size=10)
    sizes = [3, 7, 1, 12, 2]
    for seed, size in enumerate(sizes):
        ctrl(make_inputs(size, seed=seed)[0])
    total = sum(sizes)
    log = ctrl.audit
    assert len(ctrl.audit_log) == 10 and ctrl.audit_log.total == total
    assert log["input_id"].tolist() == list(range(total - 10, total))
    # call ids and positions follow the batches
    assert log["call_id"].tolist() == [3] * 8 + [4] * 2
    assert log["position"].tolist() == [*range(4, 12), 0, 1]
    assert (log["batch_size"] == [12] * 8 + [2] * 2).all()


def test_calibrate_reuses_stage_outputs(model, make_inputs) -> None:
    ctrl = _ctrl(model)
    x, _ = make_inputs(400, seed=1)
    data = list(x.split(32))
    outputs = ctrl.stage_outputs(data)
    fresh = ctrl.calibrate(data, max_disagreement=0.05)
    reused = ctrl.calibrate(data, max_disagreement=0.05, outputs=outputs)
    assert reused.threshold == fresh.threshold and reused.share == fresh.share
    answers, scores = ctrl.stage_arrays(data)  # what ``fresh`` computed, batch by batch
    assert np.array_equal(answers, ctrl.stage_answers(outputs))
    assert np.array_equal(scores, ctrl.stage_scores(outputs))
    with pytest.raises(ValueError, match="'outputs'"):
        ctrl.calibrate(data, max_disagreement=0.05, outputs=outputs[:1])
    with pytest.raises(ValueError, match="'outputs'"):
        ctrl.calibrate(data, max_disagreement=0.05, outputs=[o[:10] for o in outputs])


def test_served_scores_equal_calibration_scores(model, make_inputs) -> None:
    """The audit's per-input scores are exactly the scores calibration sees for those inputs,
    served one by one or in batches."""
    for scorer in ("max_softmax", "margin", "ratio", "entropy", "gate"):
        ctrl, _ = _calibrated(model, make_inputs, scorer=scorer)
        x, _ = make_inputs(50, seed=9)
        expected = ctrl.stage_scores(ctrl.stage_outputs([x]))[0]
        for chunk in (1, 8):
            ctrl.audit_log.clear()
            for part in x.split(chunk):
                ctrl(part)
            served = ctrl.audit["score_0"].to_numpy()
            if scorer == "gate":  # a [1, 6] @ [6] product may round apart from a [50, 6] one
                np.testing.assert_allclose(served, expected, rtol=1e-12)
            else:
                assert served.tolist() == expected.tolist(), (scorer, chunk)


def test_raw_decisions_equal_score_decisions_at_every_threshold(
    model, make_inputs, ratio_path
) -> None:
    """The ratio scorer decides on logit gaps against the threshold's cut point: the served
    variant is ``score > threshold`` exactly, also at a threshold equal to an input's score and
    one float either side, at 0 and 1, and below every score (no cut point: every input
    escalates); the audit holds the scores themselves."""
    ctrl = _ctrl(model, scorer="ratio")
    x, _ = make_inputs(300, seed=12)
    scores = ctrl.stage_scores(ctrl.stage_outputs([x]))[0]
    mid = float(np.sort(scores)[150])
    thresholds = [mid, math.nextafter(mid, -math.inf), math.nextafter(mid, math.inf)]
    thresholds += [0.0, 1.0, -0.5, -math.inf, math.inf]
    for t in thresholds:
        ctrl.set_threshold(t)
        assert ctrl.threshold == t
        expected = (scores > t).astype(int).tolist()
        for chunk in (1, 7, 300):  # batch 1, Python-float batches, the tensor path
            ctrl.audit_log.clear()
            for part in x.split(chunk):
                ctrl(part)
            audit = ctrl.audit
            assert audit["variant"].tolist() == expected, (t, chunk)
            assert audit["score_0"].tolist() == scores.tolist(), (t, chunk)
            assert (audit["threshold"] == t).all()


def test_serving_inside_and_outside_inference_mode_alike(model, make_inputs) -> None:
    """A caller's own inference mode is reused (no second guard); answers and routes are equal."""
    ctrl, _ = _calibrated(model, make_inputs)
    x, _ = make_inputs(40, seed=11)
    outside = [ctrl(part) for part in x.split(4)]
    with torch.inference_mode():
        inside = [ctrl(part) for part in x.split(4)]
    assert all(a.is_inference() and b.is_inference() for a, b in zip(outside, inside, strict=True))
    for a, b in zip(outside, inside, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    variants = ctrl.audit["variant"].to_numpy()
    assert (variants[:40] == variants[40:]).all() and variants.sum() > 0


def test_finite_test_size_calibration(model, make_inputs) -> None:
    """``test_size`` reaches Learn-then-Test's finite-test-set mode and the report."""
    from mpsearch.runtime import learn_then_test
    from mpsearch.runtime._calibration import default_grid

    ctrl = _ctrl(model, scorer="margin")
    x, _ = make_inputs(400, seed=1)
    data = list(x.split(32))
    outputs = ctrl.stage_outputs(data)
    # the cheap variant also disagrees on some unmarked inputs: flip 6 reference answers
    flipped = outputs[1].clone()
    flipped[:6] = flipped[:6].roll(1, dims=-1)
    stage = [outputs[0], flipped]
    report = ctrl.calibrate(data, max_disagreement=0.05, test_size=50, outputs=stage)
    scores = ctrl.stage_scores(outputs)
    answers = np.stack([o.argmax(-1).numpy() for o in stage])
    expected = learn_then_test(
        scores, answers, targets={"disagreement": 0.05}, delta=0.1, test_size=50
    )
    assert report.threshold == expected.threshold and report.test_size == 50
    population = ctrl.calibrate(data, max_disagreement=0.05, outputs=stage)
    assert population.test_size is None
    grid = list(default_grid())
    assert grid.index(report.threshold) <= grid.index(population.threshold)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="'test_size'"):
            ctrl.calibrate(data, max_disagreement=0.05, test_size=bad)
    with pytest.raises(ValueError, match="'method'"):
        ctrl.calibrate(data, test_size=50, method="hoeffding_bentkus")


def test_audit_log_appends_rows_and_compact_blocks() -> None:
    from mpsearch.runtime import AuditLog

    log = AuditLog(["a", "b"], max_rows=3, expand=lambda rec: [(rec, i) for i in range(2)])
    log.extend([(0, 0)])
    with log.lock:
        log.append_locked(2, 7)  # expanded only when read
        log.extend_locked([(1, 1)])
    assert log.frame().values.tolist() == [[7, 0], [7, 1], [1, 1]]
    assert log.total == 4 and len(log) == 3


def test_a_target_too_small_to_certify_says_so(model, make_inputs) -> None:
    """eps = 0.5% at delta = 0.1 needs >= 460 test inputs even with no disagreement: with 359
    the report says so (field and text) instead of silently escalating everything."""
    ctrl = _ctrl(model)
    x, _ = make_inputs(359, seed=1)
    report = ctrl.calibrate(list(x.split(32)), max_disagreement=0.005, delta=0.1)
    assert not report.certified and report.threshold == -math.inf
    assert report.min_inputs == 460
    assert report.note is not None
    assert report.note.startswith("not certifiable with 359 inputs (needs ≥ 460)")
    assert "not certifiable with 359 inputs (needs ≥ 460)" in str(report)
    assert report.summary()["note"] == report.note
    enough = ctrl.calibrate(list(make_inputs(600, seed=2)[0].split(32)), max_disagreement=0.05)
    assert enough.certified and enough.note is None and enough.min_inputs == 45


def test_calibrate_takes_an_options_object(model, make_inputs) -> None:
    ctrl = _ctrl(model)
    data = list(make_inputs(400, seed=1)[0].split(32))
    by_keywords = ctrl.calibrate(data, max_disagreement=0.05, delta=0.2)
    by_options = ctrl.calibrate(data, options=CalibrateOptions(max_disagreement=0.05, delta=0.2))
    assert by_options.threshold == by_keywords.threshold and by_options.delta == 0.2
    # keywords override the options' fields
    mixed = ctrl.calibrate(data, delta=0.1, options=CalibrateOptions(max_disagreement=0.05))
    assert mixed.delta == 0.1 and mixed.targets == {"disagreement": 0.05}


def test_runtime_moves_tensors_to_the_cpu_before_numpy() -> None:
    """Every ``.numpy()`` in the runtime follows a ``.cpu()`` (CUDA tensors have no NumPy view);
    a review test: the device path itself needs a GPU."""
    import pathlib
    import re

    import mpsearch.runtime as runtime

    chain = re.compile(r"[A-Za-z_]\w*(?:\([^()]*\))?(?:\.\w+(?:\([^()]*\))?)*\.numpy\(\)")
    found = 0
    for path in pathlib.Path(runtime.__file__).parent.glob("*.py"):
        for line in path.read_text().splitlines():
            for call in chain.finditer(line):
                found += 1
                assert ".cpu()" in call.group(0), f"{path.name}: {line.strip()}"
    assert found >= 5  # the pattern reads the runtime's chains (5 since answers are computed once)


def test_controller_curve_rows_say_why_a_target_is_not_certifiable(
    model, make_inputs, monkeypatch
) -> None:
    """The study's controller curve: a ctrl row whose target the calibration split cannot
    certify carries the reason (it used to be a row slower than fp32 with no word of why)."""
    from mpsearch.pipeline import ControllerCurve, controller_curve
    from mpsearch.workloads import Workload

    measured_with: list[int] = []
    _fake_timing(monkeypatch, model, {"w8a8": 1.0, "fp32": 2.0}, measured_with)
    calib_x, _ = make_inputs(359, seed=1)
    test_x, test_y = make_inputs(64, seed=2)
    wl = Workload(
        name="marker",
        model=model,
        calib=list(calib_x.split(32)),
        test=list(test_x.split(32)),
        test_labels=list(test_y.split(32)),
        example_input=test_x[:4],
        task="classification",
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        curve = controller_curve(
            wl,
            [PrecisionPlan.uniform("w8a8")],
            backend="marker",
            settings=ControllerCurve(epsilons=[0.005, 0.05], repeats=1),
            num_threads=1,
        )
    finally:
        torch.set_num_threads(before)
    # the variants are timed with the study's threads (before: the process's, 2 here)
    assert measured_with == [1, 1]
    assert curve["method"].tolist() == [
        "static:w8a8",
        "static:fp32",
        "ctrl:ratio:0.005",
        "ctrl:ratio:0.05",
    ]
    notes = dict(zip(curve["method"], curve["note"], strict=True))
    assert notes["ctrl:ratio:0.005"].startswith("not certifiable with 359 inputs (needs ≥ 460)")
    assert notes["ctrl:ratio:0.05"] == "" and notes["static:fp32"] == ""
    assert curve.set_index("method").loc["ctrl:ratio:0.005", "disagreement"] == 0.0
    from mpsearch.report import controller_curve_data

    shown = controller_curve_data(curve).set_index("method")  # the study report's table
    assert shown.loc["ctrl:ratio:0.005", "note"].startswith("not certifiable with 359 inputs")


class _State:
    """A per-call object with no row per input (like a model's cache object)."""


class _Structured(nn.Module):
    """The fixture model returning a ModelOutput (logits + per-row hidden states) or a tuple
    holding a state object."""

    def __init__(self, inner: nn.Module, *, state: bool = False) -> None:
        super().__init__()
        self.inner, self.state = inner, state

    def forward(self, x: torch.Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        y = self.inner(x)
        if self.state:
            return y, _State()
        return SequenceClassifierOutput(logits=y, hidden_states=(2 * y,))


def test_structured_outputs_keep_their_type_and_never_mix_variants(model, make_inputs) -> None:
    pytest.importorskip("transformers")
    wrapped = _Structured(model).eval()
    ctrl, _ = _calibrated(wrapped, make_inputs)
    x, _ = make_inputs(300, seed=2)
    hard = x[:, 0] > 0.5
    assert 0 < int(hard.sum()) < len(x)
    out = ctrl(x)
    assert type(out).__name__ == "SequenceClassifierOutput"
    with torch.inference_mode():
        ref, cheap = wrapped(x), ctrl.variants[0].module(x)
    for got, r, c in (
        (out.logits, ref.logits, cheap.logits),
        (out.hidden_states[0], ref.hidden_states[0], cheap.hidden_states[0]),
    ):
        torch.testing.assert_close(got[hard], r[hard], rtol=0, atol=0)
        torch.testing.assert_close(got[~hard], c[~hard], rtol=0, atol=0)
    # a state with no row per input cannot hold two variants' rows: dropped, not the cheap one's
    stateful = _Structured(model, state=True).eval()
    ctrl, _ = _calibrated(stateful, make_inputs)
    logits, state = ctrl(x)
    assert state is None and logits.shape == (len(x), *logits.shape[1:])
    _, kept = ctrl(x[~hard])
    assert isinstance(kept, _State)


def test_plans_that_differ_in_rounding_are_distinct_variants() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    calib = [torch.randn(64, 32)]
    ctrl = Controller(net, ["w4a16", "w4a16+gptq"], backend="simulate", calib=calib)
    assert [v.name for v in ctrl.variants][:2] == ["w4a16", "w4a16+gptq"]
    x = torch.randn(8, 32)
    with torch.no_grad():
        expected = quantize(net, "w4a16+gptq", backend="simulate", calib=calib)(x)
        assert torch.equal(ctrl.variants[1].module(x), expected)
        assert not torch.equal(ctrl.variants[0].module(x), expected)
    with pytest.raises(ValueError, match="needs calibration data"):
        Controller(net, ["w4a16+gptq"], backend="simulate")


class _DenseMarker(nn.Module):
    """The fixture's classifier at every pixel of a 4 x 4 map: inputs ``[B, 8, 4, 4]``,
    per-pixel logits ``{"logits": [B, 4, 4, 4]}`` (a segmentation model's output)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, f, h, w = x.shape
        y = self.inner(x.permute(0, 2, 3, 1).reshape(b * h * w, f))
        return {"logits": y.view(b, h, w, -1).permute(0, 3, 1, 2)}


def _dense_inputs(make_inputs, n: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` maps of 16 clean pixels, each input with 0, 1 or 3 of them marked (wrong on the
    cheap variant); and each input's count of marked pixels."""
    pixels, _ = make_inputs(16 * n, seed=seed, marked=0.0)
    x = pixels.view(n, 4, 4, 8).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(seed)
    marked = torch.tensor([0, 1, 3])[torch.randint(0, 3, (n,), generator=g)]
    for i, m in enumerate(marked.tolist()):
        x[i, 0].view(-1)[:m] = 0.9
    return x, marked


def test_dense_outputs_escalate_exactly_the_inputs_below_min_agreement(model, make_inputs) -> None:
    """Segmentation-style outputs: an input disagrees when fewer than ``min_agreement`` (0.9)
    of its 16 pixels take the reference's class: 3 marked pixels (13 / 16), not 1 (15 / 16).
    A target no loss fits certifies the threshold that escalates exactly those, and the served
    maps are the reference's on them and the cheap variant's elsewhere."""
    from mpsearch.viz.data import cascade_arrays

    dense = _DenseMarker(model).eval()
    ctrl = _ctrl(dense, min_agreement=0.9)
    x, marked = _dense_inputs(make_inputs, 400, seed=1)
    outputs = ctrl.stage_outputs(list(x.split(32)))
    assert [tuple(o.shape) for o in outputs] == [(400, 4, 16)] * 2
    assert ctrl.stage_answers(outputs)[0].tolist() == (marked == 3).long().tolist()
    report = ctrl.calibrate(list(x.split(32)), max_disagreement=0.006, delta=0.1, outputs=outputs)
    assert report.certified and report.empirical_disagreement == 0.0
    assert report.share["w8a8"] == pytest.approx(float((marked < 3).float().mean()))
    x, marked = _dense_inputs(make_inputs, 300, seed=2)
    hard = marked == 3
    out = ctrl(x)
    assert ctrl.audit["variant"].tolist() == hard.long().tolist()
    with torch.inference_mode():
        cheap, ref = ctrl.variants[0].module(x)["logits"], dense(x)["logits"]
    assert torch.equal(out["logits"][hard], ref[hard])
    assert torch.equal(out["logits"][~hard], cheap[~hard])
    ctrl.variants = tuple(dataclasses.replace(v, cost_ms=1.0) for v in ctrl.variants)
    answers, scores, _ = cascade_arrays(ctrl, [x])
    assert answers.tolist() == [hard.long().tolist(), [0] * 300]
    assert scores.tolist() == ctrl.audit["score_0"].to_numpy()[None].tolist()


@pytest.mark.parametrize("scorer", ["max_softmax", "margin", "ratio", "entropy"])
def test_dense_served_scores_equal_calibration_scores(model, make_inputs, scorer) -> None:
    """Each input's score is the mean of its pixels' scores, served one by one, in batches or
    in calibration (to float32 rounding: the pixels are scored along the class dimension
    together, and how many lie side by side changes the vectorized loops' last bits); the
    decision compares it with the threshold itself."""
    ctrl = _ctrl(_DenseMarker(model).eval(), scorer=scorer)
    x, _ = _dense_inputs(make_inputs, 40, seed=3)
    expected = ctrl.stage_scores(ctrl.stage_outputs([x]))[0]
    ordered = np.sort(expected)
    threshold = float(ordered[19] + ordered[20]) / 2
    ctrl.set_threshold(threshold)
    for chunk in (1, 7):
        ctrl.audit_log.clear()
        for part in x.split(chunk):
            ctrl(part)
        np.testing.assert_allclose(ctrl.audit["score_0"], expected, rtol=1e-6, atol=0)
        assert ctrl.audit["variant"].tolist() == (expected > threshold).astype(int).tolist()


def test_dense_outputs_refuse_labels_and_the_learned_gate(model, make_inputs) -> None:
    dense = _DenseMarker(model).eval()
    x, marked = _dense_inputs(make_inputs, 64, seed=4)
    with pytest.raises(ValueError, match="'labels'"):
        _ctrl(dense).calibrate([x], max_quality_drop=0.1, labels=[marked])
    with pytest.raises(ValueError, match="'scorer'.*'gate'"):
        _ctrl(dense, scorer="gate").calibrate([x])
    for bad in (0.0, 1.5, "high"):
        with pytest.raises(ValueError, match="min_agreement"):
            _ctrl(dense, min_agreement=bad)
    assert _ctrl(dense, min_agreement=1).min_agreement == 1.0  # every pixel must agree


def test_controller_curve_counts_a_dense_input_by_min_agreement(
    model, make_inputs, monkeypatch
) -> None:
    """The study's controller curve on per-pixel outputs: an input disagrees when fewer than
    ``min_agreement`` of its pixels do (it used to count agreeing pixels against inputs)."""
    from mpsearch.pipeline import ControllerCurve, controller_curve
    from mpsearch.workloads import Workload

    dense = _DenseMarker(model).eval()
    monkeypatch.setattr(
        controller_module, "time_module", lambda module, batch, **_: 2.0 if module is dense else 1.0
    )
    calib, _ = _dense_inputs(make_inputs, 400, seed=1)
    test, marked = _dense_inputs(make_inputs, 64, seed=2)
    wl = Workload(
        name="dense",
        model=dense,
        calib=list(calib.split(32)),
        test=list(test.split(32)),
        test_labels=None,
        example_input=test[:4],
        task="segmentation",
    )
    settings = ControllerCurve(epsilons=[0.05], repeats=1, min_agreement=0.9)
    curve = controller_curve(
        wl, [PrecisionPlan.uniform("w8a8")], backend="marker", settings=settings
    )
    disagreement = dict(zip(curve["method"], curve["disagreement"], strict=True))
    assert disagreement["static:w8a8"] == float((marked == 3).double().mean())
    assert disagreement["static:fp32"] == 0.0 and disagreement["ctrl:ratio:0.05"] == 0.0
    with pytest.raises(ValueError, match="controller.min_agreement"):
        ControllerCurve(epsilons=[0.05], min_agreement=0)


class _TokenMarker(nn.Module):
    """The fixture's classifier at every token: inputs ``[B, T, 8]``, a Hugging Face
    ``TokenClassifierOutput`` of logits ``[B, T, 4]`` (a token classifier's output)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        from transformers.modeling_outputs import TokenClassifierOutput

        b, t, f = x.shape
        return TokenClassifierOutput(logits=self.inner(x.reshape(b * t, f)).view(b, t, -1))


def test_token_classifier_outputs_answer_at_every_token(model, make_inputs) -> None:
    """An input of 10 tokens disagrees when 2 of them are marked (8 / 10 below 0.9), wherever
    they are: here the first two, never the last token a language model would answer at. A
    batch of another length is refused before any comparison, naming what to do."""
    pytest.importorskip("transformers")
    tokens = _TokenMarker(model).eval()
    pixels, _ = make_inputs(10 * 300, seed=5, marked=0.0)
    x = pixels.view(300, 10, 8).clone()
    marked = torch.tensor([0, 1, 2])[
        torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(5))
    ]
    for i, m in enumerate(marked.tolist()):
        x[i, :m, 0] = 0.9
    ctrl = _ctrl(tokens, min_agreement=0.9)
    outputs = ctrl.stage_outputs(list(x.split(30)))
    assert outputs[0].shape == (300, 4, 10)
    assert ctrl.stage_answers(outputs)[0].tolist() == (marked == 2).long().tolist()
    report = ctrl.calibrate(list(x.split(30)), max_disagreement=0.01, delta=0.1, outputs=outputs)
    assert report.certified and report.empirical_disagreement == 0.0
    out = ctrl(x)
    assert type(out).__name__ == "TokenClassifierOutput" and out.logits.shape == (300, 10, 4)
    assert ctrl.audit["variant"].tolist() == (marked == 2).long().tolist()
    with pytest.raises(ValueError, match="'data'.*pad the sequences to one length"):
        ctrl.stage_outputs([x[:30], x[30:60, :9]])


def test_dense_calibration_keeps_no_logits_and_takes_maps_of_any_size(model, make_inputs) -> None:
    """Calibrated without ``outputs``, a dense controller computes its answers and scores
    batch by batch (the logits of every variant are never held at once): the same as from
    :meth:`stage_outputs`, and maps of another size in another batch are fine."""
    ctrl = _ctrl(_DenseMarker(model).eval(), min_agreement=0.9)
    x, marked = _dense_inputs(make_inputs, 400, seed=1)
    data = list(x.split(32))
    answers, scores = ctrl.stage_arrays(data)
    outputs = ctrl.stage_outputs(data)
    assert np.array_equal(answers, ctrl.stage_answers(outputs))
    np.testing.assert_allclose(scores, ctrl.stage_scores(outputs), rtol=1e-6, atol=0)
    report = ctrl.calibrate(data, max_disagreement=0.006, delta=0.1)
    assert report.certified and report.share["w8a8"] == float((marked < 3).double().mean())
    wide = torch.cat([x[:32], x[:32, :, :, :2]], dim=3)  # the same 32 inputs on 4 x 6 maps
    answers, _ = ctrl.stage_arrays([x[:32], wide])
    assert answers.shape == (2, 64)
    # on 24 pixels: 1 marked pixel is 2 wrong (agrees, 22 / 24), 3 are 5 wrong (disagrees)
    assert answers[0, 32:].tolist() == (marked[:32] == 3).long().tolist()


class _LabelMarker(nn.Module):
    """A multi-label classifier (a Hugging Face config's ``problem_type``) on the fixture's
    inputs: label ``c`` is on for an input of class ``c`` (logit 1 to 7), every other label
    off (logit -3). On the marked inputs the cheap variant's layer gives logits near 0: every
    label unsure, and the label set wrong (``{c + 1}`` instead of ``{c}``)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"problem_type": "multi_label_classification"})()
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[:, 1:5] = torch.eye(4)
            self.fc.bias.fill_(-3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_a_multi_label_classifier_escalates_exactly_the_inputs_whose_label_set_changes(
    make_inputs,
) -> None:
    """Each label is a position of two classes ``(0, logit)``: an input agrees when the cheap
    variant gives it the reference's very set of labels. Its score is its least certain
    label's, so the threshold that meets a target no loss fits escalates exactly the marked
    inputs, and the served logits are the reference's there and the cheap variant's elsewhere."""
    model = _LabelMarker().eval()
    ctrl = _ctrl(model)
    assert ctrl.multi_label and not _ctrl(model, multi_label=False).multi_label
    x, _ = make_inputs(400, seed=1)
    marked = x[:, 0] > 0.5  # the marker backend's w8a8 cutoff
    outputs = ctrl.stage_outputs(list(x.split(32)))
    assert [tuple(o.shape) for o in outputs] == [(400, 2, 4)] * 2
    assert ctrl.stage_answers(outputs)[0].tolist() == marked.long().tolist()
    scores = ctrl.stage_scores(outputs)[0]
    per_label = torch.exp(-outputs[0][:, 1].double().abs())  # the ratio score of (0, logit)
    np.testing.assert_allclose(scores, per_label.amax(1).numpy(), rtol=1e-6)
    report = ctrl.calibrate(list(x.split(32)), max_disagreement=0.01, delta=0.1)
    assert report.certified and report.empirical_disagreement == 0.0
    assert report.share["w8a8"] == pytest.approx(float((~marked).double().mean()))
    x, _ = make_inputs(300, seed=2)
    hard = x[:, 0] > 0.5  # the marker backend's w8a8 cutoff
    out = ctrl(x)
    assert ctrl.audit["variant"].tolist() == hard.long().tolist()
    with torch.inference_mode():
        cheap, ref = ctrl.variants[0].module(x), model(x)
    assert torch.equal(out[hard], ref[hard]) and torch.equal(out[~hard], cheap[~hard])
    with pytest.raises(ValueError, match="'multi_label'"):
        _ctrl(model, multi_label="yes")
    assert ctrl.reduce == "max" and _ctrl(model, multi_label=False).reduce == "mean"
    by_mean = _ctrl(model, reduce="mean")
    assert by_mean.stage_scores(outputs)[0] == pytest.approx(per_label.mean(1).numpy(), rel=1e-6)
    with pytest.raises(ValueError, match="'reduce'.*'max'"):
        _ctrl(model, reduce="median")


def test_a_hugging_face_multi_label_classifier_is_served_in_its_own_output_type() -> None:
    """A BERT classifier configured for multi-label classification, random-initialised: the
    controller reads ``problem_type``, compares label sets, and returns the model's output."""
    pytest.importorskip("transformers")
    bert = tiny_multi_label_bert()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(1, 100, (16, 12), generator=g)} for _ in range(4)]
    ctrl = Controller(bert, ["w8a8"], backend="simulate", order="given")
    assert ctrl.multi_label
    outputs = ctrl.stage_outputs(calib)
    with torch.inference_mode():
        ref = torch.cat([bert(**b).logits for b in calib])
    assert torch.equal(outputs[1], torch.stack([torch.zeros_like(ref), ref], 1))
    differs = ((outputs[0][:, 1] > 0) != (ref > 0)).any(1)
    assert ctrl.stage_answers(outputs)[0].tolist() == differs.long().tolist()
    ctrl.calibrate(calib, max_disagreement=0.2, delta=0.2)
    out = ctrl(calib[0])
    assert type(out).__name__ == "SequenceClassifierOutput" and out.logits.shape == (16, 5)


def test_controller_curve_of_a_multi_label_classifier_counts_label_sets(
    make_inputs, monkeypatch
) -> None:
    """The study's controller curve on a multi-label workload: an input disagrees when its label
    set differs from fp32's, and the accuracy is the share of inputs given exactly their
    labelled set (was: labels compared with per-label answers one by one)."""
    from mpsearch.pipeline import ControllerCurve, controller_curve
    from mpsearch.workloads import Workload

    model = _LabelMarker().eval()
    monkeypatch.setattr(
        controller_module, "time_module", lambda module, batch, **_: 2.0 if module is model else 1.0
    )
    calib, _ = make_inputs(400, seed=1)
    test, classes = make_inputs(64, seed=2)
    tags = nn.functional.one_hot(classes, 4).float()
    tags[:8, (classes[:8] + 1) % 4] = 1.0  # 8 inputs labelled with one more label than fp32 gives
    wl = Workload(
        name="tags",
        model=model,
        calib=list(calib.split(32)),
        test=list(test.split(32)),
        test_labels=list(tags.split(32)),
        example_input=test[:4],
        task="multilabel",
    )
    settings = ControllerCurve(epsilons=[0.05], repeats=1, min_agreement=1.0)
    curve = controller_curve(
        wl, [PrecisionPlan.uniform("w8a8")], backend="marker", settings=settings
    )
    rows = curve.set_index("method")
    marked = test[:, 0] > 0.5  # the marker backend's w8a8 cutoff
    assert rows.loc["static:w8a8", "disagreement"] == float(marked.double().mean())
    assert rows.loc["static:fp32", "accuracy"] == 56 / 64
    wrong = marked | (torch.arange(64) < 8)
    assert rows.loc["static:w8a8", "accuracy"] == float((~wrong).double().mean())


def test_a_language_model_on_right_padded_batches_answers_at_each_rows_last_token() -> None:
    """Random-initialised GPT-2 on right-padded prompts: the controller's answers and scores
    read each prompt's last real token, in calibration and when served (rows escalated with
    their own padding)."""
    pytest.importorskip("transformers")
    gpt2 = tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 9, (16,), generator=g)
    batch = {
        "input_ids": torch.randint(0, 64, (16, 8), generator=g),
        "attention_mask": (torch.arange(8) < lengths[:, None]).long(),
    }
    ctrl = Controller(gpt2, ["w8a8"], backend="simulate", order="given")
    outputs = ctrl.stage_outputs([batch])
    with torch.inference_mode():
        logits = gpt2(**batch).logits
    assert torch.equal(outputs[1], logits[torch.arange(16), lengths - 1])
    scores = ctrl.stage_scores(outputs)[0]
    ctrl.set_threshold(float(np.median(scores)))
    ctrl(batch)
    np.testing.assert_allclose(ctrl.audit["score_0"], scores, rtol=1e-6)
