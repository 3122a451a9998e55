"""The native v1 API: list and describe served models, predict one image (with an optional Grad-CAM overlay)."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from lepton.registry.access import KeyInfo
from lepton.serve.deps import Target, api_key, predict_target, served_model
from lepton.serve.errors import ApiError
from lepton.serve.inputs import decode_request
from lepton.serve.state import Deployment

router = APIRouter(prefix="/v1/models", tags=["v1"])


def describe(dep: Deployment) -> dict[str, Any]:
    adapter = dep.handles[dep.primary].adapter
    spec = adapter.preprocessing
    return {"name": dep.name, "version": dep.primary, "task": adapter.task.name, "platform": adapter.platform,
            "labels": adapter.labels, "threshold": adapter.threshold, "served_versions": sorted(dep.handles),
            "route": dep.weights or None, "shadow": dep.shadow,
            "input": {"size": list(spec.size), "channels": spec.channels, "window": spec.window}}


@router.get("")
async def list_models(request: Request, key: KeyInfo | None = Depends(api_key)):
    return {"models": [describe(d) for d in request.app.state.server.visible(key)]}


@router.get("/{name}")
async def model_info(name: str, request: Request, dep: Deployment = Depends(served_model)):
    srv = request.app.state.server
    versions = await asyncio.to_thread(srv.registry.list, name)
    card = await asyncio.to_thread(srv.registry.card, f"{name}@{dep.primary}")
    return {**describe(dep), "versions": [{"version": v.version, "stage": v.stage, "format": v.format,
                                           "created_at": v.created_at,
                                           "metrics": {k: m for k, m in v.metrics.items() if k.startswith("val_")}}
                                          for v in versions],
            "card_summary": "\n".join(card.splitlines()[:12])}


@router.post("/{name}/predict")
async def predict(name: str, request: Request, target: Target = Depends(predict_target)):
    start = time.perf_counter()
    srv, dep = target.server, target.deployment
    adapter = dep.handles[dep.primary].adapter
    pixels = await decode_request(request, adapter, srv.config.max_upload_bytes)
    version, outputs = await srv.infer(dep, pixels, request.headers.get("x-lepton-client"))
    request.state.log["version"] = version
    served = (dep.handles.get(version) or dep.handles[dep.primary]).adapter
    body = served.encode_response(outputs)
    method = request.query_params.get("explain")
    if method is not None:
        if method not in ("gradcam", "gradcam++"):
            raise ApiError(422, "invalid_request", "explain must be gradcam or gradcam++")
        if not hasattr(served, "explain"):
            raise ApiError(422, "invalid_request", f"{name}@{version} is served with ONNX Runtime; "
                                                   "explanations need the PyTorch backend")
        index = served.task.explain_index(outputs, served.info)
        png = await asyncio.to_thread(srv.explain, served, pixels, method, index)
        body["explanation"] = {"method": method, "class": served.label(outputs) or f"output {index}",
                               "overlay_png_base64": base64.b64encode(png).decode()}
    # A ready-made response skips FastAPI's generic encoder: the body is plain JSON types already.
    return JSONResponse({**body, "model": name, "version": version, "request_id": request.state.request_id,
                         "latency_ms": round((time.perf_counter() - start) * 1000, 2)})
