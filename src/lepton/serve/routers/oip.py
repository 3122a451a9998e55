"""Open Inference Protocol v2 (KServe, Triton): server and model metadata, health and ``infer`` with JSON
tensors. The input tensor is the model's preprocessed image size in [0, 1] — for a version answering volumes whole
(``ModelAdapter.whole_frames``: a 3-D detector) any size, each volume answered on its own grid as ``lepton predict``
answers a file (``serve.frames``) —; outputs come from the task."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from lepton import __version__
from lepton.serve import schemas
from lepton.serve.adapters import MAX_SERVE_PIXELS
from lepton.serve.deps import Target, infer_target, served_version
from lepton.serve.errors import ApiError
from lepton.serve.inputs import read_body
from lepton.serve.state import Deployment
from lepton.serve.tensors import DATATYPES, HEADER_LENGTH, InferRequest, encode_infer_response, parse_infer_request

router = APIRouter(prefix="/v2", tags=["oip-v2"])

#: The most images one infer request may carry.
MAX_BATCH = 1024
#: The name of every model's one input tensor: images at the model's size, in [0, 1].
INPUT = "input"


_NOT_FOUND = schemas.errors(401, 404, oip=True)
#: A tensor as the server checks it before reading any data: a non-empty name, a protocol datatype, a shape of rank 2
#: (a covariate, [N, 1]) to 5 (an image or volume, [N, C, …its size]) with no dimension empty; its values in
#: ``data`` or (binary extension) announced by ``binary_data_size``, one, never both.
_TENSOR = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string", "minLength": 1}, "datatype": {"type": "string", "enum": list(DATATYPES)},
    "shape": {"type": "array", "minItems": 2, "maxItems": 5, "items": {"type": "integer", "minimum": 1}},
    "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
    "data": {"type": "array", "items": {}, "description": "Row-major values, flat or nested (absent with "
                                                         "binary_data_size)."}},
    "oneOf": [{"required": ["data"], "not": {"required": ["parameters"], "properties": {
                  "parameters": {"required": ["binary_data_size"]}}}},
              {"required": ["parameters"], "not": {"required": ["data"]},
               "properties": {"parameters": {"required": ["binary_data_size"]}}}]}
_INFER_REQUEST = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"},
    "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
    "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1},
        "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}}}}
#: The infer request: JSON tensors, or (binary tensor data extension) the JSON header followed by the binary
#: tensors, its length in ``Inference-Header-Content-Length``.
INFER_BODY = {
    "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                    "schema": {"type": "integer", "minimum": 1},
                    "description": "Length of the JSON header when binary tensor data follows it."}],
    "requestBody": {"required": True, "description": (
        "The model's image input, `input`: FP32 [N, C, H, W] in [0, 1] at the size the metadata gives (N <= 1024; "
        "-1: any length — a 3-D detector's volumes, each answered on its own grid as `lepton predict` answers it). "
        "A model that fuses clinical covariates also takes one named input per covariate, [N, 1]: FP32 for a "
        "numeric one (NaN: missing), BYTES (UTF-8) for a categorical one; the metadata's `inputs` list them. "
        "Malformed requests and tensors that do not fit the metadata are answered 400."), "content": {
            "application/json": {"schema": _INFER_REQUEST},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
_INFER_RESPONSES = {
    200: {"description": "JSON outputs, or the JSON header and binary outputs (`Inference-Header-Content-Length`) "
                         "when any binary output was asked for.",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **schemas.errors(400, 401, 404, 413, 429, 503, oip=True)}


@router.get("", response_model=schemas.ServerMetadata)
async def server_metadata():
    return JSONResponse({"name": "lepton", "version": __version__, "extensions": ["binary_tensor_data"]})


@router.get("/health/live", response_model=schemas.Live)
async def live():
    return JSONResponse({"live": True})


@router.get("/health/ready", response_model=schemas.ServerReady,
            responses={400: {"model": schemas.ServerReady, "description": "Models are still loading."}})
async def ready(request: Request):
    if not request.app.state.server.ready:
        return JSONResponse({"ready": False}, status_code=400)
    return JSONResponse({"ready": True})


def _input_size(adapter) -> list[int]:
    """The input's spatial size as the metadata gives it: the model's, or -1 on each axis for volumes answered whole
    on their own grid."""
    spec = adapter.preprocessing
    return [-1] * spec.spatial_dims if adapter.whole_frames else list(spec.size)


def metadata(dep: Deployment, version: int) -> dict[str, Any]:
    adapter = dep.handles[version].adapter
    c, size = adapter.preprocessing.channels, _input_size(adapter)
    return {"name": dep.name, "versions": [str(v) for v in sorted(dep.handles)], "platform": adapter.platform,
            "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, c, *size]}, *_covariate_inputs(adapter)],
            # outputs on the input's grid follow its spatial size
            "outputs": adapter.task.oip_outputs(adapter.labels, size),
            "parameters": {"task": adapter.task.name, "labels": adapter.labels, "threshold": adapter.threshold,
                           "input_range": "[0, 1] before the model's normalisation", "cost": adapter.cost_info()}}


@router.get("/models/{name}", response_model=schemas.ModelMetadata, responses=_NOT_FOUND)
async def model_metadata(name: str, target: tuple[Deployment, int] = Depends(served_version)):
    return JSONResponse(metadata(*target))


@router.get("/models/{name}/versions/{version}", response_model=schemas.ModelMetadata, responses=_NOT_FOUND)
async def model_version_metadata(name: str, version: str, target: tuple[Deployment, int] = Depends(served_version)):
    return JSONResponse(metadata(*target))


@router.get("/models/{name}/ready", response_model=schemas.ModelReady, responses=_NOT_FOUND)
async def model_ready(name: str, target: tuple[Deployment, int] = Depends(served_version)):
    return JSONResponse({"name": name, "ready": True})


@router.get("/models/{name}/versions/{version}/ready", response_model=schemas.ModelReady, responses=_NOT_FOUND)
async def model_version_ready(name: str, version: str, target: tuple[Deployment, int] = Depends(served_version)):
    return JSONResponse({"name": name, "ready": True})


def _covariate_inputs(adapter) -> list[dict[str, Any]]:
    """The named inputs of a model's covariates: FP32 [N, 1] for a numeric one, BYTES [N, 1] for a categorical one."""
    if adapter.covariates is None:
        return []
    return [{"name": c.name, "datatype": "FP32" if c.kind == "numeric" else "BYTES", "shape": [-1, 1],
             "parameters": {"kind": c.kind, **({"unit": c.unit} if c.unit else {}),
                            **({"categories": c.categories} if c.categories else {})}}
            for c in adapter.covariates.columns]


