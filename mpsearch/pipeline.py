"""A whole study from one config: workload → profile → cost → search → quantize → summary.

This is what ``mpsearch run`` / ``profile`` / ``cost`` / ``search`` and the search-run scripts
in ``studies/`` call (one implementation of each step). The steps live in :class:`StudySteps`, each
computed at most once per process and cached or stored on disk (profile rows, latency tables,
the Optuna study), so a rerun, or ``mpsearch search`` after ``mpsearch profile``, reuses what
was computed instead of starting over. What a step produced is written to the study's output
directory (``studies/out/<study>/``) as a :class:`~mpsearch.report.StudyRecord`, which
``mpsearch report`` reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import pkgutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from torch import nn

from mpsearch._data import is_multi_label, run_model
from mpsearch._io import atomic_path
from mpsearch._validation import check_fraction, exception_line, invalid, unknown
from mpsearch.backends import BACKENDS, Backend, get_backend, quantize
from mpsearch.cost import CostModel, CostOptions, clock, measure_cost, threads
from mpsearch.cost._decode import DecodeTimer, check_compile
from mpsearch.cost._model import per_layer_backend
from mpsearch.layers import quantizable_layers
from mpsearch.plan import PrecisionPlan
from mpsearch.profile import ProfileOptions, SensitivityProfile, profile
from mpsearch.recover import RecoverOptions, RecoveryResult, recover
from mpsearch.report import FILES, StudyRecord
from mpsearch.report._record import RECOVERY_COLUMNS
from mpsearch.rounding import Rounder, RoundingOptions, smooth_activations
from mpsearch.runtime._scorers import agrees, answer_logits
from mpsearch.schemes import get_scheme
from mpsearch.schemes._rounding import DEFAULT_ROUNDING, ROUNDINGS, choice_name, split_choice
from mpsearch.search import (
    Budget,
    SearchOptions,
    SearchResult,
    WorkerSpec,
    run_workers,
    search,
)
from mpsearch.search._realcheck import measure_plans
from mpsearch.search._result import SLOWER_THAN_FP32
from mpsearch.search._storage import storage_kind
from mpsearch.search._table import ChoiceTable, resolve_space
from mpsearch.workloads import WORKLOADS, Workload, load_workload

QUALITY = ("task", "fidelity")
# study keys that are search options (the ``search`` section holds the others)
_SEARCH_KEYS = (
    "n_trials",
    "storage",
    "study_name",
    "space",
    "objectives",
    "sampler",
    "seed",
    "load_if_exists",
)
# options of the ``profile`` and ``cost`` sections the study sets itself: what sets each
_SET_BY_STUDY = {
    "profile": {
        "max_batches": "the top-level key profile_batches",
        "cache_dir": "the top-level key cache_dir",
        "rounding": "the top-level rounding section",
        "progress": "the command",
    },
    "cost": {
        "cache_dir": "the top-level key cache_dir",
        "num_threads": "the top-level key num_threads",
        "timer": "the top-level key timer",
    },
}


@dataclass
class StudyConfig:
    """Everything a study needs, loadable from YAML (unknown keys are refused).

    ``workload`` is a bundled workload name (``digits_cnn``, ``resnet18``,
    ``text_transformer``, ``mlp``, ``char_mlp``) or ``"package.module:function"`` returning a
    :class:`~mpsearch.workloads.Workload`. ``profile_batches`` profiles on the first calibration
    batches only (``None``: all of them). The search's options are the top-level keys
    ``n_trials``, ``storage``, ``study_name``, ``space``, ``objectives``, ``sampler``, ``seed``,
    ``load_if_exists`` and the ``search`` section (any other
    :class:`~mpsearch.search.SearchOptions` field: ``screen``, ``warm_start``, ``timeout``,
    ``lease``...); :meth:`search_options` builds them. ``workers`` > 1 runs the search in that
    many processes (:func:`~mpsearch.search.run_workers`), on a journal-file or PostgreSQL
    ``storage``. ``rounding`` adds calibrated rounding choices (:class:`StudyRounding`),
    ``recover`` a recovery fine-tune of the chosen plan(s) (:class:`StudyRecovery`). The
    ``profile`` and ``cost`` sections hold :class:`~mpsearch.profile.ProfileOptions` and
    :class:`~mpsearch.cost.CostOptions` fields (``profile: {metric: mse}``) but those the study
    sets from its own keys (``max_batches`` from ``profile_batches``, ``cache_dir``...).

    >>> StudyConfig(workload="digits_cnn", n_trials=40).study_name
    'digits_cnn'
    """

    workload: str = "digits_cnn"
    study_name: str | None = None
    seed: int = 0
    schemes: list[str] = field(default_factory=lambda: ["bf16", "w8a8", "w8a16", "w4a16"])
    space: str | None = None
    backend: str = "cpu"
    budget: dict[str, float] = field(default_factory=dict)
    objectives: list[str] = field(default_factory=lambda: ["quality", "memory", "latency"])
    n_trials: int = 60
    profile_batches: int | None = None
    sampler: str = "tpe"
    storage: str | None = None
    quality: str = "task"
    output_dir: str | None = None
    cache_dir: str = "studies/.cache"
    num_threads: int | None = 1
    timer: str = "process"
    load_if_exists: bool = True
    controller: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    search: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    rounding: dict[str, Any] | list[str] | None = None
    recover: dict[str, Any] | None = None
    workload_options: dict[str, Any] = field(default_factory=dict)
    decode: dict[str, Any] | None = None
    smooth: float | str | dict[str, Any] | None = None
    deploy: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.study_name is None:
            self.study_name = self.workload.rsplit(":", 1)[-1]
        if self.quality not in QUALITY:
            raise unknown("quality", self.quality, QUALITY)
        if ":" not in self.workload and self.workload not in WORKLOADS:
            raise invalid(
                "workload",
                self.workload,
                f"one of {sorted(WORKLOADS)} or 'package.module:function'",
            )
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise invalid("n_trials", self.n_trials, "a positive integer")
        if self.profile_batches is not None and (
            isinstance(self.profile_batches, bool)
            or not isinstance(self.profile_batches, int)
            or self.profile_batches < 1
        ):
            raise invalid(
                "profile_batches", self.profile_batches, "a positive integer or null (all batches)"
            )
        per_layer_backend(self.backend)  # an unknown or whole-model backend, refused now
        self.deploy_backends()
        Budget(**self.budget)  # validates the budget's keys and values now
        ControllerCurve(**(self.controller or {}))  # likewise the controller curve's settings
        self._check_search()
        self.profiled_schemes()  # the rounding settings, and that some scheme can take them
        self.profile_options()
        self.cost_options()
        self.recover_settings()
        self.decode_settings()
        self.smooth_alpha()
        if not isinstance(self.workload_options, dict) or (
            self.workload_options and ":" in self.workload
        ):
            raise invalid(
                "workload_options",
                self.workload_options,
                "a mapping of load_workload keywords (n_calib, n_test, batch_size) for a "
                "bundled workload",
            )

    def _check_search(self) -> None:
        """The search options and workers, checked now (before any work)."""
        if not isinstance(self.search, dict):
            raise invalid("search", self.search, "a mapping of search option names to values")
        clash = sorted(set(self.search) & set(_SEARCH_KEYS))
        if clash:
            raise ValueError(
                f"search: {clash} are study keys; set them at the top level of the config."
            )
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise invalid("workers", self.workers, "a positive integer")
        if self.workers > 1 and storage_kind(self.storage_url) == "sqlite":
            raise ValueError(
                f"{self.workers} workers need a storage that several processes can share; "
                f"SQLite ({self.storage_url}) cannot. Set 'storage' (--storage) to a journal "
                f"file, e.g. studies/{self.study_name}.log, or a PostgreSQL URL."
            )
        self.search_options()

    def search_options(self, **overrides: Any) -> SearchOptions:
        """The :class:`~mpsearch.search.SearchOptions` this study's search runs with.

        >>> StudyConfig(workload="digits_cnn", n_trials=40, search={"screen": False}).search_options().screen
        False
        """
        keys = {k: getattr(self, k) for k in _SEARCH_KEYS}
        keys["storage"] = self.storage_url
        return SearchOptions.from_dict({**self.search, **keys, **overrides})

    def _section(self, name: str) -> dict[str, Any]:
        """The ``profile`` or ``cost`` section, refused unless a mapping of options the study
        does not set itself."""
        section = getattr(self, name)
        if not isinstance(section, dict):
            raise invalid(name, section, f"a mapping of {name} option names to values")
        for key in section:
            if key in _SET_BY_STUDY[name]:
                raise ValueError(
                    f"{name}: {key!r} is set by the study, from {_SET_BY_STUDY[name][key]}."
                )
        return section

    def profile_options(self, **study: Any) -> ProfileOptions:
        """The :class:`~mpsearch.profile.ProfileOptions` of the ``profile`` section, with the
        options the study sets (``study``: max_batches, cache_dir, rounding, progress).

        >>> StudyConfig(profile={"metric": "mse"}).profile_options().metric
        'mse'
        """
        return ProfileOptions.from_dict({**study, **self._section("profile")})

    def cost_options(self, **study: Any) -> CostOptions:
        """The :class:`~mpsearch.cost.CostOptions` of the ``cost`` section, with the options the
        study sets (``study``: cache_dir, num_threads, timer; ``cold`` unless the section
        sets it).

        >>> StudyConfig(cost={"repeats": 5}).cost_options().repeats
        5
        """
        return CostOptions.from_dict({**study, **self._section("cost")})

    def deploy_backends(self) -> list[Backend]:
        """The ``deploy`` key: backends the summary also runs the measured plans on, whole-model
        ones included (``cpu-pt2e``: PyTorch's x86 int8 flow, calibrated on the workload's
        calibration batches; ``cpu-inductor``), each plan next to the user's fp32 model again.
        The cost model and the search stay on ``backend``; a plan a deploy backend cannot run
        is left out of its rows, with the reason in the log.

        >>> [b.name for b in StudyConfig(deploy=["cpu-pt2e"]).deploy_backends()]
        ['cpu-pt2e']
        """
        if not isinstance(self.deploy, list):
            raise invalid("deploy", self.deploy, "a list of backend names")
        backends = []
        for name in self.deploy:
            if name not in BACKENDS:
                raise unknown("deploy", name, BACKENDS)
            backend = get_backend(name)
            if not backend.real:
                raise invalid("deploy", name, "a backend that runs real kernels")
            backends.append(backend)
        return backends

    def smooth_alpha(self) -> float | str | None:
        """The ``smooth`` key: SmoothQuant's migration strength (``None``: no smoothing).

        ``smooth: 0.5`` or ``smooth: {alpha: 0.5}`` folds SmoothQuant scales into the
        normalisations feeding Linear layers (:func:`mpsearch.smooth_activations`) before the
        profile, so w8a8 plans see activations without their outlier channels; ``smooth: auto``
        chooses the strength per normalisation, and folds only where it lowers the w8a8 error
        on held-out calibration rows.

        >>> StudyConfig(smooth={"alpha": 0.6}).smooth_alpha()
        0.6
        >>> StudyConfig(smooth="auto").smooth_alpha()
        'auto'
        """
        value = self.smooth
        if isinstance(value, dict):
            extra = sorted(set(value) - {"alpha"})
            if extra:
                raise ValueError(f"smooth: unknown key(s) {extra}; accepted keys: ['alpha'].")
            value = value.get("alpha", 0.5)
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise invalid(
                "smooth", self.smooth, "null, 'auto', a number in [0, 1] or {alpha: <number>}"
            )
        return float(value)

    def rounding_settings(self) -> StudyRounding:
        """The ``rounding`` key as a :class:`StudyRounding` (no methods: round to nearest).

        >>> StudyConfig(rounding=["gptq"]).rounding_settings().methods
        ['gptq']
        """
        return StudyRounding.from_config(self.rounding)

    def recover_settings(self) -> StudyRecovery | None:
        """The ``recover`` key as a :class:`StudyRecovery` (``None``: no recovery fine-tune).

        >>> StudyConfig(recover={"steps": 20}).recover_settings().plans
        'best'
        """
        return _section("recover", self.recover, StudyRecovery, "recovery settings")

    def decode_settings(self) -> StudyDecode | None:
        """The ``decode`` key as a :class:`StudyDecode` (``None``: not a decoding study).

        >>> StudyConfig(decode={"new_tokens": 16}).decode_settings().drafts
        ['w4a16']
        """
        return _section("decode", self.decode, StudyDecode, "decoding settings")

    def profiled_schemes(self) -> list[str]:
        """The choices profiled: ``schemes``, then ``<scheme>+<method>`` for each scheme that
        can take each ``rounding`` method (integer weights with channel or group scales).

        >>> StudyConfig(schemes=["bf16", "w4a16"], rounding=["gptq"]).profiled_schemes()
        ['bf16', 'w4a16', 'w4a16+gptq']
        """
        methods = self.rounding_settings().methods
        rounded = [
            choice_name(scheme, method)
            for method in methods
            for scheme in self.schemes
            if _takes_rounding(scheme, method)
        ]
        if methods and not rounded:
            raise ValueError(
                f"rounding: none of the schemes {self.schemes} can take {methods} (calibrated "
                "rounding needs integer weights with per-channel or per-group scales, e.g. "
                "w4a16, w8a16); add such a scheme to 'schemes' or remove 'rounding'."
            )
        return [*self.schemes, *rounded]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> StudyConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ValueError(f"Cannot read study config {str(path)!r}: {exc.strerror}.") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a study config must be a mapping of keys to values.")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"{path}: unknown key(s) {extra}; accepted keys: {sorted(known)}.")
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///studies/{self.study_name}.db"

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir or f"studies/out/{self.study_name}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _section(key: str, value: Any, cls: type[Any], what: str) -> Any:
    """The config section ``key`` (a mapping, or ``None``: absent) as a ``cls`` dataclass;
    a key ``cls`` does not know is refused, naming the accepted ones."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(key, value, f"a mapping of {what} (or null)")
    known = {f.name for f in fields(cls)}
    extra = sorted(set(value) - known)
    if extra:
        raise ValueError(f"{key}: unknown key(s) {extra}; accepted keys: {sorted(known)}.")
    return cls(**value)


