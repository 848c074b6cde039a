"""Real searches on the fake model (known sensitivities and costs), shared by the viz tests."""

from __future__ import annotations

import pytest
from fake_search import SCHEMES, FakeCost, FakeProfile, fake_model, known_quality

from mpsearch.search import Budget, SearchResult, SearchSpace, search


def _search(tmp_path_factory, budget: Budget | None) -> tuple[str, SearchResult]:
    url = f"sqlite:///{tmp_path_factory.mktemp('viz') / 's.db'}"
    res = search(
        fake_model(),
        profile=FakeProfile(),
        cost=FakeCost(),
        evaluate=known_quality,
        space=SearchSpace(schemes=SCHEMES),
        budget=budget,
        storage=url,
        study_name="fake",
        n_trials=25,
    )
    return url, res


@pytest.fixture(scope="session")
def stored_front(tmp_path_factory) -> tuple[str, SearchResult]:
    """``(storage URL, result)`` of a 25-trial study with no budget (the whole front)."""
    return _search(tmp_path_factory, None)


@pytest.fixture(scope="session")
def stored_budget(tmp_path_factory) -> tuple[str, SearchResult]:
    """``(storage URL, result)`` of a 25-trial study under a 60 % memory budget."""
    return _search(tmp_path_factory, Budget(memory_fraction=0.6))
