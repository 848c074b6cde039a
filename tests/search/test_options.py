"""SearchOptions: one validated object for search, WorkerPool and the pipeline's YAML."""

from __future__ import annotations

import importlib
import inspect
import re

import optuna
import pytest
import yaml
from fake_search import SCHEMES, FakeCost, FakeProfile, fake_model, known_quality

import mpsearch as mps
from mpsearch.search import SearchOptions, SearchSpace, WorkerPool, run_workers, search
from mpsearch.search._leases import LeasePolicy
from mpsearch.search._search import _prepare

SPACE = SearchSpace(schemes=SCHEMES)
FACTORY = "mypkg.setup:make_search"  # WorkerPool imports it only when it prepares


def _data() -> dict:
    return {"profile": FakeProfile(), "cost": FakeCost(), "evaluate": known_quality}


def test_old_keyword_calls_equal_options_object_calls(tmp_path) -> None:
    old = search(
        fake_model(),
        **_data(),
        space=SPACE,
        objectives=("quality", "memory"),
        n_trials=10,
        sampler="random",
        seed=3,
        screen=False,
        storage=f"sqlite:///{tmp_path}/old.db",
        study_name="s",
        lease=LeasePolicy(lease_s=30),
    )
    options = SearchOptions(
        space=SPACE,
        objectives=("quality", "memory"),
        n_trials=10,
        sampler="random",
        seed=3,
        screen=False,
        study_name="s",
        lease={"lease_s": 30},
    )
    new = search(fake_model(), **_data(), storage=f"sqlite:///{tmp_path}/new.db", options=options)
    assert list(old.trials["assignment"]) == list(new.trials["assignment"])
    assert list(old.trials["origin"]) == list(new.trials["origin"])
    assert new.objectives == ("quality", "memory") and new.study.study_name == "s"


def test_verb_keywords_override_the_options_object() -> None:
    base = SearchOptions(n_trials=50, sampler="nsga2", seed=1)
    assert base.merged({"seed": 2}).seed == 2 and base.merged({"seed": 2}).sampler == "nsga2"
    assert base.merged({}) is base


