from __future__ import annotations

import json

import pytest

from mpsearch.plan import PrecisionPlan


def test_precedence_exact_then_first_regex_then_default(tiny_cnn) -> None:
    plan = PrecisionPlan(
        {"re:fc.*": "w4a16", "fc2": "w8a8", "re:fc1|conv.*": "fp16"}, default="bf16"
    )
    assert plan.resolve(tiny_cnn) == {
        "conv1": "fp16",
        "conv2": "fp16",
        "fc1": "w4a16",  # first matching regex wins over later ones
        "fc2": "w8a8",  # exact name wins over regexes
    }
    assert PrecisionPlan(default="bf16").resolve(tiny_cnn) == dict.fromkeys(
        ["conv1", "conv2", "fc1", "fc2"], "bf16"
    )


def test_json_round_trip_exact(tmp_path) -> None:
    plan = PrecisionPlan(
        {"conv1": "w8a8", "re:fc.*": "w4a16"}, default="bf16", metadata={"trial": 3}
    )
    again = PrecisionPlan.from_json(plan.to_json())
    assert again == plan and list(again.rules) == list(plan.rules)
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert PrecisionPlan.load(path) == plan
    assert PrecisionPlan.from_json(again.to_json()).to_json() == plan.to_json()


def test_unknown_scheme_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'rules\[fc1\]' argument must be one of .*'w8a8'"):
        PrecisionPlan({"fc1": "int3"})
    with pytest.raises(ValueError, match="'default' argument must be one of"):
        PrecisionPlan(default="fp64")


def test_layer_the_model_lacks_is_refused_with_listing(tiny_cnn) -> None:
    with pytest.raises(
        ValueError, match=r"names layer 'fc3'.*Layers: 'conv1', 'conv2', 'fc1', 'fc2'"
    ):
        PrecisionPlan({"fc3": "w8a8"}).resolve(tiny_cnn)
    with pytest.raises(ValueError, match=r"rule 're:head.*' matches no quantizable layer"):
        PrecisionPlan({"re:head.*": "w8a8"}).resolve(tiny_cnn)
    with pytest.raises(ValueError, match="valid regular expression"):
        PrecisionPlan({"re:fc(": "w8a8"})


def test_old_or_foreign_files_fail_clearly() -> None:
    data = json.loads(PrecisionPlan({"fc1": "w8a8"}).to_json())
    with pytest.raises(ValueError, match="Unsupported plan version 99"):
        PrecisionPlan.from_json(json.dumps({**data, "version": 99}))
    with pytest.raises(ValueError, match="Not an mpsearch plan"):
        PrecisionPlan.from_json('{"fc1": "w8a8"}')
    with pytest.raises(ValueError, match="must be JSON"):
        PrecisionPlan.from_json("fc1: w8a8")
    changed = json.loads(json.dumps(data))
    changed["schemes"]["w8a8"]["compute_dtype"] = "bf16"
    with pytest.raises(ValueError, match="differs from the registered scheme"):
        PrecisionPlan.from_json(json.dumps(changed))
