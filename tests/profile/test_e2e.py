"""End-to-end errors on a subset of the calibration samples: exact semantics, auto, cache, errors."""

from __future__ import annotations

import importlib

import numpy as np
import pandas as pd
import pytest
import torch
from profile_models import (
    SENSITIVITY,
    DataDependent,
    DictInput,
    KnownSensitivity,
    batches,
    chain,
)

from mpsearch.profile import profile
from mpsearch.profile._e2e import (
    AUTO_E2E_PASSES,
    AUTO_EXACT_PASSES,
    AUTO_LOCAL_SAMPLES,
    AUTO_MIN_ROWS,
    AUTO_MIN_SAMPLES,
    choose_e2e_samples,
    choose_local_samples,
    first_samples,
    local_batches,
    most_uncertain,
    picked_samples,
)

SCHEMES = ["bf16", "w8a8", "w4a16"]
LOCAL = ["mse", "sqnr_db"]


def test_first_samples_cuts_every_batch_kind() -> None:
    x = batches(3, 4, 5)
    cut = first_samples(x, 6)
    assert [b.shape[0] for b in cut] == [4, 2]
    assert torch.equal(cut[1], x[1][:2]) and cut[0] is x[0]
    as_dict = [{"image": b, "flag": 3, "table": torch.zeros(7)} for b in x]
    got = first_samples(as_dict, 5)
    assert [b["image"].shape[0] for b in got] == [4, 1]
    assert got[1]["flag"] == 3 and got[1]["table"].shape == (7,)  # not batch-sized: unchanged
    as_tuple = [(b, b[:, :2]) for b in x]
    got = first_samples(as_tuple, 3)
    assert isinstance(got[0], tuple) and [t.shape[0] for t in got[0]] == [3, 3]
    assert len(first_samples(x, 12)) == 3 and len(first_samples(x, 100)) == 3


def test_choose_e2e_samples_rules() -> None:
    assert choose_e2e_samples(None, 256, 50.0) == 256
    assert choose_e2e_samples(64, 256, 0.1) == 64
    assert choose_e2e_samples(1000, 256, 9.0) == 256
    assert choose_e2e_samples("auto", 256, AUTO_EXACT_PASSES) == 256
    deep = AUTO_EXACT_PASSES + 8.0
    assert choose_e2e_samples("auto", 256, deep) == max(
        AUTO_MIN_SAMPLES, int(np.ceil(256 * AUTO_E2E_PASSES / deep))
    )
    assert choose_e2e_samples("auto", 256, 1000.0) == AUTO_MIN_SAMPLES
    assert choose_e2e_samples("auto", 5, 1000.0) == 5  # never more than there are
    # a floor of AUTO_MIN_ROWS distributions where fewer samples than AUTO_MIN_SAMPLES hold them
    tokens = AUTO_MIN_ROWS // 2
    assert choose_e2e_samples("auto", 64, 1000.0, rows_per_sample=tokens) == 2
    assert choose_e2e_samples("auto", 64, 1000.0, rows_per_sample=10**6) == 1
    assert choose_e2e_samples("auto", 64, 1000.0, rows_per_sample=4) == AUTO_MIN_SAMPLES


@pytest.fixture(scope="module")
def known_calib() -> list[torch.Tensor]:
    return batches(4, 128, 64)


@pytest.fixture(scope="module")
def exact(known_calib: list[torch.Tensor]) -> pd.DataFrame:
    prof = profile(
        KnownSensitivity().eval(), known_calib, schemes=SCHEMES, metric="mse", e2e_samples=None
    )
    assert prof.info["e2e_samples"] == prof.info["calib_samples"] == 512
    return prof


@pytest.mark.parametrize("n", [1, 200, 256])
def test_subset_e2e_equals_exact_mode_on_that_subset(known_calib, exact, n: int) -> None:
    model = KnownSensitivity().eval()
    fast = profile(
        model, known_calib, schemes=SCHEMES, metric="mse", e2e_samples=n, local_samples=None
    )
    assert fast.info["e2e_samples"] == n and fast.info["calib_samples"] == 512
    on_subset = profile(
        model, first_samples(known_calib, n), schemes=SCHEMES, metric="mse", e2e_samples=None
    )
    # e2e: exactly exact mode's on the first n samples; local errors: exactly exact mode's
    pd.testing.assert_frame_equal(fast.pivot("e2e"), on_subset.pivot("e2e"), check_exact=True)
    for metric in LOCAL:
        pd.testing.assert_frame_equal(fast.pivot(metric), exact.pivot(metric), check_exact=True)
    assert not fast.pivot("e2e").equals(exact.pivot("e2e"))  # really another sample


