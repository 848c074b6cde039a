"""``SensitivityProfile``: the long-format table of per-(layer, scheme) errors, saved and loaded."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mpsearch._validation import invalid, unknown

COLUMNS: tuple[str, ...] = (
    "layer",
    "scheme",
    "layer_type",
    "params",
    "bits_per_weight",
    "weight_bytes",
    "mse",
    "sqnr_db",
    "e2e",
    "task_drop",
    "hessian",
    "status",
    "reason",
    "runner",
)
METRICS: tuple[str, ...] = ("mse", "sqnr_db", "e2e", "task_drop", "hessian")
ADDITIVE: tuple[str, ...] = ("mse", "e2e", "task_drop", "hessian")
_FLOAT_COLUMNS = ("bits_per_weight", "weight_bytes", *METRICS)
_META_KEY = b"mpsearch.profile"


@dataclass
class SensitivityProfile:
    """Per-(layer, scheme) sensitivity of a model: one row per pair in :attr:`table`.

    Columns: ``layer``, ``scheme``, ``layer_type``, ``params`` (weight elements),
    ``bits_per_weight`` and ``weight_bytes`` (exact, scales included), ``mse`` and ``sqnr_db``
    (the layer's own output vs fp32), ``e2e`` (final-output error, metric in
    :attr:`e2e_metric`), ``task_drop`` (``evaluate(fp32) - evaluate(quantized)``, NaN without
    ``evaluate``), ``hessian`` (HAWQ-V2 score, NaN without ``loss_fn``), ``status``
    (``"ok"``/``"skipped"``), ``reason`` and ``runner`` (what measured the row: ``graph:fx``,
    ``graph:fx(concrete_args)``, ``graph:export`` or ``hooks``; empty when skipped). A row's
    ``scheme`` is its choice: ``"w4a16+gptq"`` for a calibrated rounding, whose rounded weights
    :attr:`rounder` (a :class:`~mpsearch.rounding.Rounder` of the model on the calibration
    data; ``None`` without such rows, and not saved) gives whoever quantizes a plan of them.

    >>> prof = SensitivityProfile(pd.DataFrame({"layer": ["fc"], "scheme": ["w8a8"], "e2e": [0.1]}),
    ...                           schemes=["w8a8"], layers=["fc"], e2e_metric="kl")
    >>> prof.error("fc", "w8a8")
    0.1
    """

    table: pd.DataFrame
    schemes: list[str]
    layers: list[str]
    e2e_metric: str
    baseline_quality: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    rounder: Any = field(default=None, repr=False, compare=False)

    # -- queries ----------------------------------------------------------------------------
    def _check_metric(self, metric: str) -> None:
        if metric not in METRICS or metric not in self.table.columns:
            raise unknown("metric", metric, [m for m in METRICS if m in self.table.columns])

    def pivot(self, metric: str = "e2e") -> pd.DataFrame:
        """A ``layers x schemes`` table of ``metric`` (rows and columns in profile order).

        >>> prof.pivot("e2e").loc["fc", "w8a8"]  # doctest: +SKIP
        0.1
        """
        self._check_metric(metric)
        wide = self.table.pivot(index="layer", columns="scheme", values=metric)
        return wide.reindex(index=self.layers, columns=self.schemes)

    def error(self, layer: str, scheme: str, metric: str = "e2e") -> float:
        """The ``metric`` value of one (layer, scheme) row; ``fp32`` is 0 for additive metrics."""
        self._check_metric(metric)
        if layer not in self.layers:
            raise unknown("layer", layer, self.layers)
        if scheme == "fp32" and "fp32" not in self.schemes and metric in ADDITIVE:
            return 0.0
        if scheme not in self.schemes:
            raise unknown("scheme", scheme, self.schemes)
        rows = self.table[(self.table["layer"] == layer) & (self.table["scheme"] == scheme)]
        if "status" in rows.columns and (rows["status"] == "skipped").any():
            reason = rows["reason"].iloc[0]
            raise ValueError(f"Layer {layer!r} was skipped for scheme {scheme!r}: {reason}")
        return float(rows[metric].iloc[0])

    def predict(self, assignment: Mapping[str, str], metric: str = "e2e") -> float:
        """Additive proxy of a plan's error: the sum of its layers' single-layer errors.

        Layers in ``fp32`` (or absent from ``assignment``) count 0. ``sqnr_db`` is not additive
        and is refused.

        >>> prof.predict({"fc": "w8a8"})  # doctest: +SKIP
        0.1
        """
        if metric not in ADDITIVE:
            raise invalid("metric", metric, f"an additive metric, one of {list(ADDITIVE)}")
        if not isinstance(assignment, Mapping):
            raise invalid("assignment", assignment, "a {layer: scheme} mapping")
        total = 0.0
        for layer, scheme in assignment.items():
            if scheme == "fp32":
                continue
            total += self.error(layer, scheme, metric)
        return total

    def plot(self, metric: str = "e2e", ax: Any = None) -> Any:
        """A heat map of ``metric`` (layers x schemes) with matplotlib (imported here, lazily)."""
        from mpsearch.profile._plotdata import plot_heatmap

        return plot_heatmap(self, metric, ax=ax)

    # -- persistence ------------------------------------------------------------------------
    def _attributes(self) -> dict[str, Any]:
        return {
            "schemes": list(self.schemes),
            "layers": list(self.layers),
            "e2e_metric": self.e2e_metric,
            "baseline_quality": self.baseline_quality,
            "info": self.info,
            "dtypes": {c: str(t) for c, t in self.table.dtypes.items()},
        }

    @classmethod
    def _from_attributes(cls, table: pd.DataFrame, attrs: dict[str, Any]) -> SensitivityProfile:
        for column, dtype in attrs.get("dtypes", {}).items():
            if column in table.columns and str(table[column].dtype) != dtype:
                table[column] = table[column].astype(dtype)
        baseline = attrs.get("baseline_quality")
        return cls(
            table=table,
            schemes=list(attrs["schemes"]),
            layers=list(attrs["layers"]),
            e2e_metric=attrs["e2e_metric"],
            baseline_quality=None if baseline is None else float(baseline),
            info=dict(attrs.get("info", {})),
        )

    def to_parquet(self, path: str | Path) -> None:
        """Write the table with its attributes in the parquet schema metadata."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = pa.Table.from_pandas(self.table, preserve_index=False)
        meta = dict(arrow.schema.metadata or {})
        meta[_META_KEY] = json.dumps(self._attributes(), allow_nan=True).encode()
        pq.write_table(arrow.replace_schema_metadata(meta), str(path))

    @classmethod
    def read_parquet(cls, path: str | Path) -> SensitivityProfile:
        """Read a profile written by :meth:`to_parquet`."""
        import pyarrow.parquet as pq

        arrow = pq.read_table(str(path))
        meta = arrow.schema.metadata or {}
        if _META_KEY not in meta:
            raise ValueError(f"{path} is not a SensitivityProfile parquet file (no metadata).")
        attrs = json.loads(meta[_META_KEY])
        return cls._from_attributes(arrow.to_pandas(), attrs)

    def to_csv(self, path: str | Path) -> None:
        """Write the table as CSV and its attributes to ``<path>.json`` beside it."""
        path = Path(path)
        self.table.to_csv(path, index=False, na_rep="NaN")
        Path(str(path) + ".json").write_text(json.dumps(self._attributes(), indent=1))

    @classmethod
    def read_csv(cls, path: str | Path) -> SensitivityProfile:
        """Read a profile written by :meth:`to_csv` (needs its ``.json`` sidecar)."""
        path = Path(path)
        sidecar = Path(str(path) + ".json")
        if not sidecar.exists():
            raise ValueError(
                f"{path} has no attribute sidecar {sidecar.name}; write it with to_csv."
            )
        attrs = json.loads(sidecar.read_text())
        table = pd.read_csv(path, keep_default_na=False, na_values=["NaN"])
        for column in _FLOAT_COLUMNS:
            if column in table.columns:
                table[column] = table[column].astype("float64")
        return cls._from_attributes(table, attrs)

    def __repr__(self) -> str:
        skipped = int((self.table.get("status") == "skipped").sum()) if len(self.table) else 0
        return (
            f"SensitivityProfile({len(self.layers)} layers x {len(self.schemes)} schemes, "
            f"e2e_metric={self.e2e_metric!r}, skipped={skipped})"
        )
