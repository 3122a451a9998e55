"""Clinical covariates: a manifest's extra columns declared as numeric (with a unit) or categorical inputs, checked,
fitted on the training split and encoded as a feature vector beside the image.

Declared as ``name:kind[:unit]`` items separated by commas — ``age:numeric:years,sex:categorical`` — they are read
from the manifest's columns of those names. A missing value is an error naming the row and column, unless missing
values are imputed (``missing="impute"``): numeric values by the training mean, categories as a category of their
own, each covariate with a 0/1 missing indicator so the network can tell an imputed value from a measured one.
The fitted schema (categories, means and spreads from the training split) is plain data saved with the run, so
prediction and serving encode exactly as training did.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lepton.errors import ConfigError, DataError

KINDS = ("numeric", "categorical")
MISSING = ("error", "impute")
#: Text read as a missing value.
MISSING_TEXT = frozenset({"", "na", "n/a", "nan", "none", "null", "?"})
#: Columns a manifest gives that are never covariates.
RESERVED = frozenset({"path", "label", "patient_id", "split", "series_uid"})
MAX_COVARIATES = 64
MAX_CATEGORIES = 64


@dataclass
class Covariate:
    """One declared covariate; ``categories``, ``mean`` and ``std`` are filled from the training split."""

    name: str
    kind: str
    unit: str = ""
    categories: list[str] = field(default_factory=list)
    mean: float = 0.0
    std: float = 1.0


@dataclass
class CovariateSchema:
    """The declared covariates, how missing values are handled, and (once fitted) how each is encoded."""

    columns: list[Covariate]
    missing: str = "error"
    fitted: bool = False

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def width(self) -> int:
        """The length of the encoded feature vector: one value per numeric covariate, one per category, and with
        imputation a missing indicator per covariate (plus an "unseen" slot per categorical one)."""
        n = 0
        for c in self.columns:
            n += 1 if c.kind == "numeric" else len(c.categories) + (1 if self.missing == "impute" else 0)
        return n + (len(self.columns) if self.missing == "impute" else 0)

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [asdict(c) for c in self.columns], "missing": self.missing, "fitted": self.fitted}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CovariateSchema:
        return cls([Covariate(**c) for c in values["columns"]], values.get("missing", "error"),
                   bool(values.get("fitted", False)))

    def describe(self) -> list[dict[str, Any]]:
        """What a client sends: each covariate's name, kind, unit and (categorical) accepted values."""
        return [{"name": c.name, "kind": c.kind, **({"unit": c.unit} if c.unit else {}),
                 **({"categories": c.categories} if c.kind == "categorical" else {}),
                 "required": self.missing == "error"} for c in self.columns]


def parse_covariates(text: str | Sequence[str] | None, missing: str = "error") -> CovariateSchema | None:
    """The schema a ``name:kind[:unit],…`` declaration describes; None for none. Bad syntax, an unknown kind, a
    reserved or repeated name are ConfigErrors naming the item."""
    if missing not in MISSING:
        raise ConfigError(f"covariate_missing={missing!r} is not one of {', '.join(MISSING)}")
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if len(items) > MAX_COVARIATES:
        raise ConfigError(f"covariates: {len(items)} declared; at most {MAX_COVARIATES}")
    columns, seen = [], set()
    for item in items:
        parts = [p.strip() for p in item.split(":")]
        if len(parts) < 2 or len(parts) > 3 or not parts[0]:
            raise ConfigError(f"covariates: {item!r} is not NAME:KIND[:UNIT] (e.g. age:numeric:years,sex:categorical)")
        name, kind = parts[0], parts[1].lower()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\- ]{0,63}", name):
            raise ConfigError(f"covariates: {name!r} is not a column name (letters, digits, _ . - and spaces)")
        if kind not in KINDS:
            raise ConfigError(f"covariates: {item!r} has kind {kind!r}; use one of {', '.join(KINDS)}")
        if name in RESERVED:
            raise ConfigError(f"covariates: {name!r} is a manifest column of its own, not a covariate")
        if name in seen:
            raise ConfigError(f"covariates: {name!r} is declared twice")
        if kind == "categorical" and len(parts) == 3:
            raise ConfigError(f"covariates: {item!r}: a categorical covariate has no unit")
        seen.add(name)
        columns.append(Covariate(name, kind, parts[2] if len(parts) == 3 else ""))
    return CovariateSchema(columns, missing)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_TEXT