def test_choose_local_samples_rules() -> None:
    assert choose_local_samples("auto", 512, 512) == 512  # e2e on all: locals come with it
    assert choose_local_samples("auto", 512, 20) == AUTO_LOCAL_SAMPLES
    assert choose_local_samples("auto", 40, 20) == 40
    assert choose_local_samples(None, 512, 20) == 512
    assert choose_local_samples(100, 512, 512) == 100  # an int is what it says
    assert choose_local_samples(1000, 512, 20) == 512
    x = batches(3, 4, 5)
    got = [local_batches(n, x, 1) for n in (1, 4, 5, 12, 99)]
    assert got == [(1, 4), (1, 4), (2, 8), (3, 12), (3, 12)]
    assert local_batches("auto", x, 12) == (3, 12)


@pytest.mark.parametrize(("local_samples", "used"), [("auto", 128), (200, 256), (None, 512)])
def test_local_errors_equal_exact_mode_on_their_batches(
    known_calib, local_samples: object, used: int
) -> None:
    """Local errors use the whole calibration batches holding the first ``local_samples``
    (batches of 128 here): exactly exact mode's local errors on those batches."""
    model = KnownSensitivity().eval()
    fast = profile(
        model,
        known_calib,
        schemes=SCHEMES,
        metric="mse",
        e2e_samples=16,
        local_samples=local_samples,
    )
    assert fast.info["local_samples"] == used
    on_them = profile(
        model, first_samples(known_calib, used), schemes=SCHEMES, metric="mse", e2e_samples=None
    )
    assert on_them.info["local_samples"] == used
    for metric in LOCAL:
        pd.testing.assert_frame_equal(fast.pivot(metric), on_them.pivot(metric), check_exact=True)


def test_batches_neither_error_uses_get_no_pass(known_calib) -> None:
    """A non-finite batch past the local and e2e samples is never run; measuring local errors
    on every sample runs it and stops with the non-finite error."""
    calib = [*known_calib[:3], torch.full_like(known_calib[3], float("nan"))]
    model = KnownSensitivity().eval()
    run = {"schemes": ["w8a8"], "metric": "mse", "e2e_samples": 16}
    prof = profile(model, calib, **run)
    assert prof.info["local_samples"] == 128 and prof.info["e2e_pick"] == "first"
    assert np.isfinite(prof.pivot("mse").to_numpy()).all()
    with pytest.raises(ValueError, match="calibration batch 3 is not finite"):
        profile(model, calib, local_samples=None, **run)


