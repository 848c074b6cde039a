"""Several worker processes on one study: Optuna's distributed mode, one process per worker.

A worker is a real separate process (``python -m mpsearch.search._workers CONFIG.json``). Models
are not always picklable, so a worker rebuilds its ``search`` arguments (model, profile, cost,
evaluate, space, budget, ...) by calling an importable factory, ``"package.module:function"``,
with JSON keyword arguments (:class:`WorkerSpec`); the CLI builds the same spec. The parent
checks everything, creates the study and enqueues the warm starts once, then starts the
workers; each runs :func:`search` on the shared storage with seed ``seed + index`` until the
study holds ``n_trials`` COMPLETE trials in all. Several machines: run the same search (or
``run_workers``) on each, with the same PostgreSQL ``storage`` and ``study_name``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpsearch._validation import invalid
from mpsearch.search._options import SearchOptions, resolve_options
from mpsearch.search._result import SearchResult, warn_about
from mpsearch.search._search import _prepare, _Prepared, search
from mpsearch.search._storage import make_storage, safe_url, storage_kind

_WORKER_MAIN = "import sys; from mpsearch.search._workers import main; sys.exit(main())"
_RESERVED = (
    "storage",
    "study_name",
    "n_trials",
    "seed",
    "load_if_exists",
    "lease",
    "timeout",
    "options",
)
POOL_KEYWORDS = (
    "spec",
    "workers",
    "storage",
    "study_name",
    "n_trials",
    "options",
    "log_dir",
    "python",
)


def _resolve(factory: str) -> Any:
    """The function named by ``"package.module:function"`` or ``"path/to/setup.py:function"``."""
    module, _, name = factory.rpartition(":")
    if not module.endswith(".py"):
        return pkgutil.resolve_name(factory)
    path = Path(module).resolve()
    key = f"_mpsearch_setup_{abs(hash(str(path)))}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {str(path)!r}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return getattr(sys.modules[key], name)


@dataclass
class WorkerSpec:
    """How a worker rebuilds its search: ``factory(**kwargs)`` returns ``search``'s keyword arguments.

    ``factory`` is ``"package.module:function"`` or ``"path/to/setup.py:function"``; the function returns a mapping with at least
    ``model``, ``profile`` and ``cost`` (plus ``evaluate`` or ``eval_data``, and any other
    argument or option of :func:`search` except storage, study name, trial count, seed, lease,
    timeout and options, which the pool sets). ``kwargs`` must be JSON-serialisable.

    >>> spec = WorkerSpec("mypkg.setup:digits_search", {"budget_mb": 0.5})   # doctest: +SKIP
    >>> run_workers(spec, workers=4, storage="studies/digits.log", study_name="digits",
    ...             n_trials=400)                                           # doctest: +SKIP
    """

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        module, _, name = self.factory.rpartition(":")
        if not module or not name:
            raise invalid("factory", self.factory, "an importable 'package.module:function'")
        try:
            json.dumps(self.kwargs)
        except TypeError as exc:
            raise invalid(
                "kwargs", self.kwargs, f"JSON-serialisable keyword arguments ({exc})"
            ) from None

    def build(self) -> dict[str, Any]:
        """Import the factory, call it, and check that it returned ``search``'s arguments."""
        try:
            fn = _resolve(self.factory)
        except (ImportError, AttributeError, ValueError, OSError) as exc:
            raise ValueError(
                f"The worker factory {self.factory!r} cannot be imported ({type(exc).__name__}: {exc}). "
                "It must be 'package.module:function', importable in a fresh Python process."
            ) from exc
        out = fn(**self.kwargs)
        if not isinstance(out, Mapping) or not {"model", "profile", "cost"} <= set(out):
            raise ValueError(
                f"The worker factory {self.factory!r} must return a mapping of search() arguments "
                f"with at least 'model', 'profile' and 'cost'. Got {type(out).__name__} instead."
            )
        clash = sorted(set(out) & set(_RESERVED))
        if clash:
            raise ValueError(
                f"The worker factory {self.factory!r} returned {clash}, which the worker pool sets; "
                "pass them to run_workers instead."
            )
        return dict(out)

    def setup(self, options: SearchOptions) -> tuple[dict[str, Any], SearchOptions]:
        """``search``'s data arguments and the options, with the factory's options applied."""
        out = self.build()
        names = set(SearchOptions.names())
        data = {k: v for k, v in out.items() if k not in names}
        chosen = {k: v for k, v in out.items() if k in names}
        return data, options.merged(chosen, verb=f"the worker factory {self.factory!r}")


