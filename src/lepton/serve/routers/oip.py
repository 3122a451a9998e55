"""Open Inference Protocol v2 (KServe, Triton): server and model metadata, health and ``infer`` with JSON
tensors. The input tensor is the model's preprocessed image size in [0, 1]; outputs come from the task."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from lepton import __version__
from lepton.serve.deps import Target, infer_target, served_version
from lepton.serve.errors import ApiError
from lepton.serve.inputs import read_body
from lepton.serve.state import Deployment

router = APIRouter(prefix="/v2", tags=["oip-v2"])

#: The most images one infer request may carry.
MAX_BATCH = 1024


@router.get("")
async def server_metadata():
    return {"name": "lepton", "version": __version__, "extensions": []}


@router.get("/health/live")
async def live():
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request):
    if not request.app.state.server.ready:
        return JSONResponse({"ready": False}, status_code=400)
    return {"ready": True}


def metadata(dep: Deployment, version: int) -> dict[str, Any]:
    adapter = dep.handles[version].adapter
    c, (h, w) = adapter.preprocessing.channels, adapter.preprocessing.size
    return {"name": dep.name, "versions": [str(v) for v in sorted(dep.handles)], "platform": adapter.platform,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]}],
            "outputs": adapter.task.oip_outputs(adapter.labels),
            "parameters": {"task": adapter.task.name, "labels": adapter.labels, "threshold": adapter.threshold,
                           "input_range": "[0, 1] before the model's normalisation"}}


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(target: tuple[Deployment, int] = Depends(served_version)):
    return metadata(*target)


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, target: tuple[Deployment, int] = Depends(served_version)):
    return {"name": name, "ready": True}


def _input_batch(payload: Any, channels: int, size: tuple[int, int]) -> np.ndarray:
    """The one input tensor of an infer request as float32 (N, C, H, W) in [0, 1]; ApiError 400 otherwise."""
    inputs = payload.get("inputs") if isinstance(payload, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, "invalid_request", "'inputs' must hold exactly one tensor named 'input'")
    tensor = inputs[0]
    (h, w), c = size, channels
    if tensor.get("datatype") != "FP32":
        raise ApiError(400, "invalid_request", f"input datatype must be FP32 (got {tensor.get('datatype')!r})")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[1:] == [c, h, w] and isinstance(shape[0], int)
            and 1 <= shape[0] <= MAX_BATCH):
        raise ApiError(400, "invalid_request", f"input shape must be [N, {c}, {h}, {w}] with 1 <= N <= {MAX_BATCH} "
                                               f"(got {shape})")
    try:
        data = np.asarray(tensor.get("data"), dtype=np.float32).reshape(shape)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, "invalid_request", f"input data does not match shape {shape}: {exc}") from exc
    if not np.isfinite(data).all() or data.min() < 0 or data.max() > 1:
        raise ApiError(400, "invalid_request", "input values must be finite and within [0, 1]")
    return data


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, target: Target = Depends(infer_target)):
    srv, dep, v = target.server, target.deployment, target.version
    try:
        payload = json.loads(await read_body(request, srv.config.max_upload_bytes))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from exc
    adapter = dep.handles[v].adapter
    data = _input_batch(payload, adapter.preprocessing.channels, adapter.preprocessing.size)
    results = await asyncio.gather(*(srv.infer(dep, img, None, version=v) for img in data))
    outputs = np.stack([o for _, o in results])
    tensors = adapter.task.oip_tensors(outputs, adapter.labels, adapter.info)
    requested = {o.get("name") for o in payload.get("outputs") or [] if isinstance(o, dict)} or set(tensors)
    return JSONResponse({"model_name": name, "model_version": str(v),
                         "id": str(payload.get("id") or request.state.request_id),
                         "outputs": [{"name": n, "datatype": dt, "shape": shape, "data": values}
                                     for n, (dt, shape, values) in tensors.items() if n in requested]})
