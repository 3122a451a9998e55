"""Open Inference Protocol v2 (KServe, Triton): server and model metadata, health and ``infer`` with JSON
tensors. The input tensor is the model's preprocessed image size in [0, 1]; outputs come from the task."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from lepton import __version__
from lepton.serve.deps import Target, infer_target, served_version
from lepton.serve.errors import ApiError
from lepton.serve.inputs import read_body
from lepton.serve.state import Deployment
from lepton.serve.tensors import HEADER_LENGTH, InferRequest, encode_infer_response, parse_infer_request

router = APIRouter(prefix="/v2", tags=["oip-v2"])

#: The most images one infer request may carry.
MAX_BATCH = 1024
#: The name of every model's one input tensor: images at the model's size, in [0, 1].
INPUT = "input"


@router.get("")
async def server_metadata():
    return {"name": "lepton", "version": __version__, "extensions": ["binary_tensor_data"]}


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
            "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, c, h, w]}],
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


def _input_batch(request: InferRequest, channels: int, size: tuple[int, int]) -> np.ndarray:
    """The model's one input as float32 (N, C, H, W) in [0, 1], checked against the metadata: name, datatype and
    shape; ApiError 400 naming the field otherwise."""
    (h, w), c = size, channels
    unknown = [n for n in request.inputs if n != INPUT]
    if unknown or INPUT not in request.inputs:
        raise ApiError(400, "invalid_request", f"this model has one input, {INPUT!r} (FP32 [N, {c}, {h}, {w}]); "
                                               f"got {', '.join(map(repr, request.inputs))}")
    datatype, data = request.inputs[INPUT]
    if datatype != "FP32":
        raise ApiError(400, "invalid_request", f"input {INPUT!r}: datatype must be FP32 (got {datatype})")
    shape = list(data.shape)
    if not (len(shape) == 4 and shape[1:] == [c, h, w] and 1 <= shape[0] <= MAX_BATCH):
        raise ApiError(400, "invalid_request", f"input {INPUT!r}: shape must be [N, {c}, {h}, {w}] with "
                                               f"1 <= N <= {MAX_BATCH} (got {shape})")
    if not np.isfinite(data).all() or data.min() < 0 or data.max() > 1:
        raise ApiError(400, "invalid_request", f"input {INPUT!r}: values must be finite and within [0, 1]")
    return data


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, target: Target = Depends(infer_target)):
    srv, dep, v = target.server, target.deployment, target.version
    body = await read_body(request, srv.config.max_upload_bytes)
    adapter = dep.handles[v].adapter
    spec = adapter.preprocessing
    parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH),
                                 max_elements=MAX_BATCH * spec.channels * spec.size[0] * spec.size[1])
    data = _input_batch(parsed, spec.channels, spec.size)
    results = await asyncio.gather(*(srv.infer(dep, img, None, version=v) for img in data))
    outputs = np.stack([o for _, o in results])
    tensors = adapter.task.oip_tensors(outputs, adapter.labels, adapter.info)
    content, headers = encode_infer_response(
        {"model_name": name, "model_version": str(v), "id": parsed.id or request.state.request_id}, tensors, parsed)
    return Response(content, headers=headers)