def _takes_rounding(scheme: str, method: str) -> bool:
    """Whether the choice ``<scheme>+<method>`` exists (the scheme's weights can be rounded)."""
    try:
        get_scheme(choice_name(scheme, method))
    except ValueError:
        return False
    return True


@dataclass
class StudyRounding:
    """Calibrated rounding in a study (config key ``rounding``): the ``methods`` offered
    (``<scheme>+<method>`` is profiled and searched next to each scheme that can take it) and
    the :class:`~mpsearch.rounding.RoundingOptions` fields as ``options``. The key is either a
    list of methods or ``{methods: [...], options: {...}}``.

    >>> StudyRounding.from_config({"methods": ["gptq"], "options": {"damp": 0.05}}).rounding_options().damp
    0.05
    """

    methods: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        accepted = [m for m in ROUNDINGS if m != DEFAULT_ROUNDING]
        if isinstance(self.methods, str) or not isinstance(self.methods, list):
            raise invalid("rounding.methods", self.methods, f"a list of methods among {accepted}")
        for method in self.methods:
            if method not in accepted:
                raise unknown("rounding.methods", method, accepted)
        self.rounding_options()

    @classmethod
    def from_config(cls, value: Any) -> StudyRounding:
        """From the config's ``rounding`` value (``None``, a list of methods or a mapping)."""
        if value is None:
            return cls()
        if isinstance(value, list):
            return cls(methods=value)
        if not isinstance(value, dict):
            raise invalid(
                "rounding", value, "a list of methods or a mapping with 'methods' and 'options'"
            )
        extra = sorted(set(value) - {"methods", "options"})
        if extra:
            raise ValueError(
                f"rounding: unknown key(s) {extra}; accepted keys: ['methods', 'options']."
            )
        return cls(**value)

    def rounding_options(self) -> RoundingOptions:
        """The :class:`~mpsearch.rounding.RoundingOptions` built from ``options``."""
        if not isinstance(self.options, dict):
            raise invalid("rounding.options", self.options, "a mapping of RoundingOptions fields")
        known = [f.name for f in fields(RoundingOptions)]
        extra = sorted(set(self.options) - set(known))
        if extra:
            raise ValueError(
                f"rounding.options: unknown option(s) {extra}; accepted options: {sorted(known)}."
            )
        try:
            return RoundingOptions(**self.options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"rounding.options: {exc}") from None