@dataclass
class WorkerConfig:
    """Everything one worker process needs, written as JSON for ``python -m``."""

    spec: WorkerSpec
    options: dict[str, Any]
    index: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        data = json.loads(text)
        data["spec"] = WorkerSpec(**data["spec"])
        return cls(**data)


def run_worker(config: WorkerConfig) -> SearchResult:
    """What one worker process does: rebuild the search from the spec and run it on the study
    (the front is run for real once, by the pool, not by each worker)."""
    data, options = config.spec.setup(SearchOptions.from_dict(config.options))
    return search(**data, options=dataclasses.replace(options, verify=0))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _pool_options(options: SearchOptions) -> SearchOptions:
    """Options every worker can rebuild: a shared storage URL and a study name; resumed."""
    storage, name = options.storage, options.study_name
    if not isinstance(storage, str):
        raise invalid("storage", storage, "a storage URL that every worker process can open again")
    if storage_kind(storage) == "sqlite" and ":memory:" in storage:
        raise invalid("storage", storage, "a storage shared by processes, not an in-memory one")
    if name is None:
        raise invalid("study_name", name, "a non-empty string")
    options = dataclasses.replace(options, load_if_exists=True)
    options.to_dict()  # a sampler given as an object cannot reach the workers: refused now
    return options


