from __future__ import annotations

import json
from dataclasses import replace

import pytest
from torch import nn

from mpsearch.backends import quantize
from mpsearch.backends._simulate import SimulatedLayer
from mpsearch.plan import PrecisionPlan, Substitution
from mpsearch.schemes import SCHEMES, QuantSpec, Scheme, register_scheme
from mpsearch.schemes._scheme import nearest_variant


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


def _flag_net() -> nn.Module:
    from mpsearch.workloads import load_workload

    return load_workload("flag_net", n_calib=16, n_test=16).model


def test_uniform_scheme_resolves_to_the_variant_a_layer_can_take() -> None:
    """flag_net: conv1 fan-in 9, conv2 grouped (36), conv3 depthwise (9), fc 16: no group of 32
    fits, so a uniform w4a8 plan gives every layer w4a8_pc, and says which and why."""
    model = _flag_net()
    plan = PrecisionPlan({}, default="w4a8")
    assert plan.resolve(model) == dict.fromkeys(["conv1", "conv2", "conv3", "fc"], "w4a8_pc")
    subs = plan.substitutions(model)
    assert subs["conv1"] == Substitution(
        "w4a8",
        "w4a8_pc",
        "group_size=32 does not divide the layer's input size 9 (weight shape (16, 1, 3, 3)); "
        "use a group size that divides 9 or a per-channel scheme; "
        "its variant 'w4a8_pc' takes this shape",
    )
    assert "input size 36" in subs["conv2"].reason and "input size 16" in subs["fc"].reason
    assert PrecisionPlan(default="w4a8").resolve(["conv1", "fc"]) == dict.fromkeys(
        ["conv1", "fc"], "w4a8"
    )  # names alone carry no shapes: nothing to substitute
    q = quantize(model, plan)
    assert q.mpsearch_assignment == plan.resolve(model)
    assert {m.scheme.name for m in q.modules() if isinstance(m, SimulatedLayer)} == {"w4a8_pc"}


def test_regex_rules_substitute_and_layers_that_fit_keep_their_scheme(tiny_cnn) -> None:
    plan = PrecisionPlan({"re:conv.*": "w4a16", "fc2": "w8a8"}, default="w4a4")
    assert plan.resolve(tiny_cnn) == {
        "conv1": "w4a16_pc",  # fan-in 9
        "conv2": "w4a16_pc",  # fan-in 144
        "fc1": "w4a4",  # fan-in 128: groups of 32 fit
        "fc2": "w8a8",
    }
    assert list(plan.substitutions(tiny_cnn)) == ["conv1", "conv2"]
    assert PrecisionPlan(default="w8a8").substitutions(tiny_cnn) == {}


def test_the_nearest_variant_is_the_closest_group() -> None:
    w4a16 = SCHEMES["w4a16"]
    g128 = replace(w4a16, name="t_w4a16_g128", weight=replace(w4a16.weight, group_size=128))
    register_scheme(g128)
    try:
        assert nearest_variant(g128, (8, 160)).name == "w4a16_pc"  # 160 is nearer 128 than 32
        assert nearest_variant(g128, (8, 992)).name == "w4a16"  # 32 is nearer than 992
        assert nearest_variant(g128, (8, 256)) is g128
        assert nearest_variant("w8a8", (8, 9)).name == "w8a8"
    finally:
        del SCHEMES[g128.name]


def test_explicit_assignment_is_kept_and_refused_naming_layer_scheme_and_variant() -> None:
    model = _flag_net()
    plan = PrecisionPlan({"conv1": "w4a8", "fc": "w4a16"}, default="w4a8")
    assert plan.resolve(model) == {
        "conv1": "w4a8",  # named for this layer: never substituted
        "conv2": "w4a8_pc",
        "conv3": "w4a8_pc",
        "fc": "w4a16",
    }
    assert list(plan.substitutions(model)) == ["conv2", "conv3"]
    with pytest.raises(ValueError) as info:
        quantize(model, plan)
    message = str(info.value)
    assert (
        "conv1 (Conv2d) in 'w4a8': group_size=32 does not divide the layer's input size 9"
        in message
    )
    assert "its variant 'w4a8_pc' takes this shape" in message
    assert "fc (Linear) in 'w4a16'" in message and "'w4a16_pc' takes this shape" in message
    assert "conv2" not in message  # the default's layers are substituted, not refused


def test_a_scheme_without_applicable_variant_is_kept_and_refused() -> None:
    spec = QuantSpec("int2", granularity="group", group_size=32)  # symmetric: no variant
    lonely = register_scheme(Scheme("t_w2_sym_g32", spec, None, "fp32"))
    try:
        model = _flag_net()
        plan = PrecisionPlan(default="t_w2_sym_g32")
        assert set(plan.resolve(model).values()) == {"t_w2_sym_g32"}
        assert plan.substitutions(model) == {}
        with pytest.raises(
            ValueError,
            match=r"conv1 \(Conv2d\) in 't_w2_sym_g32': group_size=32 does not divide the "
            r"layer's input size 9 \(weight shape \(16, 1, 3, 3\)\); use a group size that "
            r"divides 9 or a per-channel scheme\n",
        ):
            quantize(model, plan)
    finally:
        del SCHEMES[lonely.name]