RECOVER_PLANS = ("best", "front")


@dataclass
class StudyRecovery:
    """The recovery fine-tune of a study (config key ``recover``): :func:`~mpsearch.recover`
    with ``steps`` and ``lr`` on the calibration data, of the chosen plan (``plans: best``) or
    of every plan on the Pareto front (``front``); ``options`` are
    :class:`~mpsearch.recover.RecoverOptions` fields.

    >>> StudyRecovery(steps=50, plans="front").recover_options().eval_every
    25
    """

    steps: int = 200
    lr: float = 1e-4
    plans: str = "best"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise invalid("recover.steps", self.steps, "a positive integer")
        if (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, (int, float))
            or not 0 < self.lr < float("inf")
        ):
            raise invalid("recover.lr", self.lr, "a positive number")
        if self.plans not in RECOVER_PLANS:
            raise unknown("recover.plans", self.plans, RECOVER_PLANS)
        self.recover_options()

    def recover_options(self) -> RecoverOptions:
        """The :class:`~mpsearch.recover.RecoverOptions` built from ``options``."""
        try:
            return RecoverOptions.from_dict(self.options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"recover.options: {exc}") from None


@dataclass
class StudyDecode:
    """Settings of a causal language model study (config key ``decode``).

    The cost model is measured on one token (``{"input_ids": [1, 1]}``, the first test
    token), so latency is per decoded token and the fronts are perplexity x memory x
    tokens/s. The speculative step then runs a
    :class:`~mpsearch.runtime.SpeculativeController` for each of ``references`` (``fp32`` or
    ``best``: the chosen plan) with the draft and ``k`` tuned among ``drafts`` and ``ks`` on
    ``prompts`` calibration prompts of ``prompt_len`` tokens, then times ``generate``
    (``new_tokens`` greedy tokens after each of ``prompts`` test prompts) with that ``k``
    against ``k = 0`` (the reference alone) and checks the outputs are identical.
    ``compile: true`` decodes both variants compiled by Inductor on static KV caches
    (:class:`~mpsearch.cost.KVDecoder`; eager with the reason where that cannot run);
    ``compile: max-autotune`` also picks each matrix product's kernel by measurement.

    >>> StudyDecode(ks=[0, 2, 4]).references
    ['fp32', 'best']
    """

    prompt_len: int = 32
    new_tokens: int = 32
    prompts: int = 4
    drafts: list[str] = field(default_factory=lambda: ["w4a16"])
    ks: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    references: list[str] = field(default_factory=lambda: ["fp32", "best"])
    compile: bool | str = False

    def __post_init__(self) -> None:
        check_compile(self.compile, argument="decode.compile")
        for name in ("prompt_len", "new_tokens", "prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise invalid(f"decode.{name}", value, "a positive integer")
        if not isinstance(self.drafts, list) or not self.drafts:
            raise invalid("decode.drafts", self.drafts, "a non-empty list of scheme names")
        for draft in self.drafts:
            get_scheme(split_choice(draft)[0])  # an unknown scheme is refused now
        if (
            not isinstance(self.ks, list)
            or not self.ks
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.ks)
        ):
            raise invalid("decode.ks", self.ks, "a non-empty list of integers >= 0")
        if (
            not isinstance(self.references, list)
            or not self.references
            or any(r not in ("fp32", "best") for r in self.references)
        ):
            raise invalid("decode.references", self.references, "a list of 'fp32' and 'best'")


SPECULATIVE_COLUMNS = (
    "reference",
    "draft",
    "k",
    "acceptance_rate",
    "tokens_per_s",
    "reference_tokens_per_s",
    "speedup",
    "exact",
)


def speculative_rows(
    wl: Workload,
    references: dict[str, PrecisionPlan | str],
    settings: StudyDecode,
    *,
    backend: str | Backend,
    rounder: Rounder | None = None,
) -> pd.DataFrame:
    """One row per reference: the speculative controller tuned and timed as
    :class:`StudyDecode` says (wall-clock tokens/s of ``generate``, medians over the test
    prompts; ``exact``: every output equals the reference's own greedy decoding).

    >>> speculative_rows(wl, {"fp32": "fp32"}, StudyDecode(), backend="cpu")  # doctest: +SKIP
    """
    from mpsearch.runtime import SpeculativeController

    calib, test = _token_rows(wl.calib), _token_rows(wl.test)
    n, length = settings.prompts, settings.prompt_len
    tune_prompts = [row[:length] for row in calib[:n]]
    test_prompts = [row[:length] for row in test[:n]]
    rows = []
    for label, reference in references.items():
        drafts: list[str] = list(settings.drafts)
        ctrl = SpeculativeController(
            wl.model,
            drafts[0],
            reference=reference,
            backend=backend,
            calib=wl.calib,  # static activation ranges: one token or a block, the same codes
            rounder=rounder,
            compile=settings.compile,
        )
        ctrl.tune(tune_prompts, ks=settings.ks, drafts=drafts, max_new_tokens=settings.new_tokens)
        k = max(ctrl.k, 1)
        for warm_k in (k, 0):  # untimed: a k the tuner never ran would compile while timed
            ctrl.generate(test_prompts[0], max_new_tokens=settings.new_tokens, k=warm_k)
        ctrl.audit_log.clear()  # acceptance over the timed prompts only
        spec_s, ref_s, exact = [], [], True
        for prompt in test_prompts:
            t0 = time.perf_counter()
            fast = ctrl.generate(prompt, max_new_tokens=settings.new_tokens, k=k)
            t1 = time.perf_counter()
            slow = ctrl.generate(prompt, max_new_tokens=settings.new_tokens, k=0)
            spec_s.append(t1 - t0)
            ref_s.append(time.perf_counter() - t1)
            exact = exact and bool(torch.equal(fast, slow))
        audit = ctrl.audit
        drafted = int(audit["drafted"].sum())
        spec_tps = settings.new_tokens / statistics.median(spec_s)
        ref_tps = settings.new_tokens / statistics.median(ref_s)
        rows.append(
            {
                "reference": label,
                "draft": ctrl.draft_name,
                "k": k,
                "acceptance_rate": int(audit["accepted"].sum()) / drafted if drafted else math.nan,
                "tokens_per_s": spec_tps,
                "reference_tokens_per_s": ref_tps,
                "speedup": spec_tps / ref_tps,
                "exact": exact,
            }
        )
    return pd.DataFrame(rows, columns=list(SPECULATIVE_COLUMNS))


