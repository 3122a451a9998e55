"""The shapes of the server's answers, for its OpenAPI document (``/openapi.json``): pydantic models and the
per-route ``responses`` tables. Routes return ready-made JSON responses (no per-request validation cost); the
schemathesis run in the tests checks that every answer matches what is documented here."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator

from lepton.registry.access import MAX_ROUTE_WEIGHT, MAX_VERSION


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable machine-readable code, e.g. `model_not_found`, `invalid_input`.")
    message: str = Field(description="What is wrong, naming the field or upload, and how to fix it.")


class Error(BaseModel):
    """The native API's error body."""

    error: ErrorDetail


class OipError(BaseModel):
    """The Open Inference Protocol's error body."""

    error: str


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    models: dict[str, int] = Field(description="Served model name -> primary version.")


class ModelInput(BaseModel):
    size: list[int]
    channels: int
    window: str | None


class ModelDescription(BaseModel):
    name: str
    version: int
    task: str
    platform: str
    precision: str = Field(description="fp32, bf16 or int8: the numeric precision the primary version runs in.")
    labels: list[str]
    threshold: float | None = Field(description="The decision threshold selected on val for this precision.")
    served_versions: list[int]
    route: dict[str, float] | None = Field(description="Version -> traffic share in percent, when routed.")
    shadow: int | None
    input: ModelInput
    cost: dict[str, Any] | None = Field(None, description=(
        "What one answer costs: forward passes per image (ensemble members x TTA views) and ms/image at batch 1 "
        "and at the serving batch per precision, measured when the version was trained (machine named); `served` "
        "holds the figures of the precision it runs in. Null for versions trained before it was measured."))


class ModelList(BaseModel):
    models: list[ModelDescription]


class VersionSummary(BaseModel):
    version: int
    stage: str
    format: str
    created_at: str
    metrics: dict[str, Any]


class ModelInfo(ModelDescription):
    versions: list[VersionSummary]
    card_summary: str


class Explanation(BaseModel):
    """The heatmap blended over the model's input (``overlay``), and the two layers apart (``image``, and
    ``heatmap`` with its own alpha) for a viewer that sets the opacity itself."""

    method: str
    model_config = ConfigDict(extra="allow")
    overlay_png_base64: str
    image_png_base64: str
    heatmap_png_base64: str


class Prediction(BaseModel):
    """The task's answer (classification: ``label``, ``probabilities``, ``threshold``) and the request's facts."""

    model_config = ConfigDict(extra="allow")
    model: str
    version: int
    request_id: str
    latency_ms: float
    explanation: Explanation | None = None


class Reload(BaseModel):
    changes: dict[str, Any]


class Card(BaseModel):
    name: str
    version: int
    markdown: str
    html: str


class Diff(BaseModel):
    a: str
    b: str
    config: dict[str, Any]
    preprocessing: dict[str, Any]
    labels: list[Any] | None
    metrics: dict[str, Any]
    data_changed: bool


#: A version number as a JSON object key (the registry's numbers are 32-bit signed integers).
VERSION_KEY = r"^[1-9][0-9]{0,8}$"
VersionKey = Annotated[str, StringConstraints(pattern=VERSION_KEY)]


def _json_number(value: Any) -> Any:
    """A JSON number only: pydantic's lax mode would also read true/false as 1/0 and "3" as 3, which the schema
    refuses. (An integral float such as 3.0 is an integer, as JSON Schema has it.)"""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return value


Version = Annotated[int, Field(ge=1, le=MAX_VERSION), BeforeValidator(_json_number)]
RouteWeight = Annotated[float, Field(ge=0, le=MAX_ROUTE_WEIGHT, allow_inf_nan=False), BeforeValidator(_json_number)]


class Promote(BaseModel):
    """Move ``version`` to ``stage``; the previous holder of the stage is archived."""

    model_config = ConfigDict(extra="forbid")
    version: Version
    stage: Literal["staging", "production"]


class RouteRequest(BaseModel):
    """Traffic weights by version (A/B, canary; relative: they need not sum to 1 or 100), each a finite number from 0
    to 1e6 with at least one above 0, and an optional shadow version."""

    model_config = ConfigDict(extra="forbid")
    weights: dict[VersionKey, RouteWeight] = Field(min_length=1, json_schema_extra={
        "additionalProperties": False, "not": {"patternProperties": {VERSION_KEY: {"maximum": 0}}},
        "description": "Version -> relative weight; at least one weight above 0."})
    shadow: Version | None = None

    @field_validator("weights")
    @classmethod
    def _one_above_zero(cls, weights: dict[str, float]) -> dict[str, float]:
        if not any(w > 0 for w in weights.values()):
            raise ValueError("at least one version needs a weight above 0")
        return weights


class StageChange(BaseModel):
    name: str
    version: int
    stage: str
    changes: dict[str, Any]


class RouteChange(BaseModel):
    name: str
    weights: dict[str, float]
    shadow: int | None
    changes: dict[str, Any]


class WhoAmI(BaseModel):
    auth: bool
    tenant: str | None
    scope: str | None


class View(BaseModel):
    """An uploaded image as a person looks at it: its slices as PNGs (a volume's every slice) under a window."""

    name: str
    window: str | None
    slices: int
    images: list[str]
    indices: list[int] = Field(description="Each image's slice index along the volume's first axis (every slice, or "
                               "an even subset of a deep volume): where a volume's label map is read for it.")


class MonitorSummary(BaseModel):
    window_seconds: float
    sample_seconds: float
    points: list[dict[str, Any]]
    requests_total: float
    errors_total: float
    queue: float
    drift: dict[str, float]
    predictions: dict[str, float]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any]


class OutputTensor(TensorMetadata):
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


_WHY = {
    400: "The request is malformed (body, JSON, tensor or multipart field).",
    401: "No valid API key: send `Authorization: Bearer <key>`.",
    403: "The key's scope does not allow this action.",
    404: "No such served model or version (or not visible to this key's tenant).",
    409: "The registry refuses the change in its current state (e.g. nothing to roll back to).",
    413: "The body, or a tensor in it, is over the server's limits.",
    415: "The body is not a kind this route takes (a slide job: not a whole-slide file, or a multipart form).",
    422: "The request is well formed but its content cannot be used (not a decodable image, values out of range).",
    429: "Over this key's rate limit; retry after `Retry-After` seconds.",
    503: "Not ready, or the model's queue is full; retry shortly.",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}},
    429: {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds until a request is allowed."}},
}


def errors(*codes: int, oip: bool = False, retry_after_503: bool = True) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entries for the error statuses a route can answer, in the shape of its API."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": OipError if oip else Error, "description": _WHY[code]}
        headers = dict(_HEADERS.get(code, {}))
        if code == 503 and retry_after_503:
            headers["Retry-After"] = {"schema": {"type": "string"}, "description": "Seconds to wait."}
        if headers:
            entry["headers"] = headers
        out[code] = entry
    return out
