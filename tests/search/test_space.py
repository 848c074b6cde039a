from __future__ import annotations

import pytest
import torch
from helpers import SharedEmbedding
from torch import nn

from mpsearch.search import SearchSpace, SpaceError, load_space
from mpsearch.search._space import model_family


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)  # input size 9: no group-32 schemes
        self.conv2 = nn.Conv2d(8, 32, 2)  # input size 32
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)


def _write(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_rules_pins_and_shape_filtering(tmp_path) -> None:
    path = _write(
        tmp_path,
        """
name: t
schemes: [fp32, bf16, w8a8, w4a16]
rules:
  - {type: Conv2d, schemes: [bf16, w8a8, w4a16]}
  - {name: fc2, schemes: [bf16, w8a8]}
pin: {first: bf16}
""",
    )
    space = SearchSpace.from_yaml(path).resolve(Net())
    assert space.pinned == {"conv1": "bf16"}
    assert space.choices == {
        "conv2": ["bf16", "w8a8", "w4a16"],
        "fc1": ["fp32", "bf16", "w8a8", "w4a16"],
        "fc2": ["bf16", "w8a8"],
    }
    assignment = space.assignment({"conv2": "w8a8", "fc1": "w4a16", "fc2": "bf16"})
    assert assignment == {"conv1": "bf16", "conv2": "w8a8", "fc1": "w4a16", "fc2": "bf16"}
    assert space.params_of(assignment) == {"conv2": "w8a8", "fc1": "w4a16", "fc2": "bf16"}


def test_unusable_schemes_are_dropped_with_reason() -> None:
    space = SearchSpace(schemes=["bf16", "w4a16"]).resolve(Net())
    assert space.choices["conv1"] == ["bf16"]
    assert "does not divide" in space.dropped["conv1"]["w4a16"]
    no_int8 = SearchSpace(schemes=["bf16", "w8a8"]).resolve(
        Net(), supported=lambda n, s: s != "w8a8"
    )
    assert all(c == ["bf16"] for c in no_int8.choices.values())


def test_groups_tie_layers() -> None:
    space = SearchSpace(schemes=["bf16", "w8a8"], groups=[["re:fc.*"]]).resolve(Net())
    assert space.params["group:fc1"] == ["fc1", "fc2"]
    assert (
        space.assignment({"conv1": "bf16", "conv2": "bf16", "group:fc1": "w8a8"})["fc2"] == "w8a8"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "schemes: [bf16, int3]",
            r"space.yaml: schemes names unknown scheme 'int3'. Known schemes: .*w8a8",
        ),
        (
            "schemes: [bf16]\nrules:\n  - {name: fc9, schemes: [w8a8]}",
            r"rules\[0\].name: layer 'fc9' is not a quantizable layer .*'conv1'",
        ),
        (
            "schemes: [bf16]\nrules:\n  - {regex: 'head.*', schemes: [w8a8]}",
            r"rules\[0\].regex 'head.\*' matches no layer",
        ),
        (
            "schemes: [bf16]\nrules:\n  - {type: LSTM, schemes: [w8a8]}",
            r"rules\[0\].type 'LSTM' matches no layer; layer types: \['Conv2d', 'Linear'\]",
        ),
        ("schemes: [bf16]\npin: {fc7: bf16}", r"pin.fc7: layer 'fc7' is not a quantizable layer"),
        ("schemes: [bf16]\nbudget: 3", r"unknown key\(s\) \['budget'\]"),
        (
            "schemes: [w4a16]\npin: {first: w4a16}",
            r"pins layer 'conv1' to 'w4a16', but group_size=32.*: pin it to another scheme",
        ),
        (
            "schemes: [w4a16]\nrules:\n  - {name: conv1, schemes: [w4a16]}",
            r"layer 'conv1' has no usable scheme left \(w4a16: group_size=32",
        ),
        ("schemes: [bf16]\nmin_bits: {last: 0}", r"min_bits.last must be a positive number"),
        ("schemes: [bf16]\nmin_bits: {fc9: 8}", r"min_bits.fc9: layer 'fc9' is not a quantiz"),
        ("rules: []", r"the key 'schemes' .* is missing"),
        ("schemes: [bf16\n", r"not valid YAML"),
    ],
)
def test_bad_spaces_name_file_key_and_layer(tmp_path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SpaceError, match=message):
        SearchSpace.from_yaml(path).resolve(Net())