@dataclass
class ControllerCurve:
    """Settings of the controller curve a study may measure (config key ``controller``).

    For each ``epsilons`` target a cascade :class:`~mpsearch.runtime.Controller` over the
    front's plans and fp32 (at most ``max_variants``, cheapest first) is calibrated on the
    calibration split (``max_disagreement=eps``, ``delta``, ``scorer``) and measured on the
    test split, next to each variant served alone. Empty ``epsilons``: no curve. A
    segmentation workload's image agrees with fp32 when ``min_agreement`` of its pixels do.

    >>> ControllerCurve(epsilons=[0.01, 0.05]).scorer
    'ratio'
    """

    epsilons: list[float] = field(default_factory=list)
    scorer: str = "ratio"
    delta: float = 0.1
    max_variants: int = 3
    repeats: int = 3
    min_agreement: float = 0.99

    def __post_init__(self) -> None:
        from mpsearch.runtime import SCORERS

        check_fraction("controller.min_agreement", self.min_agreement, open_high=False)

        if not isinstance(self.epsilons, list) or not all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e < 1
            for e in self.epsilons
        ):
            raise invalid("controller.epsilons", self.epsilons, "a list of numbers in (0, 1)")
        if self.scorer not in SCORERS:
            raise unknown("controller.scorer", self.scorer, SCORERS)
        if not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise invalid("controller.delta", self.delta, "a number in (0, 1)")
        for name in ("max_variants", "repeats"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (2 if name == "max_variants" else 1)
            ):
                raise invalid(f"controller.{name}", value, "a positive integer (max_variants >= 2)")


def plan_roundings(plan: PrecisionPlan, model: Any) -> list[str]:
    """The calibrated rounding methods ``plan``'s choices use on ``model``, in order met.

    >>> from torch import nn
    >>> plan_roundings(PrecisionPlan({"0": "w4a16+gptq"}, default="bf16"), nn.Sequential(nn.Linear(4, 4)))
    ['gptq']
    """
    methods = (split_choice(c)[1] for c in plan.resolve_choices(model).values())
    return [m for m in dict.fromkeys(methods) if m != DEFAULT_ROUNDING]


CONTROLLER_CURVE_COLUMNS = ("method", "latency_ms", "disagreement", "accuracy", "epsilon", "note")


def _curve_variants(wl: Workload, plans: list[PrecisionPlan], max_variants: int) -> list[Any]:
    """The distinct plans that are not all-fp32 (at most ``max_variants - 1``), then fp32."""
    seen, cheap = set(), []
    for plan in plans:
        key = tuple(sorted(plan.resolve(wl.model).items()))
        if key not in seen and any(v != "fp32" for _, v in key):
            seen.add(key)
            cheap.append(plan)
    return [*cheap[: max_variants - 1], PrecisionPlan.uniform("fp32")]


def _answers(out: Any, batch: Any, *, multi_label: bool) -> Any:
    """Per-input answers to ``batch``: the class (the last real token's for a language model),
    or a dense output's class map ``[B, P]`` (a multi-label classifier's: its labels'
    ``logit > 0``)."""
    return answer_logits(out, multi_label=multi_label, batch=batch).argmax(1)


def _serve_test_split(
    wl: Workload,
    serve: Callable[[Any], Any],
    reference: list[Any],
    repeats: int,
    read: Callable[[], float],
    min_agreement: float,
) -> dict[str, float]:
    """Latency per input (the best of ``repeats`` runs of each test batch), disagreement with
    ``reference`` and accuracy (NaN without labels) of ``serve`` on the test split."""
    import torch

    labels = wl.test_labels if wl.task in ("classification", "multilabel") else None
    per_input, agree, correct, n = [], 0, 0, 0
    with torch.inference_mode():
        for batch, ref, target in zip(wl.test, reference, labels or reference, strict=True):
            times = []
            for _ in range(repeats):
                t0 = read()
                out = serve(batch)
                times.append(read() - t0)
            per_input.append(min(times) * 1e3 / len(ref))
            answer = _answers(out, batch, multi_label=is_multi_label(wl.model))
            agree += int(agrees(answer, ref, min_agreement=min_agreement).sum())
            correct += int(agrees(answer, target, min_agreement=1.0).sum())  # a label set
            n += len(answer)
    return {
        "latency_ms": statistics.fmean(per_input),
        "disagreement": 1.0 - agree / n,
        "accuracy": correct / n if labels is not None else float("nan"),
    }


def controller_curve(
    wl: Workload,
    plans: list[PrecisionPlan],
    *,
    backend: str | Backend,
    settings: ControllerCurve,
    num_threads: int | None = 1,
    timer: str = "process",
    progress: bool = False,
    rounder: Any = None,
) -> pd.DataFrame:
    """Measure the run-time controller's curve on ``wl`` (plans with calibrated roundings take
    their weights from ``rounder``): one row per method, in the
    ``controller.csv`` format of :mod:`mpsearch.report` (``method``, ``latency_ms`` per input,
    ``disagreement`` with fp32, ``accuracy``, ``epsilon``, ``note``).

    ``plans`` are the cascade's cheaper stages, fp32 its reference; ``static:<variant>`` rows
    serve one variant to every input, ``ctrl:<scorer>:<eps>`` rows the calibrated cascade,
    whose ``note`` says when the calibration split is too small to certify ``eps`` (``not
    certifiable with n inputs (needs ≥ N)``: every input then goes to fp32 after the cheap
    pass). Latency is the best of ``settings.repeats`` runs of each test batch, per input,
    timed by ``timer`` (``"process"``: CPU time, steady on a shared machine) with
    ``num_threads`` threads.

    >>> controller_curve(wl, res.plans, backend="cpu",
    ...                  settings=ControllerCurve(epsilons=[0.01]))  # doctest: +SKIP
    """
    import torch
    from tqdm.auto import tqdm

    from mpsearch.runtime import Controller

    with threads(num_threads):  # variants are timed (and slow ones dropped) as served below
        ctrl = Controller(
            wl.model,
            _curve_variants(wl, plans, settings.max_variants),
            backend=backend,
            scorer=settings.scorer,
            example_input=wl.example_input,
            rounder=rounder,
            min_agreement=settings.min_agreement,
        )
    with torch.inference_mode():
        reference = [
            _answers(run_model(wl.model, b), b, multi_label=ctrl.multi_label) for b in wl.test
        ]

    def measure(serve: Callable[[Any], Any]) -> dict[str, float]:
        return _serve_test_split(
            wl, serve, reference, settings.repeats, clock(timer), settings.min_agreement
        )

    rows = []
    jobs = [*ctrl.variants, *settings.epsilons]
    with threads(num_threads):
        for item in tqdm(jobs, desc="controller", disable=not progress, leave=False):
            if isinstance(item, float | int):
                report = ctrl.calibrate(
                    wl.calib, max_disagreement=float(item), delta=settings.delta
                )
                row = {"method": f"ctrl:{settings.scorer}:{item:g}", "epsilon": float(item)}
                rows.append({**row, **measure(ctrl), "note": report.note or ""})
            else:
                row = {"method": f"static:{item.name}", "epsilon": float("nan"), "note": ""}
                rows.append({**row, **measure(lambda b, m=item.module: run_model(m, b))})
    return pd.DataFrame(rows, columns=list(CONTROLLER_CURVE_COLUMNS))


