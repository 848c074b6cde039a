"""The public surface: each subpackage exports what a user calls (a dozen names or so), every
exported name resolves, no internal helper leaks, and the top level re-exports the same objects."""

from __future__ import annotations

import importlib

import pytest

import mpsearch as mps

SUBPACKAGES = (
    "backends",
    "cost",
    "export",
    "layers",
    "plan",
    "profile",
    "recover",
    "report",
    "rounding",
    "runtime",
    "schemes",
    "search",
    "viz",
    "viz.data",
    "workloads",
)
MAX_NAMES = 13
INTERNALS = {  # names that once leaked: tests import them from their modules
    "runtime": {"cut_point", "served_stage", "losses", "log_cut"},
    "profile": {"CODE_VERSION", "hash_batches"},
}


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_exports_a_small_resolvable_surface(name: str) -> None:
    module = importlib.import_module(f"mpsearch.{name}")
    exported = module.__all__
    assert len(exported) == len(set(exported)) <= MAX_NAMES, exported
    assert not [n for n in exported if n.startswith("_")]
    assert all(hasattr(module, n) for n in exported)
    assert not INTERNALS.get(name, set()) & set(exported)


def test_top_level_names_are_the_subpackages_objects() -> None:
    assert all(hasattr(mps, n) for n in mps.__all__)
    owners = {}
    for name in SUBPACKAGES:
        module = importlib.import_module(f"mpsearch.{name}")
        owners.update({n: module for n in module.__all__})
    for n in mps.__all__:
        if n in owners:
            assert getattr(mps, n) is getattr(owners[n], n), n
