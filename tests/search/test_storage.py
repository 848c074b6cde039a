"""Storages by setup, refused up front when unsafe or unreachable."""

from __future__ import annotations

import socket

import optuna
import pytest
from fake_search import SCHEMES, FakeCost, FakeProfile, fake_model, known_quality

from mpsearch.search import SearchSpace, search
from mpsearch.search._optuna_compat import study_storage
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


def _fake_search(**kwargs):
    return search(
        fake_model(),
        profile=FakeProfile(),
        cost=FakeCost(),
        evaluate=known_quality,
        space=SearchSpace(schemes=SCHEMES),
        n_trials=4,
        **kwargs,
    )


def test_without_storage_each_call_is_a_fresh_study_in_memory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = _fake_search()
    again = _fake_search()  # re-running a notebook cell: no DuplicatedStudyError
    assert isinstance(study_storage(first.study), optuna.storages.InMemoryStorage)
    assert study_storage(again.study) is not study_storage(first.study)
    assert len(again.trials) == len(first.trials)  # fresh: not resumed, not piled up
    assert list(tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(ValueError, match=r"'load_if_exists' option must be False without a 'st"):
        _fake_search(load_if_exists=True)


def test_an_existing_study_name_says_how_to_resume_or_rename(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    _fake_search(storage=url, study_name="s")
    with pytest.raises(ValueError, match=r"already holds a study named 's'") as info:
        _fake_search(storage=url, study_name="s")
    message = str(info.value)
    assert "load_if_exists=True" in message and "--resume" in message
    assert "study_name='s-2'" in message and "--study-name" in message
    resumed = _fake_search(storage=url, study_name="s", load_if_exists=True)
    assert int((resumed.trials["state"] == "COMPLETE").sum()) == 4