def _covariate_rows(request: InferRequest, adapter, n: int) -> list[dict[str, Any]]:
    """Each image's covariates by name from the request's named inputs (an absent input: missing for every image);
    ApiError 400 for a wrong datatype or shape."""
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for c in adapter.covariates.columns:
        if c.name not in request.inputs:
            continue
        datatype, data = request.inputs[c.name]
        wanted = "FP32" if c.kind == "numeric" else "BYTES"
        if datatype != wanted or data.size != n:
            raise ApiError(400, "invalid_request", f"input {c.name!r}: a {c.kind} covariate is {wanted} [{n}, 1] "
                                                   f"(got {datatype} {list(data.shape)})")
        for i, value in enumerate(data.reshape(-1).tolist()):
            if c.kind == "numeric":
                rows[i][c.name] = None if value != value else float(value)  # NaN: missing
            else:
                rows[i][c.name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return rows


def _input_batch(request: InferRequest, channels: int, size: tuple[int, ...],
                 named: tuple[str, ...] = ()) -> np.ndarray:
    """The model's one input as float32 (N, C, H, W) — volumes (N, C, D, H, W) — in [0, 1], checked against the
    metadata: name, datatype and shape (-1 in ``size``: any length); ApiError 400 naming the field otherwise."""
    expected = _shape_text(channels, size)
    unknown = [n for n in request.inputs if n != INPUT and n not in named]
    if unknown or INPUT not in request.inputs:
        raise ApiError(400, "invalid_request", f"this model has one input, {INPUT!r} (FP32 {expected}); "
                                               f"got {', '.join(map(repr, request.inputs))}")
    datatype, data = request.inputs[INPUT]
    if datatype != "FP32":
        raise ApiError(400, "invalid_request", f"input {INPUT!r}: datatype must be FP32 (got {datatype})")
    shape = list(data.shape)
    fits = len(shape) == 2 + len(size) and all(w in (-1, n) for w, n in zip([channels, *size], shape[1:], strict=True))
    if not (fits and 1 <= shape[0] <= MAX_BATCH):
        raise ApiError(400, "invalid_request", f"input {INPUT!r}: shape must be {expected} with "
                                               f"1 <= N <= {MAX_BATCH} (got {shape})")
    if not np.isfinite(data).all() or data.min() < 0 or data.max() > 1:
        raise ApiError(400, "invalid_request", f"input {INPUT!r}: values must be finite and within [0, 1]")
    return data


def _shape_text(channels: int, size) -> str:
    return f"[N, {channels}, {', '.join('any' if n == -1 else str(n) for n in size)}]"


@router.post("/models/{name}/infer", openapi_extra=INFER_BODY, response_model=schemas.InferResponse,
             responses=_INFER_RESPONSES)
async def infer(name: str, request: Request):
    """Run the model's primary version on a batch of images."""
    return await _infer(name, request, await infer_target(request))


@router.post("/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY, response_model=schemas.InferResponse,
             responses=_INFER_RESPONSES)
async def infer_version(name: str, version: str, request: Request):
    """Run one served version on a batch of images."""
    return await _infer(name, request, await infer_target(request))


async def _infer(name: str, request: Request, target: Target) -> Response:
    """The infer route's work; its checks (``deps.infer_target``) are called, not injected, as for predict."""
    srv, dep, v = target.server, target.deployment, target.version
    body = await read_body(request, srv.config.max_upload_bytes)
    adapter = dep.handles[v].adapter
    spec, size = adapter.preprocessing, _input_size(adapter)
    named = tuple(adapter.covariates.names) if adapter.covariates is not None else ()
    expected = _shape_text(spec.channels, size)

    def expect(name: str, datatype: str, shape: list[int]) -> str | None:
        """The image input's name, datatype and rank, checked before any size limit (covariates: later)."""
        if name != INPUT and name not in named:
            return f"unknown input: this model has one input, {INPUT!r} (FP32 {expected})"
        if name == INPUT and datatype != "FP32":
            return f"datatype must be FP32 (got {datatype})"
        if name == INPUT and len(shape) != 2 + len(spec.size):
            return f"shape must be {expected} with 1 <= N <= {MAX_BATCH} (got {shape})"
        return None

    # volumes answered whole: at most one upload's worth of voxels (``MAX_SERVE_PIXELS``) in all
    limit = MAX_SERVE_PIXELS if adapter.whole_frames else MAX_BATCH * int(np.prod(spec.size))
    parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH), expect=expect,
                                 max_elements=spec.channels * limit)
    data = _input_batch(parsed, spec.channels, size, named)
    if adapter.whole_frames:  # each volume on its own grid, one after another, as offline (not resized)
        outputs = np.stack([(await srv.answer_frame(dep, adapter.decode_array(vol), None, version=v))[1]
                            for vol in data])
    else:
        items = list(data)
        if named:  # each image with its covariates
            rows = _covariate_rows(parsed, adapter, len(data))
            items = [adapter.attach(img, row) for img, row in zip(data, rows, strict=True)]
        results = await asyncio.gather(*(srv.infer(dep, item, None, version=v) for item in items))
        outputs = np.stack([o for _, o in results])
    tensors = adapter.task.oip_tensors(outputs, adapter.labels, adapter.info)
    content, headers = encode_infer_response(
        {"model_name": name, "model_version": str(v), "id": parsed.id or request.state.request_id}, tensors, parsed)
    return Response(content, headers=headers)
