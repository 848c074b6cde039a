"""Storages by setup, refused up front when unsafe or unreachable."""

from __future__ import annotations

import socket

import optuna
import pytest
from fake_search import SCHEMES, FakeCost, FakeProfile, fake_model, known_quality

from mpsearch.search import SearchSpace, search
from mpsearch.search._storage import journal_path, make_storage, safe_url, storage_kind


def test_storage_kind_by_url() -> None:
    assert storage_kind("sqlite:///studies/a.db") == "sqlite"
    assert storage_kind("journal:///tmp/a.log") == "journal"
    assert storage_kind("studies/a.log") == "journal"
    assert storage_kind("runs/a.journal") == "journal"
    assert storage_kind("postgresql://u:p@h/db") == "rdb"
    assert journal_path("journal:///tmp/x/a.log").as_posix() == "/tmp/x/a.log"
    assert journal_path("journal://rel/a.log").as_posix() == "rel/a.log"
    with pytest.raises(ValueError, match=r"'storage' argument must be a storage URL.*journal"):
        storage_kind("studies/a.txt")


def test_password_is_masked() -> None:
    assert safe_url("postgresql://me:s3cret@db:5432/x") == "postgresql://me:***@db:5432/x"


def test_sqlite_with_several_workers_names_the_right_storage(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    with pytest.raises(ValueError, match=r"database is locked.*journal:///.*postgresql://"):
        make_storage(url, workers=3)
    assert not (tmp_path / "s.db").exists()
    assert make_storage(url, workers=1) is not None


def test_journal_study_is_shared_between_storage_objects(tmp_path) -> None:
    url = f"journal:///{tmp_path}/deep/s.log"
    a = optuna.create_study(storage=make_storage(url, workers=4), study_name="s")
    a.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    b = optuna.load_study(storage=make_storage(url), study_name="s")
    assert [t.params for t in b.trials] == [t.params for t in a.trials]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_or_unwritable_storage_is_refused_before_any_trial(tmp_path) -> None:
    calls = []

    def evaluate(model):
        calls.append(1)
        return known_quality(model)

    blocker = tmp_path / "file"
    blocker.write_text("")
    for url, message in [
        (f"postgresql://me:pw@127.0.0.1:{_closed_port()}/db", r"me:\*\*\*@127.*cannot be reached"),
        (f"sqlite:///{blocker}/sub/s.db", "cannot be created or written"),
        (f"journal:///{blocker}/s.log", "cannot be created or written"),
    ]:
        with pytest.raises(ValueError, match=message):
            search(
                fake_model(),
                profile=FakeProfile(),
                cost=FakeCost(),
                evaluate=evaluate,
                space=SearchSpace(schemes=SCHEMES),
                storage=url,
                n_trials=3,
            )
    assert calls == []


def test_model_failing_on_its_input_is_refused_up_front(tmp_path) -> None:
    import torch

    with pytest.raises(ValueError, match=r"model fails on 'example_input'.*RuntimeError"):
        search(
            fake_model(),
            profile=FakeProfile(),
            cost=FakeCost(),
            evaluate=known_quality,
            space=SearchSpace(schemes=SCHEMES),
            storage=f"sqlite:///{tmp_path}/s.db",
            example_input=torch.zeros(2, 7),  # the fake takes 32 features
        )
    assert not (tmp_path / "s.db").exists()