@dataclass
class StudyOutcome:
    """What a study produced: the workload, profile, cost model, search result, chosen plan, summary."""

    config: StudyConfig
    workload: Workload
    profile: SensitivityProfile
    cost: CostModel
    result: SearchResult
    best: PrecisionPlan
    summary: pd.DataFrame
    timings: dict[str, float]
    plan_path: Path
    record: StudyRecord | None = None


def build_workload(spec: str, *, seed: int = 0, options: dict[str, Any] | None = None) -> Workload:
    """A bundled workload by name (``options``: more keywords of
    :func:`~mpsearch.workloads.load_workload`), or the result of
    ``"package.module:function"(seed=seed)``."""
    if ":" not in spec:
        return load_workload(spec, seed=seed, **(options or {}))
    try:
        factory = pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as exc:
        raise invalid("workload", spec, f"an importable 'module:function' ({exc})") from None
    if not callable(factory):
        raise invalid("workload", spec, "an importable 'module:function' naming a function")
    return factory(seed=seed)


def worker_setup(config: dict[str, Any]) -> dict[str, Any]:
    """What each worker of a study with ``workers`` > 1 searches with (a
    :class:`~mpsearch.search.WorkerSpec` factory): the workload, and the profile and cost
    model its parent computed (read back from their caches).

    >>> worker_setup(StudyConfig(workload="mlp").to_dict())["model"]   # doctest: +SKIP
    """
    steps = StudySteps(StudyConfig(**config), log=None, progress=False)
    return steps.search_arguments()


def _quiet(_: str) -> None:
    return None