def test_an_unknown_keyword_names_it_and_lists_the_accepted_ones(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['n_trails'\]") as info:
        search(fake_model(), **_data(), n_trails=5, storage=f"sqlite:///{tmp_path}/s.db")
    for accepted in ("'n_trials'", "'sampler'", "'eval_data'", "'budget'"):
        assert accepted in str(info.value)
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("n_trials", -3, "The 'n_trials' option must be a positive integer. Got -3 instead."),
        ("n_jobs", 0, "The 'n_jobs' option must be a positive integer, or -1"),
        ("timeout", -1.0, "The 'timeout' option must be a positive number"),
        ("sampler", "cmaes-please", "The 'sampler' option must be one of 'nsga2', 'random', 'tpe'"),
        ("quality_backend", "tpu", "The 'quality_backend' option must be one of"),
        ("screen", "yes", "The 'screen' option must be True or False"),
        ("space", "no-such-space", "bundled spaces"),
        ("lease", {"lease_s": 30, "retries": 1}, "The 'lease' option must be a mapping of"),
    ],
)
def test_a_bad_option_is_refused_before_any_work(tmp_path, option, value, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SearchOptions(**{option: value})
    calls = []

    def evaluate(model) -> float:
        calls.append(model)
        return 0.0

    with pytest.raises(ValueError, match=re.escape(message)):
        search(
            fake_model(),
            profile=FakeProfile(),
            cost=FakeCost(),
            evaluate=evaluate,
            storage=f"sqlite:///{tmp_path}/s.db",
            **{option: value},
        )
    assert not calls and not (tmp_path / "s.db").exists()


def test_options_round_trip_through_a_dict_and_yaml() -> None:
    options = SearchOptions(
        n_trials=40,
        storage="studies/x.log",
        study_name="x",
        space={"schemes": ["bf16", "w8a8"], "pin": {"first": "bf16"}},
        objectives=["quality", "latency"],
        sampler="nsga2",
        seed=None,
        screen=False,
        timeout=30.0,
        lease=LeasePolicy(lease_s=20, max_retry=1),
    )
    assert options.objectives == ("quality", "latency")
    assert SearchOptions.from_dict(options.to_dict()) == options
    assert SearchOptions.from_dict(yaml.safe_load(yaml.safe_dump(options.to_dict()))) == options
    assert SearchOptions.from_dict(SearchOptions().to_dict()) == SearchOptions()


def test_from_dict_refuses_unknown_keys_and_objects_that_yaml_cannot_hold() -> None:
    with pytest.raises(ValueError, match=r"Unknown search option\(s\) \['trials'\]; accepted"):
        SearchOptions.from_dict({"trials": 3})
    with pytest.raises(TypeError, match="'sampler' option holds a TPESampler"):
        SearchOptions(sampler=optuna.samplers.TPESampler()).to_dict()


def test_no_public_function_takes_more_than_twelve_parameters() -> None:
    for fn in (search, run_workers, WorkerPool.__init__, _prepare):
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert len(params) <= 12, (fn.__qualname__, params)


def test_options_are_exported_at_the_top() -> None:
    assert mps.SearchOptions is SearchOptions and "SearchOptions" in mps.__all__
    package = importlib.import_module("mpsearch.search")  # mps.search is the function
    assert len(package.__all__) <= 13 and "SearchOptions" in package.__all__


def test_worker_pool_old_keywords_equal_an_options_object(tmp_path) -> None:
    storage = f"journal:///{tmp_path}/s.log"
    old = WorkerPool(
        FACTORY,
        workers=2,
        storage=storage,
        study_name="s",
        n_trials=20,
        seed=4,
        lease=LeasePolicy(lease_s=30),
        timeout=60.0,
    )
    options = SearchOptions(storage=storage, study_name="s", n_trials=20, seed=4, timeout=60.0)
    new = WorkerPool(FACTORY, workers=2, options=options, lease={"lease_s": 30})
    assert old.config(1) == new.config(1)
    assert old.config(1).options["seed"] == 5 and old.config(1).options["load_if_exists"]
    assert (old.storage, old.study_name, old.n_trials, old.lease.lease_s) == (storage, "s", 20, 30)
    with pytest.raises(TypeError, match=r"WorkerPool\(\) got unexpected keyword argument"):
        WorkerPool(FACTORY, workers=2, options=options, n_trial=3)
    with pytest.raises(ValueError, match="'storage' argument must be a storage URL"):
        WorkerPool(FACTORY, workers=2, study_name="s")


def test_the_pipeline_builds_the_same_options_from_the_study_yaml(tmp_path) -> None:
    from mpsearch.pipeline import StudyConfig

    path = tmp_path / "study.yaml"
    path.write_text(
        "workload: mlp\nstudy_name: s\nn_trials: 30\nsampler: nsga2\nseed: 2\n"
        "objectives: [quality, memory]\nspace: mlp\nstorage: studies/s.log\n"
        "search: {screen: false, timeout: 600, lease: {lease_s: 30, max_retry: 1}}\n"
    )
    options = StudyConfig.from_yaml(path).search_options()
    assert options == SearchOptions(
        n_trials=30,
        storage="studies/s.log",
        study_name="s",
        space="mlp",
        objectives=("quality", "memory"),
        sampler="nsga2",
        seed=2,
        load_if_exists=True,
        screen=False,
        timeout=600,
        lease=LeasePolicy(lease_s=30, max_retry=1),
    )
    path.write_text("workload: mlp\nsearch: {n_jobs: 0}\n")
    with pytest.raises(ValueError, match="study.yaml: The 'n_jobs' option must be a positive"):
        StudyConfig.from_yaml(path)


def test_the_pipeline_keeps_its_study_on_disk_where_the_search_default_is_in_memory() -> None:
    from mpsearch.pipeline import StudyConfig

    assert SearchOptions().storage is None  # search(): a fresh study in memory per call
    options = StudyConfig(workload="mlp", study_name="digits").search_options()
    assert (options.storage, options.load_if_exists) == ("sqlite:///studies/digits.db", True)