class WorkerPool:
    """``workers`` processes running one study; :func:`run_workers` is ``prepare, start, wait``.

    ``options`` (:class:`SearchOptions`) and the keywords (``storage``, ``study_name``,
    ``n_trials``, and any option such as ``seed``, ``lease``, ``timeout``) are those of
    :func:`search`; the study is always resumed, and worker ``i`` samples with ``seed + i``.

    >>> pool = WorkerPool(spec, workers=2, storage="studies/s.log", study_name="s",
    ...                   n_trials=50)                          # doctest: +SKIP
    >>> pool.prepare(); pool.start(); pool.wait(); pool.result().pareto  # doctest: +SKIP
    """

    def __init__(
        self,
        spec: WorkerSpec | str,
        *,
        workers: int,
        storage: str | None = None,
        study_name: str | None = None,
        n_trials: int | None = None,
        options: SearchOptions | None = None,
        log_dir: str | Path | None = None,
        python: str = sys.executable,
        **overrides: Any,
    ) -> None:
        self.spec = WorkerSpec(spec) if isinstance(spec, str) else spec
        if not isinstance(self.spec, WorkerSpec):
            raise invalid("spec", spec, "a WorkerSpec or a 'package.module:function' string")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise invalid("workers", workers, "a positive integer")
        given = {"n_trials": n_trials, "storage": storage, "study_name": study_name, **overrides}
        self.options = _pool_options(
            resolve_options(options, given, verb="WorkerPool", also=POOL_KEYWORDS)
        )
        self.workers = workers
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.python = python
        self.processes: list[subprocess.Popen[bytes]] = []
        self._prepared: _Prepared | None = None
        self._started = 0.0

    storage = property(lambda self: self.options.storage)
    study_name = property(lambda self: self.options.study_name)
    n_trials = property(lambda self: self.options.n_trials)
    seed = property(lambda self: self.options.seed)
    lease = property(lambda self: self.options.lease_policy)
    timeout = property(lambda self: self.options.timeout)

    def prepare(self) -> _Prepared:
        """Check every input in this process, create or load the study, enqueue the warm starts once."""
        make_storage(self.storage, workers=self.workers)  # refuse SQLite / unreachable first
        data, options = self.spec.setup(self.options)
        self._prepared = _prepare(**data, options=options, workers=self.workers)
        return self._prepared

    def config(self, index: int) -> WorkerConfig:
        seed = None if self.seed is None else self.seed + index
        options = dataclasses.replace(self.options, seed=seed)
        return WorkerConfig(spec=self.spec, options=options.to_dict(), index=index)

    def start(self) -> list[subprocess.Popen[bytes]]:
        """Start the worker processes (after :meth:`prepare`); their output goes to ``log_dir``."""
        if self._prepared is None:
            self.prepare()
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="mpsearch-workers-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = _child_env()
        self._started = time.perf_counter()
        for index in range(self.workers):
            path = self.log_dir / f"worker-{index}.json"
            path.write_text(self.config(index).to_json())
            with open(self.log_dir / f"worker-{index}.out", "ab") as out:
                self.processes.append(
                    subprocess.Popen(
                        [self.python, "-c", _WORKER_MAIN, str(path)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        return self.processes

    def wait(self, timeout: float | None = None) -> list[int]:
        """Wait for every worker; return their exit statuses (negative: killed by that signal)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        codes = []
        for proc in self.processes:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.01)
            codes.append(proc.wait(left))
        return codes

    def log(self, index: int) -> str:
        """The output of worker ``index``."""
        assert self.log_dir is not None
        return (self.log_dir / f"worker-{index}.out").read_text(errors="replace")

    def result(self) -> SearchResult:
        """The study's :class:`SearchResult`, read afresh from the storage."""
        if self._prepared is None:
            self.prepare()
        assert self._prepared is not None
        return self._prepared.result(wall_time_s=time.perf_counter() - self._started)

    def run(self) -> SearchResult:
        """Prepare, start, wait; raise if the study is short of ``n_trials`` and a worker failed."""
        self.start()
        codes = self.wait()
        result = self.result()
        done = int((result.trials["state"] == "COMPLETE").sum()) if len(result.trials) else 0
        bad = [i for i, c in enumerate(codes) if c != 0]
        if bad and done < self.n_trials:
            tail = self.log(bad[0])[-2000:]
            raise RuntimeError(
                f"Worker(s) {bad} of study {self.study_name!r} on {safe_url(self.storage)} exited "
                f"with {[codes[i] for i in bad]}; the study holds {done} of {self.n_trials} "
                f"COMPLETE trials. Run again to resume it. Output of worker {bad[0]}:\n{tail}"
            )
        return warn_about(result)


def run_workers(
    spec: WorkerSpec | str,
    *,
    workers: int,
    storage: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    options: SearchOptions | None = None,
    log_dir: str | Path | None = None,
    **overrides: Any,
) -> SearchResult:
    """Run one study with ``workers`` separate processes; return its :class:`SearchResult`.

    ``spec`` (a :class:`WorkerSpec` or a ``"module:function"`` string) rebuilds the search in
    each process. ``storage`` must be shared by processes: a journal file
    (``journal:///path/study.log``, or a path ending in ``.log``) on one machine, PostgreSQL
    across machines; SQLite is refused. ``n_trials`` is the study's total of COMPLETE trials;
    worker ``i`` samples with seed ``seed + i``. ``options`` and the other keywords (``seed``,
    ``lease``, ``timeout``, any :class:`SearchOptions` field) are those of :func:`search`.
    Running it again resumes the study.

    >>> res = run_workers("mypkg.setup:digits_search", workers=4,
    ...                   storage="studies/digits.log", study_name="digits",
    ...                   n_trials=400)                               # doctest: +SKIP
    """
    return WorkerPool(
        spec,
        workers=workers,
        storage=storage,
        study_name=study_name,
        n_trials=n_trials,
        options=options,
        log_dir=log_dir,
        **overrides,
    ).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m mpsearch.search._workers CONFIG.json``: run one worker."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mpsearch.search._workers CONFIG.json", file=sys.stderr)
        return 2
    config = WorkerConfig.from_json(Path(args[0]).read_text())
    run_worker(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