class StudySteps:
    """The steps of one study, each run at most once (on first use) and cached on disk.

    ``workload`` → ``profile`` (rows cached under ``cache_dir/profile``) and ``cost``
    (``cache_dir/cost``) → ``result`` (the Optuna study in ``storage``, resumed) →
    :meth:`measure` (fp32, the uniform plans and the chosen one on the real backend).
    Asking for a later step runs the earlier ones it needs; :meth:`save` writes whatever was
    computed to the output directory. ``log`` receives one line per finished step;
    ``progress`` shows progress bars (``None``: when stderr is a terminal).

    >>> steps = StudySteps(StudyConfig.from_yaml("studies/digits.yaml"))   # doctest: +SKIP
    >>> steps.profile.pivot("e2e")            # profiles (or reads the cache)  # doctest: +SKIP
    >>> steps.result.pareto                   # reuses that profile            # doctest: +SKIP
    """

    def __init__(
        self,
        config: StudyConfig,
        *,
        log: Callable[[str], None] | None = print,
        progress: bool | None = None,
    ) -> None:
        if not isinstance(config, StudyConfig):
            raise invalid("config", config, "a StudyConfig")
        if progress is not None and not isinstance(progress, bool):
            raise invalid("progress", progress, "None, True or False")
        self.config = config
        self.log = log or _quiet
        self.progress = progress
        self.timings: dict[str, float] = {}
        self._summary: pd.DataFrame | None = None
        self._controller: pd.DataFrame | None = None
        self._recovery: pd.DataFrame | None = None
        self._speculative: pd.DataFrame | None = None

    @property
    def _show_progress(self) -> bool:
        return self.progress if self.progress is not None else sys.stderr.isatty()

    def _timed(self, key: str, started: float) -> float:
        self.timings[key] = time.perf_counter() - started
        return self.timings[key]

    @cached_property
    def workload(self) -> Workload:
        """The study's workload (trained weights cached by the workload itself)."""
        t0 = time.perf_counter()
        wl = build_workload(
            self.config.workload, seed=self.config.seed, options=self.config.workload_options
        )
        alpha = self.config.smooth_alpha()
        if alpha is not None:  # the same float outputs, fewer activation outliers
            smoothed = smooth_activations(wl.model, wl.calib, alpha=alpha)
            wl = replace(wl, model=smoothed.model)
            done = smoothed.table[smoothed.table["smoothed"]]
            self.log(
                f"smoothing (alpha {alpha}): {len(done)} of {len(smoothed.table)} Linear layers "
                f"smoothed ({', '.join(done['layer'].head(6))}{' ...' if len(done) > 6 else ''})"
            )
        self._timed("workload_s", t0)
        return wl

    @cached_property
    def fp32_quality(self) -> float:
        """The workload's quality in fp32 (its ``evaluate`` on the test split)."""
        quality = float(self.workload.evaluate(self.workload.model))
        wl = self.workload
        n = sum(p.numel() for p in wl.model.parameters())
        self.log(f"workload {wl.name}: {n:,} parameters, fp32 quality {quality:.4f}")
        return quality

    @cached_property
    def profile(self) -> SensitivityProfile:
        """The sensitivity profile (rows cached under ``cache_dir/profile``)."""
        wl, _ = self.workload, self.fp32_quality
        t0 = time.perf_counter()
        options = self.config.profile_options(
            max_batches=self.config.profile_batches,
            cache_dir=Path(self.config.cache_dir) / "profile",
            progress=self._show_progress,
            rounding=self.config.rounding_settings().rounding_options(),
        )
        schemes = self.config.profiled_schemes()
        prof = profile(wl.model, wl.calib, schemes=schemes, options=options)
        s = self._timed("profile_s", t0)
        self.log(
            f"profile: {len(prof.table)} (layer, scheme) rows in {s:.1f} s "
            f"({prof.info['runner']}); {prof.info['coverage_note']}"
        )
        return prof

    @cached_property
    def cost(self) -> CostModel:
        """The cost model on the study's backend (cached under ``cache_dir/cost``)."""
        wl, _ = self.workload, self.fp32_quality
        t0 = time.perf_counter()
        options = self.config.cost_options(
            cache_dir=Path(self.config.cache_dir) / "cost",
            num_threads=self.config.num_threads,
            timer=self.config.timer,
            # decoding one token reads every weight from memory once they outgrow the cache
            cold="auto" if self.config.decode is not None else False,
        )
        example = wl.example_input
        if self.config.decode is not None:  # one decoded token: latency per token
            example = {"input_ids": _token_rows(wl.test)[:1, :1]}
        cost = measure_cost(
            wl.model,
            example,
            schemes=["fp32", *self.config.schemes],
            backend=self.config.backend,
            options=options,
        )
        s = self._timed("cost_s", t0)
        self.log(
            f"cost model ({self.config.backend}): fp32 {cost.fp32_memory_bytes / 1e6:.3f} MB, "
            f"{cost.fp32_latency_ms:.3f} ms, measured in {s:.1f} s; {cost.tuning_summary()}"
        )
        return cost

    def search_arguments(self) -> dict[str, Any]:
        """:func:`~mpsearch.search.search`'s data for this study: model, profile, cost, quality, budget."""
        config, wl = self.config, self.workload
        return {
            "model": wl.model,
            "profile": self.profile,
            "cost": self.cost,
            "evaluate": wl.evaluate if config.quality == "task" else None,
            "eval_data": wl.calib,
            "budget": Budget(**config.budget) if config.budget else None,
        }

    @cached_property
    def result(self) -> SearchResult:
        """The search (the Optuna study in ``storage``, resumed up to ``n_trials``), in
        ``config.workers`` processes."""
        config = self.config
        arguments = self.search_arguments()
        t0 = time.perf_counter()
        if config.workers > 1:
            spec = WorkerSpec(f"{__name__}:worker_setup", {"config": config.to_dict()})
            options = config.search_options()
            result = run_workers(spec, workers=config.workers, options=options)
        else:
            options = config.search_options(show_progress_bar=self._show_progress)
            result = search(**arguments, options=options)
        s = self._timed("search_s", t0)
        workers = f" in {config.workers} processes" if config.workers > 1 else ""
        self.log(
            f"search: {len(result.trials)} trials, {result.n_true_evaluations} true evaluations, "
            f"{len(result.pareto)} plans on the front, {s:.1f} s{workers}"
        )
        verified = result.verified
        if verified is not None:
            ran = verified[verified["trial"].notna() & (verified["note"] == "")]
            self.log(
                f"checked {len(verified) - 1} front plans on the {verified['backend'].iloc[0]!r} "
                f"backend: {len(ran)} ran, real quality {ran['quality'].min():.4g} to "
                f"{ran['quality'].max():.4g}, measured speed-up {ran['speedup'].min():.3g}x to "
                f"{ran['speedup'].max():.3g}x"
            )
        return result

    @cached_property
    def table(self) -> ChoiceTable:
        """Per-layer error, memory and latency of every choice of this study's space (from the
        cached profile and cost model): what the baselines rank, and what
        :func:`~mpsearch.viz.load_result` takes as ``table``."""
        wl, cost = self.workload, self.cost
        space = resolve_space(self.config.space, wl.model, profile=self.profile, cost=cost)
        metric = self.config.search_options().metric
        return ChoiceTable.build(space, self.profile, cost, metric=metric)

    @cached_property
    def rounder(self) -> Rounder | None:
        """What quantizes this study's plans with their calibrated roundings (and the bias
        correction of ``rounding.options``): the profile's rounder, else one on the
        calibration data; ``None`` when the study has no ``rounding``."""
        settings = self.config.rounding_settings()
        if not settings.methods and not settings.options:
            return None
        options = settings.rounding_options()
        rounder = getattr(self.profile, "rounder", None)
        model = self.workload.model
        # the profile's rounder holds the layers of the graph it captured: a layer the model
        # never calls (T5's tied `shared` embedding) is not there, and quantize refuses it
        if (
            isinstance(rounder, Rounder)
            and rounder.options == options
            and set(rounder.layers) == set(quantizable_layers(model))
        ):
            return rounder
        return Rounder(model, self.workload.calib, options=options)

    def quantize(self, plan: PrecisionPlan, *, backend: str | Backend | None = None) -> Any:
        """``plan`` quantized on ``backend`` (default: the cost model's, its kernel picks
        included) with the study's calibrated rounding (:attr:`rounder`).

        >>> steps.quantize(steps.best)   # doctest: +SKIP
        """
        backend = self.cost.backend if backend is None else backend
        return quantize(self.workload.model, plan, backend=backend, rounder=self.rounder)

    def rounded(self, plan: PrecisionPlan) -> tuple[Any, PrecisionPlan]:
        """``(model, plan)`` for code that quantizes without a rounder (an export): a copy of
        the workload's model holding ``plan``'s calibrated rounding (and bias correction) in
        its weights (``quantize`` does not round those layers again), and ``plan`` itself (the
        model itself when the study has no ``rounding``).

        >>> model, plan = steps.rounded(steps.best)   # doctest: +SKIP
        >>> export_plan(model, plan, "out", example_input=x)   # doctest: +SKIP
        """
        model = self.workload.model
        if self.rounder is None:
            return model, plan
        return self.rounder.apply(model, plan.resolve_choices(model)), plan

    @cached_property
    def best(self) -> PrecisionPlan:
        """The best plan under the study's budget."""
        return self.result.best()

    def measure(self) -> pd.DataFrame:
        """fp32, each uniform plan and the chosen plan measured on the real backend (see
        :func:`summarize`), then on each ``deploy`` backend (:meth:`_deploy_rows`)."""
        if self._summary is None:
            plans = {"best": self.best, **_uniform_plans(self.result)}
            decoding = self._decode_timer()
            t0 = time.perf_counter()
            with threads(self.config.num_threads):
                self._summary = summarize(
                    self.workload,
                    self.cost,
                    plans,
                    backend=self.cost.backend,  # its kernel picks (autotuned) included
                    progress=self._show_progress,
                    rounder=self.rounder,
                    time_module=decoding,
                )
            s = self._timed("measure_s", t0)
            timed = "" if decoding is None else f" (ms per decoded token, {decoding.how})"
            self.log(
                f"measured {len(plans) + 1} plans on the {self.config.backend!r} backend in "
                f"{s:.1f} s{timed}"
            )
            for reason in [] if decoding is None else decoding.fallbacks:
                self.log(f"note: decoded eagerly: {reason}")
            best = self._summary[self._summary["plan"] == "best"].iloc[0]
            if best["note"].startswith("cannot run"):
                self.log(f"note: the chosen plan {best['note']}")
            elif best["note"]:
                self.log(
                    f"note: the chosen plan was {best['note']} ({best['latency_ms']:.4g} ms); "
                    "if speed matters too, add a latency budget (e.g. latency_fraction: 1.0)"
                )
            for backend in self.config.deploy_backends():
                missing = backend.unavailable_reason()
                if missing is not None:
                    self.log(f"note: deploy backend {backend.name!r} skipped: {missing}")
                    continue
                self._summary = pd.concat(
                    [self._summary, self._deploy_rows(backend, plans, decoding)],
                    ignore_index=True,
                )
        return self._summary

    def _deploy_rows(
        self, backend: Backend, plans: dict[str, PrecisionPlan], decoding: DecodeTimer | None
    ) -> pd.DataFrame:
        """:meth:`measure`'s rows of ``plans`` on the deploy backend ``backend`` (named
        ``<plan>@<backend>``; speed-ups over the fp32 model timed in the same rounds), the
        plans it cannot run left out and said in the log."""
        t0 = time.perf_counter()
        with threads(self.config.num_threads):
            df = summarize(
                self.workload,
                self.cost,
                {f"{name}@{backend.name}": plan for name, plan in plans.items()},
                backend=backend,
                progress=self._show_progress,
                rounder=self.rounder,
                time_module=decoding,
                calib=self.workload.calib if backend.needs_calib else None,
            )
        df = df[df["plan"] != "fp32"]
        cannot = df["note"].str.startswith("cannot run")
        for row in df[cannot].itertuples():
            self.log(f"note: {row.plan} left out: {' '.join(row.note.split())[:300]}")
        kept = df[~cannot]
        best = ", ".join(f"{r.plan} {r.speedup:.2f}x" for r in kept.itertuples())
        self.log(
            f"deploy backend {backend.name!r}: {len(kept)} of {len(df)} plans ran in "
            f"{time.perf_counter() - t0:.1f} s{': ' + best if best else ''}"
        )
        return kept

    def _decode_timer(self) -> DecodeTimer | None:
        """For a decoding study, how :meth:`measure` times a plan: greedy batch-1 decoding after
        the first test prompt, compiled as ``decode.compile`` says (``None``: not a decoding
        study; plans are timed on the cost model's example input)."""
        settings = self.config.decode_settings()
        if settings is None:
            return None
        prompt = _token_rows(self.workload.test)[:1, : settings.prompt_len]
        return DecodeTimer(
            prompt,
            new_tokens=settings.new_tokens,
            timer=self.config.timer,
            compile=settings.compile,
        )

    def controller(self) -> pd.DataFrame | None:
        """The controller curve (see :class:`ControllerCurve`), or ``None`` when the config asks none.

        Variants: the chosen plan, then the front's plans cheapest first, then fp32.
        """
        settings = ControllerCurve(**(self.config.controller or {}))
        if not settings.epsilons:
            return None
        if self._controller is None:
            plans = [self.best, *self.result.plans]
            t0 = time.perf_counter()
            self._controller = controller_curve(
                self.workload,
                plans,
                backend=self.cost.backend,
                settings=settings,
                num_threads=self.config.num_threads,
                timer=self.config.timer,
                progress=self._show_progress,
                rounder=self.rounder,
            )
            s = self._timed("controller_s", t0)
            self.log(f"controller curve: {len(self._controller)} methods measured in {s:.1f} s")
        return self._controller

    def speculative(self) -> pd.DataFrame | None:
        """The speculative controller's rows (see :func:`speculative_rows`), or ``None`` when
        the config has no ``decode`` section."""
        settings = self.config.decode_settings()
        if settings is None:
            return None
        if self._speculative is None:
            refs: dict[str, PrecisionPlan | str] = {
                r: ("fp32" if r == "fp32" else self.best) for r in settings.references
            }
            t0 = time.perf_counter()
            with threads(self.config.num_threads):
                self._speculative = speculative_rows(
                    self.workload, refs, settings, backend=self.cost.backend, rounder=self.rounder
                )
            s = self._timed("speculative_s", t0)
            lines = ", ".join(
                f"{r.reference}: acceptance {r.acceptance_rate:.0%}, {r.speedup:.2f}x"
                for r in self._speculative.itertuples()
            )
            self.log(f"speculative controller in {s:.1f} s: {lines}")
        return self._speculative

    def recovery(self) -> pd.DataFrame | None:
        """The recovery fine-tune of the chosen plan (or the front's plans), or ``None`` when
        the config asks none (see :class:`StudyRecovery`): one row per plan in the
        ``recovery.csv`` format of :mod:`mpsearch.report` (``RECOVERY_COLUMNS``).

        Each plan is fine-tuned by :func:`~mpsearch.recover.recover` on the calibration data,
        checkpointed under ``<output dir>/recover/`` (a killed run resumes; a finished one
        returns at once), and its quality on the test split measured before (the plan with the
        study's rounding) and after (the recovered weights, rounded to nearest) on the study's
        backend, or on ``simulate`` where that backend cannot run the plan (said in ``note``).
        The recovered weights (``<plan>.pt``, a state dict) and plan (``<plan>.plan.json``) are
        written beside the checkpoint, atomically.
        """
        settings = self.config.recover_settings()
        if settings is None:
            return None
        if self._recovery is None:
            if settings.plans == "best":
                plans = {"best": self.best}
            else:
                pareto = self.result.pareto
                plans = {
                    f"front:{t}": p for t, p in zip(pareto["trial"], pareto["plan"], strict=True)
                }
            t0 = time.perf_counter()
            rows = [self._recover_plan(name, plan, settings) for name, plan in plans.items()]
            self._recovery = pd.DataFrame(rows, columns=list(RECOVERY_COLUMNS))
            s = self._timed("recover_s", t0)
            gains = ", ".join(
                f"{r['plan']} {r['quality_before']:.4g} -> {r['quality_after']:.4g}" for r in rows
            )
            self.log(
                f"recovery ({settings.steps} steps) of {len(rows)} plan(s) in {s:.1f} s: {gains}"
            )
        return self._recovery

    def _recover_plan(
        self, name: str, plan: PrecisionPlan, settings: StudyRecovery
    ) -> dict[str, Any]:
        """One row of :meth:`recovery`: ``plan`` fine-tuned, measured and its weights stored."""
        wl = self.workload
        folder = self.config.out_dir / "recover"
        folder.mkdir(parents=True, exist_ok=True)
        stem = name.replace(":", "-")
        key = json.dumps([plan.to_json(), asdict(settings)], sort_keys=True, default=str)
        checkpoint = folder / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.ckpt"
        t0 = time.perf_counter()
        res = recover(
            wl.model,
            plan,
            wl.calib,
            steps=settings.steps,
            lr=settings.lr,
            options=settings.recover_options(),
            checkpoint=checkpoint,
            progress=self._show_progress,
            rounder=self.rounder,
        )
        seconds = time.perf_counter() - t0
        for stale in folder.glob(f"{stem}-*.ckpt"):  # written for another plan or settings
            if stale != checkpoint:
                stale.unlink(missing_ok=True)
        with atomic_path(folder / f"{stem}.pt") as tmp:
            torch.save(res.model.state_dict(), tmp)
        res.plan.save(folder / f"{stem}.plan.json")
        before, after, backend, note = self._quality_before_after(plan, res)
        if res.resumed_from is not None:
            note = "; ".join(filter(None, [note, f"resumed from step {res.resumed_from}"]))
        return {
            "plan": name,
            "rounding": ", ".join(plan_roundings(plan, wl.model)) or DEFAULT_ROUNDING,
            "backend": backend,
            "quality_before": before,
            "quality_after": after,
            "loss_before": res.loss_before,
            "loss_after": res.loss_after,
            "steps": res.steps_done,
            "best_step": res.best_step,
            "seconds": seconds,
            "note": note,
        }

    def _quality_before_after(
        self, plan: PrecisionPlan, res: RecoveryResult
    ) -> tuple[float, float, str, str]:
        """Test-split quality of ``plan`` (the study's rounding) and of the recovered model
        (``res``), on the study's backend or, where it cannot run the plan, on ``simulate``."""
        wl = self.workload
        backend: str | Backend = self.cost.backend
        note = ""
        try:
            before_model = self.quantize(plan, backend=backend)
        except (ValueError, TypeError, RuntimeError) as exc:
            why = exception_line(exc)
            note = f"simulated: the {self.config.backend!r} backend cannot run it ({why})"
            backend = "simulate"
            before_model = self.quantize(plan, backend=backend)
        before = float(wl.evaluate(before_model))
        after = float(wl.evaluate(quantize(res.model, res.plan, backend=backend)))
        name = backend if isinstance(backend, str) else backend.name
        return before, after, name, note

    def run(self) -> StudyOutcome:
        """Every step: search, measure, controller curve, recovery; what was computed is saved
        even when a step fails (e.g. no plan meets the budget)."""
        try:
            summary = self.measure()
            self.controller()
            self.speculative()
            self.recovery()
        finally:
            record = self.save()
        return StudyOutcome(
            self.config,
            self.workload,
            self.profile,
            self.cost,
            self.result,
            self.best,
            summary,
            self.timings,
            self.config.out_dir / FILES["best"],
            record,
        )

    def record(self) -> StudyRecord:
        """What has been computed so far, as a :class:`~mpsearch.report.StudyRecord`."""
        done = self.__dict__
        info: dict[str, Any] = {
            "workload": self.config.workload,
            "config": self.config.to_dict(),
            "timings": dict(self.timings),
        }
        if "fp32_quality" in done:
            info["fp32_quality"] = self.fp32_quality
        rec = StudyRecord(name=str(self.config.study_name), info=info)
        if "profile" in done:
            rec.profile = self.profile.table
            rec.info["coverage"] = self.profile.info["coverage_note"]
        if "cost" in done:
            info["fp32_memory_mb"] = self.cost.fp32_memory_bytes / 1e6
            info["fp32_latency_ms"] = self.cost.fp32_latency_ms
            rec.cost = self.cost.table
            rec.tuning = self.cost.tuning.assign(device=self.cost.meta.get("device"))
        if "result" in done:
            res = self.result
            info["fp32_memory_mb"] = res.fp32_memory_mb
            info["fp32_latency_ms"] = res.fp32_latency_ms
            info["limits"] = {"memory_mb": res.limits[0], "latency_ms": res.limits[1]}
            rec.trials, rec.pareto = res.trials, res.pareto
            try:
                rec.best = self.best
            except ValueError:
                rec.best = None
        rec.summary = self._summary
        rec.controller = self._controller
        rec.recovery = self._recovery
        rec.speculative = self._speculative
        decode = self.config.decode_settings()
        if decode is not None:
            info["decode"] = asdict(decode)
        methods = self.config.rounding_settings().methods
        if methods:
            info["rounding"] = {
                "methods": methods,
                "options": asdict(self.config.rounding_settings().rounding_options()),
            }
        return rec

    def save(self) -> StudyRecord:
        """Write what has been computed to the output directory; return the record written.

        ``summary.csv``, ``controller.csv`` and ``recovery.csv`` measured for another chosen plan (an earlier
        run) are removed when the chosen plan changes or no plan meets the budget any more, so
        that the report never mixes two searches.
        """
        rec = self.record()
        out = self.config.out_dir
        old_plan, old_info = out / FILES["best"], out / FILES["info"]
        if old_plan.exists() and (
            rec.best is None or PrecisionPlan.load(old_plan).rules != rec.best.rules
        ):
            fresh_parts = (
                ("summary", rec.summary),
                ("controller", rec.controller),
                ("recovery", rec.recovery),
                ("speculative", rec.speculative),
            )
            for key, fresh in fresh_parts:
                if fresh is None:
                    (out / FILES[key]).unlink(missing_ok=True)
        if old_info.exists():
            try:
                previous = json.loads(old_info.read_text())
            except ValueError:
                previous = {}
            previous.pop("name", None)
            timings = {**previous.get("timings", {}), **rec.info["timings"]}
            rec.info = {**previous, **rec.info, "timings": timings}
        rec.save(out)
        return rec


