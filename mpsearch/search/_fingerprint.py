"""A study's fingerprint: what it was made for, so that resuming it with another setup is refused.

The fingerprint hashes, part by part, the model's weights, the search space, the profile's
errors, the cost model's figures, the schemes' definitions, the objectives, the budget and the
error metric. It is stored in the study's user attributes; a resumed study whose parts differ
is refused before any trial runs, naming the parts that changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import optuna
import torch
from torch import nn

from mpsearch.schemes import get_scheme
from mpsearch.search._space import ResolvedSpace
from mpsearch.search._table import ChoiceTable

FINGERPRINT_ATTR = "mpsearch_fingerprint"
PARTS_ATTR = "mpsearch_fingerprint_parts"
SUMMARY_ATTR = "mpsearch_space"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()


def _model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(
            tensor.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes()
        )
    return h.hexdigest()


def fingerprint_parts(
    model: nn.Module,
    space: ResolvedSpace,
    table: ChoiceTable,
    objectives: Sequence[str],
    limits: Any,
    metric: str,
) -> dict[str, str]:
    """``{part: sha256}`` for model, space, profile, cost, schemes, objectives, budget, metric."""
    names = sorted({s for c in space.choices.values() for s in c} | set(space.pinned.values()))
    schemes = {}
    for name in names:
        try:
            schemes[name] = get_scheme(name).to_dict()
        except (KeyError, ValueError):
            schemes[name] = name
    return {
        "model weights": _model_digest(model),
        # followers only where there are some: the studies made before them resume
        "search space": _digest(
            [space.params, space.choices, space.pinned, *[space.followers] * bool(space.followers)]
        ),
        "profile": _digest(table.error),
        "cost": _digest([table.memory, table.latency, table.base_memory, table.base_latency]),
        "schemes": _digest(schemes),
        "objectives": _digest(list(objectives)),
        "budget": _digest(list(limits)),
        "metric": _digest(metric),
    }


def fingerprint(parts: dict[str, str]) -> str:
    """One hash of all parts."""
    return _digest(parts)


def check_fingerprint(
    study: optuna.Study,
    parts: dict[str, str],
    space: ResolvedSpace,
    objectives: Sequence[str],
    limits: Any,
) -> None:
    """Record the fingerprint on a new study; refuse a resumed one made for another setup."""
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    whole = fingerprint(parts)
    if stored is None:
        study.set_user_attr(FINGERPRINT_ATTR, whole)
        study.set_user_attr(PARTS_ATTR, parts)
        study.set_user_attr(
            SUMMARY_ATTR,
            {
                "params": space.choices,
                "pinned": space.pinned,
                "followers": space.followers,
                "objectives": list(objectives),
                "limits": list(limits),
            },
        )
        return
    if stored == whole:
        return
    before = study.user_attrs.get(PARTS_ATTR, {})
    changed = [k for k, v in parts.items() if before.get(k) != v] or ["model, space or budget"]
    raise ValueError(
        f"The study {study.study_name!r} was made for another setup (changed: {', '.join(changed)}); "
        "resuming it would mix incomparable trials. Use a new study_name, or restore the original "
        "model, profile, cost, schemes, space and budget to resume it."
    )