def check_table(schema: CovariateSchema, header: Sequence[str], rows: Sequence[Mapping[str, Any]],
                source: str, first_line: int = 2) -> list[dict[str, Any]]:
    """The covariates of each manifest row, checked: a declared column absent from the header, a numeric value that
    is not a finite number, and (unless imputed) a missing value are DataErrors naming the column, the line and the
    fix. Values come back as floats (numeric), stripped strings (categorical) or None (missing)."""
    absent = [n for n in schema.names if n not in header]
    if absent:
        extra = [h for h in header if h not in RESERVED]
        raise DataError(f"{source}: covariate column(s) {', '.join(absent)} not in the manifest; its other columns "
                        f"are {', '.join(extra) or 'none'}")
    out, problems = [], []
    for line, row in enumerate(rows, start=first_line):
        values: dict[str, Any] = {}
        for c in schema.columns:
            raw = row.get(c.name)
            if _is_missing(raw):
                if schema.missing == "error":
                    problems.append(f"line {line}: {c.name} is missing (fill it, or impute missing values with "
                                    "covariate_missing=impute)")
                values[c.name] = None
                continue
            if c.kind == "numeric":
                try:
                    number = float(raw)
                except (TypeError, ValueError):
                    problems.append(f"line {line}: {c.name} is {raw!r}, not a number (declared numeric"
                                    f"{' in ' + c.unit if c.unit else ''}; declare it categorical if it is a category)")
                    continue
                if not math.isfinite(number):
                    problems.append(f"line {line}: {c.name} is {raw!r}, not a finite number")
                    continue
                values[c.name] = number
            else:
                values[c.name] = str(raw).strip()
        out.append(values)
    if problems:
        raise DataError(f"{source}: invalid covariates:\n  " + "\n  ".join(problems[:50]) +
                        (f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""))
    return out


def check_values(schema: CovariateSchema, values: Mapping[str, Any] | None, where: str = "covariates") -> dict:
    """One request's covariates (a JSON object by name) checked against a fitted schema: an unknown name, a value of
    the wrong type, an unseen category or (unless imputed) a missing one is a DataError naming it."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(schema.names))
    if unknown:
        raise DataError(f"{where}: unknown covariate(s) {', '.join(unknown)}; this model takes "
                        f"{', '.join(schema.names)}")
    checked = check_table(schema, schema.names, [{k: (None if v is None else (
        v if isinstance(v, str) else _number_text(v, k, where))) for k, v in values.items()}], where, first_line=1)[0]
    for c in schema.columns:
        value = checked.get(c.name)
        if c.kind == "categorical" and value is not None and value not in c.categories and schema.missing == "error":
            raise DataError(f"{where}: {c.name} {value!r} was not seen in training; one of "
                            f"{', '.join(c.categories)}")
    return checked


def _number_text(value: Any, name: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{where}: {name} must be a number or a string, not {type(value).__name__}")
    return repr(float(value))


def fit_schema(schema: CovariateSchema, table: Sequence[Mapping[str, Any]], source: str) -> CovariateSchema:
    """A copy fitted on the training rows: the categories seen, each numeric covariate's mean and spread. A
    categorical covariate with one category, or over ``MAX_CATEGORIES``, is a DataError."""
    columns = []
    for c in schema.columns:
        present = [row[c.name] for row in table if row.get(c.name) is not None]
        if not present:
            raise DataError(f"{source}: covariate {c.name} has no value in the training split")
        if c.kind == "numeric":
            arr = np.asarray(present, np.float64)
            columns.append(Covariate(c.name, c.kind, c.unit, [], float(arr.mean()), float(max(arr.std(), 1e-6))))
        else:
            cats = sorted(set(present))
            if len(cats) > MAX_CATEGORIES:
                raise DataError(f"{source}: covariate {c.name} has {len(cats)} categories in training; at most "
                                f"{MAX_CATEGORIES} (is it numeric?)")
            columns.append(Covariate(c.name, c.kind, "", cats))
    return CovariateSchema(columns, schema.missing, fitted=True)


def encode(schema: CovariateSchema, table: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Rows of checked covariates as float32 features (N, ``schema.width``): numeric values standardised by the
    training mean and spread (imputed: 0, the mean), categories one-hot (a category unseen in training, or a missing
    one under imputation, in the extra slot), then one missing indicator per covariate under imputation."""
    if not schema.fitted:
        raise DataError("covariates: the schema is not fitted on training data yet")
    impute = schema.missing == "impute"
    out = np.zeros((len(table), schema.width), np.float32)
    for i, row in enumerate(table):
        j = 0
        for k, c in enumerate(schema.columns):
            value = row.get(c.name)
            if c.kind == "numeric":
                out[i, j] = 0.0 if value is None else (float(value) - c.mean) / c.std
                j += 1
            else:
                slots = len(c.categories) + (1 if impute else 0)
                if value in c.categories:
                    out[i, j + c.categories.index(value)] = 1.0
                elif impute:
                    out[i, j + slots - 1] = 1.0
                j += slots
            if impute:
                out[i, schema.width - len(schema.columns) + k] = float(value is None)
    return out