def run_study(
    config: StudyConfig, *, log: Callable[[str], None] | None = print, progress: bool | None = None
) -> StudyOutcome:
    """Run (or resume) the study ``config`` describes, summarise it and save its outputs.

    The summary compares, measured in this run on the real backend: fp32, each uniform plan,
    and the best plan under the budget (quality on the workload's test split, exact memory,
    median end-to-end latency), with ratios to fp32. Everything is written to
    ``config.out_dir`` (see :class:`StudySteps`).

    >>> outcome = run_study(StudyConfig.from_yaml("studies/digits.yaml"))   # doctest: +SKIP
    >>> outcome.summary[["plan", "speedup"]]                                 # doctest: +SKIP
    """
    return StudySteps(config, log=log, progress=progress).run()


def _token_rows(batches: list[Any]) -> torch.Tensor:
    """The ``input_ids`` of a causal LM workload's batches, one row per window."""
    return torch.cat([b["input_ids"] for b in batches])


def _uniform_plans(result: SearchResult) -> dict[str, PrecisionPlan]:
    df = result.trials
    uniform = df[df["origin"].str.startswith("uniform:") & (df["state"] == "COMPLETE")]
    return {
        row.origin: PrecisionPlan.from_assignment(row.assignment) for row in uniform.itertuples()
    }