def test_bundled_spaces_load_and_family_detection() -> None:
    assert model_family(Net()) == "cnn"
    assert model_family(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))) == "transformer"
    assert model_family(nn.Sequential(nn.Linear(4, 4))) == "mlp"
    for name in ("cnn", "transformer", "mlp", "aggressive"):
        assert load_space(name, Net()).name == name
        assert not load_space(name, Net()).pin  # floors resolved on the machine, no fixed dtype
    assert load_space(None, Net()).name == "cnn"
    with pytest.raises(ValueError, match="one of the bundled spaces"):
        load_space("huge", Net())


MEASURED = ["fp32", "w8a8", "w4a16"]  # as measure_cost(schemes=["w8a8", "w4a16"]) measures


def test_min_bits_floors_a_layer_among_the_schemes_profiled_and_measured() -> None:
    space = SearchSpace(
        schemes=["bf16", "w8a8", "w4a16"],
        rules=[{"type": "Conv2d", "schemes": ["bf16", "w8a8"]}],
        min_bits={"first": 8, "last": 16},
    )
    resolved = space.resolve(Net(), measured=MEASURED, profiled=MEASURED)
    assert resolved.pinned == {}
    assert resolved.choices == {
        "conv1": ["fp32", "w8a8"],  # >= 8 bits: fp32 added, bf16 not measured
        "conv2": ["w8a8"],
        "fc1": ["w8a8", "w4a16"],
        "fc2": ["fp32"],  # >= 16 bits among what was measured: fp32 only
    }
    assert resolved.dropped["conv2"]["bf16"] == (
        "the profile was computed for fp32, w8a8, w4a16 only and the cost model was measured "
        "for fp32, w8a8, w4a16 only"
    )
    everything = space.resolve(Net())  # no figures given: every scheme counts as available
    assert everything.choices["conv1"] == ["fp32", "bf16", "w8a8"]
    assert SearchSpace.from_dict(space.to_dict()).min_bits == {"first": 8, "last": 16}


def test_a_pin_to_an_unmeasured_scheme_names_what_was_measured() -> None:
    pinned = SearchSpace(schemes=["w8a8"], pin={"last": "bf16"})
    with pytest.raises(SpaceError) as info:
        pinned.resolve(Net(), measured=MEASURED)
    assert str(info.value) == (
        "<space>: the space pins layer 'fc2' to 'bf16', but the cost model was measured for "
        "fp32, w8a8, w4a16 only: profile and measure 'bf16' too, or pin the layer to one of "
        "those (or give it a precision floor instead, e.g. 'min_bits: {fc2: 8}', resolved "
        "against what was measured)."
    )
    measured = SearchSpace(schemes=["w8a8"], pin={"last": "w4a16"}, min_bits={"last": 8})
    assert measured.resolve(Net(), measured=MEASURED).pinned == {"fc2": "w4a16"}  # pin wins


def test_family_counts_subclasses_of_transformer_parts() -> None:
    class PatchNorm(nn.LayerNorm):  # as timm's LayerNorm subclasses nn.LayerNorm
        pass

    vit_like = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2), PatchNorm(4))
    assert model_family(vit_like) == "transformer"
    assert model_family(nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4))) == "transformer"


def test_layers_with_several_weight_matrices_resolve_in_the_default_space() -> None:
    from mpsearch.cost import measure_cost
    from mpsearch.profile import profile
    from mpsearch.search import search
    from mpsearch.workloads import load_workload

    wl = load_workload("speaker_lstm", n_calib=16, n_test=16)
    prof = profile(wl.model, wl.calib, schemes=["w8a8", "w4a16"], progress=False)
    cost = measure_cost(wl.model, wl.example_input, schemes=["fp32", "w8a8"], backend="cpu")
    res = search(wl.model, profile=prof, cost=cost, evaluate=wl.evaluate, n_trials=6)
    assert set(res.best().resolve(wl.model)) == {"lstm", "proj"}


