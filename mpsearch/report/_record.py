"""``StudyRecord``: what a study wrote to its output directory, saved and loaded in one place.

The files of a study output directory (``studies/out/<study>/``), all optional except that a
report needs at least ``pareto.csv`` or ``summary.csv``:

============== =================================================================================
file           content
============== =================================================================================
study.json     the study: name, workload, config, fp32 quality / memory / latency, budget
               limits, timings (JSON object)
profile.csv    the sensitivity profile's table: one row per (layer, scheme)
cost.csv       the cost model's table: layer, scheme, memory_bytes, latency_ms, supported, reason,
               kernel (the implementation that runs it)
tuning.csv     every implementation timed by the autotuner: layer, scheme, kernel, latency_ms,
               chosen, error, device (the CPU or GPU it was timed on)
trials.csv     one row per finished trial (the search result's ``trials``; ``assignment`` as
               JSON ``{layer: scheme}``)
pareto.csv     the Pareto front (trial, quality, memory_mb, latency_ms, origin, plan as JSON)
best_plan.json the chosen plan (a :class:`~mpsearch.plan.PrecisionPlan` file)
summary.csv    plans measured on the real backend: plan, quality, memory_mb, latency_ms,
               memory_ratio, speedup, quality_drop (first row ``fp32``)
controller.csv the run-time controller's curve (see :data:`CONTROLLER_COLUMNS`): one row per
               method (``static:<variant>`` or ``ctrl:<scorer>:<eps>``) with ``latency_ms``
               (per input), ``disagreement`` (rate of answers differing from fp32's) and
               ``accuracy`` (NaN where unknown); optional ``epsilon`` and ``note`` columns
recovery.csv   the recovery fine-tune (config key ``recover``): one row per plan with ``plan``,
               ``rounding``, ``backend``, ``quality_before``, ``quality_after``,
               ``loss_before``, ``loss_after``, ``steps``, ``best_step``, ``seconds``, ``note``
               (the recovered weights and plans are under ``recover/``)
speculative.csv  a causal LM study's speculative controller (config key ``decode``): one row
               per reference with ``reference``, ``draft``, ``k``, ``acceptance_rate``,
               ``tokens_per_s``, ``reference_tokens_per_s``, ``speedup``, ``exact``
============== =================================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mpsearch._io import atomic_path, write_text_atomic
from mpsearch.plan import PrecisionPlan

CONTROLLER_COLUMNS: tuple[str, ...] = ("method", "latency_ms", "disagreement", "accuracy")
"""Required columns of ``controller.csv`` (``accuracy`` may be NaN)."""

RECOVERY_COLUMNS: tuple[str, ...] = (
    "plan",
    "rounding",
    "backend",
    "quality_before",
    "quality_after",
    "loss_before",
    "loss_after",
    "steps",
    "best_step",
    "seconds",
    "note",
)
"""Columns of ``recovery.csv``: one row per plan fine-tuned by the study's ``recover``."""

FILES: dict[str, str] = {
    "info": "study.json",
    "profile": "profile.csv",
    "cost": "cost.csv",
    "tuning": "tuning.csv",
    "trials": "trials.csv",
    "pareto": "pareto.csv",
    "best": "best_plan.json",
    "summary": "summary.csv",
    "controller": "controller.csv",
    "recovery": "recovery.csv",
    "speculative": "speculative.csv",
}


