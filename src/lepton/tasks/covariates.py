"""Clinical covariates beside the image, for any task that takes them (classification, sequence): the declaration in
the task options checked, the schema fitted on the training split into the run's preprocessing options, each
sample's encoded vector, and the ``create_model`` options that make the network fuse it (late fusion or FiLM,
``lepton.models.sequence.Fusion``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lepton.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from lepton.data.readers.covariates import CovariateSchema

#: The task options covariates add, with their defaults.
COVARIATE_OPTIONS: dict[str, Any] = {"covariates": None, "covariate_missing": "error", "fusion": "late"}


def check_options(options: Mapping[str, Any]) -> None:
    """A ConfigError for a bad ``covariate_missing`` or ``fusion`` (the declaration is checked when parsed)."""
    for key, allowed in (("covariate_missing", ("error", "impute")), ("fusion", ("late", "film"))):
        if options.get(key, COVARIATE_OPTIONS[key]) not in allowed:
            raise ConfigError(f"task_options.{key}={options[key]!r} is not one of {', '.join(allowed)}")


def declared(options: Mapping[str, Any]) -> CovariateSchema | None:
    """The covariates the task options declare (``covariates``, ``covariate_missing``), or None."""
    from lepton.data.readers.covariates import parse_covariates

    return parse_covariates(options.get("covariates"), options.get("covariate_missing") or "error")


def fit(options: Mapping[str, Any], train: Any, spec: Any) -> None:
    """The declared covariates fitted on the training split (``train.covariates``) into ``spec.options`` with the
    fusion, so prediction and serving encode as training did; nothing when none are declared."""
    from lepton.data.readers.covariates import fit_schema

    schema = declared(options)
    if schema is not None:
        spec.options["covariates"] = fit_schema(schema, train.covariates, train.source).to_dict()
        spec.options["fusion"] = options.get("fusion") or "late"


def inputs(data: Any, spec: Any) -> torch.Tensor | None:
    """Encoded covariates (N, F) of a data set (``data.covariates``) or — prediction, serving — of a list with one
    mapping of values by name per input, checked against the fitted schema; None for a run without covariates."""
    import torch

    from lepton.data.readers.covariates import CovariateSchema, check_values, encode

    stored = spec.options.get("covariates")
    if not stored:
        return None
    schema = CovariateSchema.from_dict(stored)
    if isinstance(data, list):
        rows = [check_values(schema, row, f"covariates of input {i + 1}") for i, row in enumerate(data)]
    else:
        rows = data.covariates
    return torch.from_numpy(encode(schema, rows))


def model_options(spec: Any) -> dict[str, Any]:
    """``create_model`` options for a run with covariates: their encoded width and the fusion; empty without."""
    from lepton.data.readers.covariates import CovariateSchema

    if not spec.options.get("covariates"):
        return {}
    return {"covariates": CovariateSchema.from_dict(spec.options["covariates"]).width,
            "fusion": spec.options.get("fusion", "late")}