class FullyConvolutional(nn.Module):
    """A segmentation-style net: convolutions and a transposed convolution, no Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.head = nn.Conv2d(8, 4, 1)


def test_the_bundled_cnn_space_fits_a_network_without_linear_layers() -> None:
    """Its Linear rule is optional (the space refused such a network before); a user's rule
    that matches nothing is still refused."""
    model = FullyConvolutional()
    assert model_family(model) == "cnn"
    resolved = load_space(None, model).resolve(model)
    assert resolved.layers == ["down", "up", "head"]
    assert resolved.choices["up"] == ["fp32", "bf16", "w8a8", "w8a16"]
    strict = SearchSpace.from_dict(
        {"schemes": ["bf16"], "rules": [{"type": "Linear", "schemes": ["w8a8"]}]}
    )
    with pytest.raises(SpaceError, match="rules\\[0\\].type 'Linear' matches no layer"):
        strict.resolve(model)
    with pytest.raises(SpaceError, match="rules\\[0\\].optional must be true or false"):
        SearchSpace.from_dict(
            {"schemes": ["bf16"], "rules": [{"type": "Linear", "schemes": ["w8a8"], "optional": 1}]}
        )


def test_a_never_called_tied_layer_follows_its_called_copy_of_the_same_type() -> None:
    from mpsearch.layers._layers import NEVER_CALLED

    schemes = ["fp32", "bf16", "w8a16", "w8a16+gptq"]
    skipped = {("shared", s): NEVER_CALLED for s in schemes}
    space = SearchSpace(schemes=["fp32", "bf16", "w8a16"]).resolve(
        SharedEmbedding(), profiled=schemes, skipped=skipped
    )
    assert space.followers == {"shared": "enc"}  # head holds the weight too, as a Linear
    assert "shared" not in space.pinned and "shared" not in space.params
    plan = space.assignment({"enc": "w8a16+gptq", "mid": "bf16", "head": "bf16"})
    assert plan == {"shared": "w8a16", "enc": "w8a16+gptq", "mid": "bf16", "head": "bf16"}
    assert space.layer_choices("shared") == ["fp32", "bf16", "w8a16"]
    assert space.contains(plan)
    # without a called copy of its type it stays pinned to fp32, as before
    alone = SearchSpace(schemes=["bf16"]).resolve(
        SharedEmbedding(), skipped={**skipped, **{("enc", s): NEVER_CALLED for s in schemes}}
    )
    assert alone.followers == {} and alone.pinned == {"shared": "fp32", "enc": "fp32"}


class _TiedLM(nn.Module):
    """An embedding tied to the output layer, a Linear between."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 256, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


def test_the_choice_table_prices_a_tied_group_in_one_scheme_exactly() -> None:
    """Each tied layer's own row counts the whole weight (held once, or one bf16 table for
    both): summed, uniform bf16 came out a table short. Group figures price it exactly; a
    mixed plan stays an estimate."""
    import mpsearch as mps
    from mpsearch.search._table import ChoiceTable, resolve_space

    torch.manual_seed(0)
    model = _TiedLM().eval()
    batches = [torch.randint(0, 256, (4, 8)) for _ in range(2)]
    schemes = ["bf16", "w8a16"]
    prof = mps.profile(model, batches, schemes=schemes, progress=False)
    cost = mps.measure_cost(model, batches[0], schemes=schemes, backend="cpu", repeats=1, warmup=0)
    space = resolve_space(SearchSpace(schemes=["fp32", *schemes]), model, profile=prof, cost=cost)
    table = ChoiceTable.build(space, prof, cost)
    for scheme in ["fp32", *schemes]:
        params = dict.fromkeys(space.params, scheme)
        assert table.totals(params)[1] == cost.memory_bytes(space.assignment(params))
    mixed = {"emb": "bf16", "mid": "w8a16", "head": "fp32"}
    assert table.totals(mixed)[1] != cost.memory_bytes(space.assignment(mixed))  # estimate