def check_controller_frame(frame: Any, *, source: str = "controller curve") -> pd.DataFrame:
    """Return ``frame`` as a DataFrame with the :data:`CONTROLLER_COLUMNS`, or raise naming what is missing.

    >>> check_controller_frame(pd.DataFrame({"method": ["static:fp32"], "latency_ms": [1.0],
    ...                                      "disagreement": [0.0], "accuracy": [0.99]})).shape
    (1, 4)
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"The {source} must be a pandas DataFrame. Got {type(frame).__name__}.")
    missing = [c for c in CONTROLLER_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"The {source} lacks the column(s) {missing}; it needs {list(CONTROLLER_COLUMNS)} "
            f"(got {list(frame.columns)})."
        )
    if not len(frame):
        raise ValueError(f"The {source} has no rows.")
    out = frame.copy()
    out["method"] = out["method"].astype(str)
    for column in ("latency_ms", "disagreement", "accuracy"):
        out[column] = pd.to_numeric(out[column], errors="coerce")
    return out


@dataclass
class StudyRecord:
    """The saved results of one study (every part optional), as written to its output directory.

    ``pareto`` holds :class:`PrecisionPlan` objects in its ``plan`` column; ``trials`` holds
    ``{layer: scheme}`` dicts in ``assignment``. :meth:`save` and :meth:`load` are the only
    code that knows the file names (see the module docstring).

    >>> rec = StudyRecord(name="demo", best=PrecisionPlan(default="w8a8"))
    >>> StudyRecord.load(rec.save(tmp_dir)).best == rec.best   # doctest: +SKIP
    True
    """

    name: str
    info: dict[str, Any] = field(default_factory=dict)
    profile: pd.DataFrame | None = None
    cost: pd.DataFrame | None = None
    tuning: pd.DataFrame | None = None
    trials: pd.DataFrame | None = None
    pareto: pd.DataFrame | None = None
    best: PrecisionPlan | None = None
    summary: pd.DataFrame | None = None
    controller: pd.DataFrame | None = None
    recovery: pd.DataFrame | None = None
    speculative: pd.DataFrame | None = None
    out_dir: Path | None = None

    # ------------------------------------------------------------------ persistence
    def save(self, out_dir: str | Path) -> Path:
        """Write every part that is present to ``out_dir`` (created if needed); return it."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.info or not (out / FILES["info"]).exists():
            info = {"name": self.name, **self.info}
            write_text_atomic(out / FILES["info"], json.dumps(_jsonable(info), indent=2) + "\n")
        for part in ("profile", "cost", "tuning", "summary", "recovery", "speculative"):
            frame = getattr(self, part)
            if frame is not None:
                _write_csv(frame, out / FILES[part])
        if self.trials is not None:
            trials = self.trials.copy()
            if "assignment" in trials.columns:
                trials["assignment"] = [_dumps(a) for a in trials["assignment"]]
            _write_csv(trials, out / FILES["trials"])
        if self.pareto is not None:
            pareto = self.pareto.copy()
            pareto["plan"] = [
                _dumps(p.rules if isinstance(p, PrecisionPlan) else p) for p in pareto["plan"]
            ]
            _write_csv(pareto, out / FILES["pareto"])
        if self.best is not None:
            self.best.save(out / FILES["best"])
        elif self.pareto is not None:  # a search ran and no plan meets the budget
            (out / FILES["best"]).unlink(missing_ok=True)
        if self.controller is not None:
            _write_csv(check_controller_frame(self.controller), out / FILES["controller"])
        self.out_dir = out
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> StudyRecord:
        """Read whatever a study wrote to ``out_dir``; a missing directory is refused."""
        out = Path(out_dir)
        if not out.is_dir():
            raise ValueError(
                f"No study output directory at {str(out)!r}: run `mpsearch run` (or `mpsearch "
                "search`) on the study's config first, or name an existing directory."
            )
        path = out / FILES["info"]
        info: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        name = str(info.pop("name", out.name))

        def frame(part: str) -> pd.DataFrame | None:
            p = out / FILES[part]
            # names stay text: layer "0" of an nn.Sequential must not become the integer 0
            if not p.exists():
                return None
            df = pd.read_csv(p, dtype=_TEXT_COLUMNS)
            return df.fillna({c: "" for c in _TEXT_COLUMNS if c in df.columns})

        trials = frame("trials")
        if trials is not None and "assignment" in trials.columns:
            trials["assignment"] = [_loads(a) for a in trials["assignment"]]
            trials["reason"] = trials.get("reason", pd.Series(dtype=str)).fillna("")
            trials["quality_source"] = trials.get(
                "quality_source", pd.Series("", index=trials.index)
            ).fillna("")
        pareto = frame("pareto")
        if pareto is not None:
            pareto["plan"] = [
                PrecisionPlan.from_assignment(
                    _loads(p),
                    metadata={
                        "trial": int(r.trial),
                        "quality": float(r.quality),
                        "memory_mb": float(r.memory_mb),
                        "latency_ms": float(r.latency_ms),
                    },
                )
                for p, r in zip(pareto["plan"], pareto.itertuples(index=False), strict=True)
            ]
        best_path = out / FILES["best"]
        controller = frame("controller")
        if controller is not None:
            controller = check_controller_frame(controller, source=str(out / FILES["controller"]))
        return cls(
            name=name,
            info=info,
            profile=frame("profile"),
            cost=frame("cost"),
            tuning=frame("tuning"),
            trials=trials,
            pareto=pareto,
            best=PrecisionPlan.load(best_path) if best_path.exists() else None,
            summary=frame("summary"),
            controller=controller,
            recovery=frame("recovery"),
            speculative=frame("speculative"),
            out_dir=out,
        )

    @property
    def layers(self) -> list[str]:
        """Layer names in model order (from the profile, else the cost table, else the plans)."""
        for frame in (self.profile, self.cost):
            if frame is not None and "layer" in frame.columns:
                return list(dict.fromkeys(frame["layer"]))
        if self.pareto is not None and len(self.pareto):
            return list(self.pareto["plan"].iloc[0].rules)
        return list(self.best.rules) if self.best is not None else []


_TEXT_COLUMNS = {
    c: str
    for c in (
        "layer",
        "scheme",
        "plan",
        "origin",
        "method",
        "reason",
        "note",
        "real_note",
        "runner",
        "rounding",
        "backend",
    )
}


def _dumps(value: Any) -> str:
    return json.dumps(value if isinstance(value, dict) else {}, sort_keys=False)


def _loads(text: Any) -> dict[str, str]:
    if not isinstance(text, str) or not text:
        return {}
    return dict(json.loads(text))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
