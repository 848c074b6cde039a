"""``ProfileOptions``: validation, the dict round trip, and the verb's keyword overrides."""

from __future__ import annotations

import pytest
import yaml
from profile_models import batches, chain

import mpsearch as mps
from mpsearch.profile import ProfileOptions, kl_divergence, profile


def test_options_are_validated_with_the_one_message_template() -> None:
    with pytest.raises(ValueError) as info:
        ProfileOptions(hessian_samples=-3)
    assert str(info.value) == (
        "The 'hessian_samples' option must be a positive integer. Got -3 instead."
    )
    for bad in ({"max_batches": 0}, {"fold_bn": "yes"}, {"layers": "fc"}, {"metric": "cosine"}):
        with pytest.raises(ValueError, match=f"'{next(iter(bad))}' option"):
            ProfileOptions(**bad)


def test_options_round_trip_through_yaml() -> None:
    opts = ProfileOptions(metric="mse", layers=["0", "2"], e2e_samples=None, max_batches=2)
    text = yaml.safe_dump(opts.to_dict())
    assert ProfileOptions.from_dict(yaml.safe_load(text)) == opts
    with pytest.raises(ValueError, match=r"Unknown profile option\(s\) \['repeats'\]"):
        ProfileOptions.from_dict({"repeats": 3})
    with pytest.raises(TypeError, match="'metric' option holds a function"):
        ProfileOptions(metric=kl_divergence).to_dict()


def test_options_object_equals_keywords() -> None:
    model, calib = chain(3), batches(2, 8, 32)
    by_keyword = profile(
        model, calib, schemes=["w8a8"], metric="mse", e2e_samples=None, progress=False
    )
    opts = ProfileOptions(metric="mse", e2e_samples=None, progress=False)
    by_object = profile(model, calib, schemes=["w8a8"], options=opts)
    assert by_object.table.equals(by_keyword.table)
    # a keyword overrides the object's field
    cut = profile(model, calib, schemes=["w8a8"], options=opts, max_batches=1)
    assert cut.info["batches"] == 1 and mps.ProfileOptions is ProfileOptions


def test_unknown_keyword_is_a_type_error_listing_the_accepted_ones() -> None:
    with pytest.raises(TypeError, match=r"\['e2e_sample'\].*'e2e_samples'.*'schemes'"):
        profile(chain(2), batches(1, 2, 32), e2e_sample=None)
    with pytest.raises(TypeError, match="must be a ProfileOptions or None"):
        profile(chain(2), batches(1, 2, 32), options={"e2e_samples": None})