def test_local_samples_option_is_checked() -> None:
    with pytest.raises(ValueError, match="'local_samples' option must be 'auto', None"):
        profile(KnownSensitivity().eval(), batches(2, 4, 64), local_samples=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_known_ranking_holds_on_a_subset(known_calib, scheme: str) -> None:
    model = KnownSensitivity().eval()
    fast = profile(model, known_calib, schemes=[scheme], metric="mse", e2e_samples=32)
    for metric in ("mse", "e2e"):
        order = list(fast.pivot(metric)[scheme].sort_values().index)
        assert order == sorted(SENSITIVITY, key=SENSITIVITY.get), metric
    ratios = fast.pivot("e2e")[scheme] / fast.pivot("e2e")[scheme]["b1"]
    if scheme != "bf16":  # bf16 rounds the output too: not exactly k times
        for name, k in SENSITIVITY.items():
            assert ratios[name] == pytest.approx(k, rel=0.15)


def test_cache_never_mixes_subset_and_exact_rows(tmp_path, known_calib) -> None:
    model = KnownSensitivity().eval()
    run = {"schemes": ["w8a8"], "metric": "mse", "cache_dir": tmp_path}
    exact = profile(model, known_calib, e2e_samples=None, **run)
    fast = profile(model, known_calib, e2e_samples=64, **run)
    assert fast.info["cached_rows"] == 0 and fast.info["computed_rows"] == 4
    other = profile(model, known_calib, e2e_samples=65, **run)
    assert other.info["cached_rows"] == 0
    again = profile(model, known_calib, e2e_samples=64, **run)
    assert again.info["cached_rows"] == 4
    pd.testing.assert_frame_equal(again.table, fast.table, check_exact=True)
    # at least every sample is the exact mode itself: its rows are reused
    whole = profile(model, known_calib, e2e_samples=10_000, **run)
    assert whole.info["cached_rows"] == 4 and whole.info["e2e_samples"] == 512
    pd.testing.assert_frame_equal(whole.table, exact.table, check_exact=True)


def test_auto_keeps_small_models_exact_and_subsamples_deep_ones() -> None:
    calib = batches(4, 64, 32)
    shallow = profile(chain(2), calib, schemes=["w8a8"])
    assert shallow.info["downstream_passes"] <= AUTO_EXACT_PASSES
    assert shallow.info["e2e_samples"] == 256
    deep = profile(chain(24), calib, schemes=["w8a8"])
    d = deep.info["downstream_passes"]
    assert 10.0 < d < 12.0  # about L/2 for 24 equal layers
    assert deep.info["e2e_samples"] == choose_e2e_samples("auto", 256, d) < 256
    assert deep.info["local_samples"] == AUTO_LOCAL_SAMPLES  # the first batch of 64
    exact_deep = profile(chain(24), calib[:1], schemes=["w8a8"], e2e_samples=None)
    pd.testing.assert_frame_equal(deep.pivot("mse"), exact_deep.pivot("mse"), check_exact=True)


def _dict_inputs() -> list[dict[str, torch.Tensor]]:
    return [
        {"image": x, "extra": y}
        for x, y in zip(batches(3, 6, 16), batches(3, 6, 8, seed=1), strict=True)
    ]


def test_hook_runner_subset_equals_graph_runner_subset() -> None:
    torch.manual_seed(0)
    fast_model = DictInput().eval()
    slow_model = DataDependent().eval()
    slow_model.load_state_dict(fast_model.state_dict())
    graph = profile(fast_model, _dict_inputs(), schemes=SCHEMES[:2], e2e_samples=8)
    with pytest.warns(UserWarning, match="hook runner"):
        hooks = profile(slow_model, _dict_inputs(), schemes=SCHEMES[:2], e2e_samples=8)
    assert graph.info["runner"] == "graph:fx" and hooks.info["runner"] == "hooks"
    assert graph.info["e2e_samples"] == hooks.info["e2e_samples"] == 8
    for metric in ("mse", "sqnr_db", "e2e"):
        np.testing.assert_allclose(graph.pivot(metric), hooks.pivot(metric), rtol=1e-5)


@pytest.mark.parametrize("value", [0, -3, True, 2.5, "fast", "AUTO", [8]])
def test_bad_e2e_samples(value: object) -> None:
    with pytest.raises(ValueError, match=r"'e2e_samples' option must be 'auto', None"):
        profile(chain(2), batches(1, 2, 32), e2e_samples=value)


def test_most_uncertain_picks_the_highest_entropy_samples() -> None:
    sure, unsure, middle = [9.0, -9.0, -9.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]
    outputs = [torch.tensor([sure, middle, unsure]), torch.tensor([unsure, sure])]
    assert most_uncertain(outputs, 2) == [[2], [0]]  # the tie goes to the earlier sample
    assert most_uncertain(outputs, 3) == [[1, 2], [0]]
    assert most_uncertain(outputs, 5) == [[0, 1, 2], [0, 1]]
    tokens = torch.tensor([[sure, sure], [unsure, sure]])  # [batch, tokens, classes]
    assert most_uncertain([tokens], 1) == [[1]]  # mean entropy over a sample's rows


def test_picked_samples_packs_compatible_pieces_up_to_a_batch() -> None:
    x = batches(3, 4, 5)
    got = picked_samples(x, [[1, 3], [0], [0, 1, 2]])
    assert [b.shape[0] for b in got] == [4, 2]  # 2 + 1 + 1 fill a batch of 4, 2 are left
    assert torch.equal(got[0], torch.stack([x[0][1], x[0][3], x[1][0], x[2][0]]))
    assert torch.equal(got[1], x[2][1:3])
    whole = picked_samples(x, [[0, 1, 2, 3], [0, 1, 2, 3], [1]])  # a full piece is not split
    assert [b.shape[0] for b in whole] == [4, 4, 1] and torch.equal(whole[1], x[1])
    as_dict = [{"image": b, "flag": 3, "table": torch.zeros(7)} for b in x]
    got = picked_samples(as_dict, [[2], [1], []])
    assert len(got) == 1 and got[0]["flag"] == 3 and got[0]["table"].shape == (7,)
    assert torch.equal(got[0]["image"], torch.stack([x[0][2], x[1][1]]))
    flags = [{"image": b, "flag": i} for i, b in enumerate(x)]  # other values differ: kept apart
    assert [b["image"].shape[0] for b in picked_samples(flags, [[0], [0], [0]])] == [1, 1, 1]
    padded = [torch.zeros(4, 5), torch.zeros(4, 6)]  # another trailing shape: kept apart
    assert [b.shape for b in picked_samples(padded, [[0], [0]])] == [(1, 5), (1, 6)]


def test_auto_measures_a_classifier_on_its_least_certain_samples(tmp_path) -> None:
    calib = batches(4, 64, 32)
    model = chain(24)
    auto = profile(model, calib, schemes=["w8a8"], cache_dir=tmp_path)
    n = auto.info["e2e_samples"]
    assert n < 256 and auto.info["e2e_pick"] == "uncertain"
    with torch.inference_mode():
        picked = picked_samples(calib, most_uncertain([model(b) for b in calib], n))
    # the end-to-end errors are exact mode's on the picked samples themselves
    on_picked = profile(model, picked, schemes=["w8a8"], e2e_samples=None)
    np.testing.assert_allclose(auto.pivot("e2e"), on_picked.pivot("e2e"), rtol=1e-6)
    first = profile(model, calib, schemes=["w8a8"], e2e_samples=n, cache_dir=tmp_path)
    assert first.info["e2e_pick"] == "first" and first.info["cached_rows"] == 0
    assert not np.allclose(first.pivot("e2e"), auto.pivot("e2e"), rtol=1e-3, atol=0.0)
    again = profile(model, calib, schemes=["w8a8"], cache_dir=tmp_path)
    assert again.info["cached_rows"] == 24


def test_auto_takes_the_first_samples_of_a_sequence_model() -> None:
    calib = [torch.randn(8, 4, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    prof = profile(chain(24), calib, schemes=["w8a8"])  # 4 distributions per sample
    assert prof.info["e2e_samples"] < 32 and prof.info["e2e_pick"] == "first"
    first = profile(chain(24), calib, schemes=["w8a8"], e2e_samples=prof.info["e2e_samples"])
    pd.testing.assert_frame_equal(prof.pivot("e2e"), first.pivot("e2e"), check_exact=True)


class _SequenceFirst(torch.nn.Module):
    """``nn.MultiheadAttention``'s default layout: ``x`` is ``[time, batch, features]``, its
    key padding mask ``[batch, time]``; one output row per sample."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Linear(8, 32)
        self.attn = torch.nn.MultiheadAttention(32, 4)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.head(self.attn(h, h, h, key_padding_mask=pad)[0].mean(0))


@pytest.mark.parametrize("runner", ["graph:fx", "hooks"])
def test_whole_batches_are_taken_where_a_batch_does_not_cut_into_samples(
    runner: str, monkeypatch
) -> None:
    """Bug: a sequence-first model's batches were cut by their leading dimension (time) for
    the end-to-end samples, the mask by its batch: the attention raised and so did the
    profile. Whole batches are taken instead; their rows are exact mode's on them."""
    g = torch.Generator().manual_seed(0)
    calib = []
    for _ in range(8):
        pad = torch.zeros(4, 6, dtype=torch.bool)
        pad[1, 4:] = True
        calib.append((torch.randn(6, 4, 8, generator=g), pad))
    model = _SequenceFirst().eval()
    if runner == "hooks":
        monkeypatch.setattr(importlib.import_module("mpsearch.profile._runner"), "CAPTURES", {})
    # batch_size() reads the leading dimension, 6: 8 "samples" lie in the first 2 batches
    prof = profile(model, calib, schemes=["w8a8", "bf16"], e2e_samples=8, progress=False)
    assert prof.info["e2e_pick"] == "batches" and prof.info["runner"] == runner
    exact = profile(model, calib[:2], schemes=["w8a8", "bf16"], e2e_samples=None)
    np.testing.assert_allclose(prof.pivot("e2e"), exact.pivot("e2e"), rtol=1e-6)


def test_auto_measures_local_errors_on_the_least_certain_samples_it_runs(tmp_path) -> None:
    """With a classifier's least certain samples picked (at least AUTO_LOCAL_SAMPLES of them),
    the local errors come from the same runs: exact mode's local errors on those samples."""
    calib = batches(4, 64, 32)
    model = chain(4)  # D = 1.2: the 106 least certain of 256 samples
    auto = profile(model, calib, schemes=SCHEMES, cache_dir=tmp_path)
    n = auto.info["e2e_samples"]
    assert auto.info["e2e_pick"] == "uncertain" and AUTO_LOCAL_SAMPLES <= n < 256
    assert auto.info["local_samples"] == n
    with torch.inference_mode():
        picked = picked_samples(calib, most_uncertain([model(b) for b in calib], n))
    on_picked = profile(model, picked, schemes=SCHEMES, e2e_samples=None)
    for metric in (*LOCAL, "e2e"):
        np.testing.assert_allclose(auto.pivot(metric), on_picked.pivot(metric), rtol=1e-6)
    # the batches holding the first n samples: other local errors, other rows of the cache
    first = profile(model, calib, schemes=SCHEMES, local_samples=n, cache_dir=tmp_path)
    assert first.info["cached_rows"] == 0 and first.info["local_samples"] == 128
    assert not np.allclose(first.pivot("mse"), auto.pivot("mse"), rtol=1e-3, atol=0.0)