def summarize(
    wl: Workload,
    cost: CostModel,
    plans: dict[str, PrecisionPlan],
    *,
    backend: str | Backend,
    progress: bool = False,
    rounds: int = 3,
    rounder: Rounder | None = None,
    time_module: Callable[[nn.Module], float] | None = None,
    calib: Any = None,
) -> pd.DataFrame:
    """Quality, exact memory and measured latency of fp32 and each plan, with ratios to fp32,
    and a ``note`` on each plan measured more than 5% slower than fp32 or that cannot run on
    ``backend`` (why).

    ``fp32`` is the user's model as it is. Quality and latency are
    :func:`~mpsearch.search._realcheck.measure_plans`' (what the search's check of its front
    runs too): each plan quantized once, latencies the median over ``rounds`` rounds that time
    every model in turn, each round a median of the cost model's repeats. ``rounder`` (a
    :class:`~mpsearch.rounding.Rounder` of ``wl.model``) rounds the plans' calibrated choices
    (``"w4a16+gptq"``) and applies its bias correction. ``time_module`` times one model
    (``None``: ``cost.time_module``, the cost model's example input; a decoding study passes a
    :class:`~mpsearch.cost._decode.DecodeTimer`: ms per decoded token). ``calib``: the
    calibration batches of a backend that needs them (``cpu-pt2e``).

    >>> summarize(wl, cost, {"w8a8": PrecisionPlan.uniform("w8a8")}, backend="cpu")  # doctest: +SKIP
    """
    df = measure_plans(
        wl.model,
        plans,
        backend=backend,
        evaluate=wl.evaluate,
        time_module=time_module or cost.time_module,
        rounds=rounds,
        progress=progress,
        rounder=rounder,
        calib=calib,
    )
    memory = [cost.fp32_memory_bytes, *(cost.memory_bytes(plan) for plan in plans.values())]
    df.insert(2, "memory_mb", [m / 1e6 for m in memory])
    df["memory_ratio"] = df["memory_mb"] / df.loc[0, "memory_mb"]
    df["quality_drop"] = df.loc[0, "quality"] - df["quality"]
    df["note"] = [
        note
        or (
            f"measured {1 / speedup:.2f}x slower than fp32"
            if speedup * SLOWER_THAN_FP32 < 1
            else ""
        )
        for note, speedup in zip(df["note"], df["speedup"], strict=True)
    ]
    columns = ["plan", "quality", "memory_mb", "latency_ms", "memory_ratio", "speedup"]
    return df[[*columns, "quality_drop", "note"]]
