"""The native v1 API: list and describe served models, predict one image (with an optional Grad-CAM overlay)."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from lepton.registry.access import KeyInfo
from lepton.serve import schemas
from lepton.serve.deps import api_key, predict_target, served_model
from lepton.serve.errors import ApiError, registry_call
from lepton.serve.inputs import decode_request, request_covariates
from lepton.serve.state import Deployment

router = APIRouter(prefix="/v1/models", tags=["v1"])

_BINARY = {"schema": {"type": "string", "format": "binary", "minLength": 1}}
_UNIT = {"type": "number", "minimum": 0, "maximum": 1}
_COV = ("Models that fuse clinical covariates with the image: their values by name, as a JSON object (the model's "
        "`covariates` in GET /v1/models/{name}: numbers for numeric ones, strings for categorical ones, null when "
        "missing).")
_COVARIATES = {"type": "object", "description": _COV,
               "additionalProperties": {"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "null"}]}}
#: The request bodies predict accepts, by content type (FastAPI cannot infer them: the route reads the raw body).
PREDICT_BODY = {"requestBody": {"required": True, "description": (
    "One image: a file (PNG, JPEG, BMP, TIFF, DICOM, NIfTI or NPY, recognised by its content) as the raw body or "
    "the multipart field `file`, or JSON with the file in base64 (`image`) or the pixels as nested lists in "
    "[0, 1] (`array`, (H, W) or (C, H, W) with C 1 or 3). Well-formed content that is not a readable image is "
    "answered 422."), "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary",
                                                                   "minLength": 1},
                                                          "covariates": {"type": "string", "description": _COV}}}},
        "application/json": {"schema": {"oneOf": [
            {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "contentEncoding": "base64"}, "filename": {"type": "string"},
                "covariates": _COVARIATES}},
            {"type": "object", "required": ["array"], "properties": {"covariates": _COVARIATES, "array": {"anyOf": [
                {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": _UNIT}},
                {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                    "type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": _UNIT}}}]}}}]}},
        "application/octet-stream": _BINARY, "image/png": _BINARY, "image/jpeg": _BINARY,
        "application/dicom": _BINARY}}}


#: Explanation methods the ``explain`` query parameter takes.
EXPLAIN = ("gradcam", "gradcam++")
PREDICT_BODY["parameters"] = [{"name": "explain", "in": "query", "required": False,
                               "schema": {"type": "string", "enum": list(EXPLAIN)},
                               "description": "Add a Grad-CAM overlay (PNG, base64) of the explained class."},
                              {"name": "dicom_seg", "in": "query", "required": False, "schema": {"type": "boolean"},
                               "description": "Segmentation models, a zipped DICOM series uploaded: add a DICOM SEG "
                                              "(base64) that references it."}]


def describe(dep: Deployment) -> dict[str, Any]:
    adapter = dep.handles[dep.primary].adapter
    spec = adapter.preprocessing
    return {"name": dep.name, "version": dep.primary, "task": adapter.task.name, "platform": adapter.platform,
            "precision": adapter.precision, "labels": adapter.labels, "threshold": adapter.threshold,
            "served_versions": sorted(dep.handles),
            "route": {str(v): w for v, w in dep.weights.items()} or None, "shadow": dep.shadow,
            "input": {"size": list(spec.size), "channels": spec.channels, "window": spec.window},
            "cost": adapter.cost_info(),
            **({"covariates": adapter.covariates.describe()} if adapter.covariates is not None else {})}


@router.get("", response_model=schemas.ModelList, responses=schemas.errors(401))
async def list_models(request: Request, key: KeyInfo | None = Depends(api_key)):
    """The served models this key may see."""
    return JSONResponse({"models": [describe(d) for d in request.app.state.server.visible(key)]})


@router.get("/{name}", response_model=schemas.ModelInfo, responses=schemas.errors(401, 404))
async def model_info(name: str, request: Request, dep: Deployment = Depends(served_model)):
    """A served model: its primary version, its versions in the registry and the head of its model card."""
    srv = request.app.state.server
    versions = await asyncio.to_thread(srv.registry.list, name)
    card = await asyncio.to_thread(srv.registry.card, f"{name}@{dep.primary}")
    return JSONResponse({**describe(dep), "versions": [
        {"version": v.version, "stage": v.stage, "format": v.format, "created_at": v.created_at,
         "metrics": {k: m for k, m in v.metrics.items() if k.startswith(("val_", "eval/"))}} for v in versions],
        "card_summary": "\n".join(card.splitlines()[:12])})


@router.get("/{name}/card", response_model=schemas.Card, responses=schemas.errors(401, 404, 422))
async def model_card(name: str, request: Request,
                     version: Annotated[int | None, Query(ge=1, le=schemas.MAX_VERSION,
                                                          description="Default: the served version.")] = None,
                     dep: Deployment = Depends(served_model)):
    """A version's model card as Markdown and as safe HTML (raw HTML in the card is shown as text)."""
    from lepton.registry.card import card_html

    number = dep.primary if version is None else version
    markdown = await registry_call(request, "card", f"{name}@{number}")
    return JSONResponse({"name": name, "version": number, "markdown": markdown, "html": card_html(markdown)})


@router.get("/{name}/diff", response_model=schemas.Diff, responses=schemas.errors(401, 404, 422))
async def model_diff(name: str, request: Request, a: Annotated[int, Query(ge=1, le=schemas.MAX_VERSION)],
                     b: Annotated[int, Query(ge=1, le=schemas.MAX_VERSION)],
                     dep: Deployment = Depends(served_model)):
    """What differs between versions ``a`` and ``b``: config, preprocessing, labels, metrics, training data."""
    return JSONResponse(await registry_call(request, "diff", name, a, b))


@router.post("/{name}/predict", response_model=schemas.Prediction, openapi_extra=PREDICT_BODY,
             responses=schemas.errors(400, 401, 404, 413, 422, 429, 503))
async def predict(name: str, request: Request):
    """Predict one image with the model's routed version (A/B and canary weights; sticky per `X-Lepton-Client`)."""
    start = time.perf_counter()
    # The checks are called, not injected, and ``explain`` is read by hand (documented in PREDICT_BODY): a FastAPI
    # dependency or a declared query parameter costs more per request than the whole check (measured).
    target = await predict_target(request)
    explain = request.query_params.get("explain")
    if explain is not None and explain not in EXPLAIN:
        raise ApiError(422, "invalid_request", f"explain must be one of {', '.join(EXPLAIN)} (got {explain!r})")
    dicom_seg = request.query_params.get("dicom_seg")
    if dicom_seg is not None and dicom_seg not in ("true", "false", "1", "0"):
        raise ApiError(422, "invalid_request", f"dicom_seg must be true or false (got {dicom_seg!r})")
    srv, dep = target.server, target.deployment
    adapter = dep.handles[dep.primary].adapter
    if dicom_seg in ("true", "1") and "dicom_seg" not in adapter.task.encodings:
        raise ApiError(422, "invalid_request", f"dicom_seg is for segmentation models; {name} is a "
                                               f"{adapter.task.name} model")
    boxes = "explain_boxes" in adapter.task.capabilities  # a map per box (HiResCAM) rather than per class
    if explain is not None and "explain" not in adapter.task.capabilities and not boxes:
        raise ApiError(422, "invalid_request", f"explain is for classifiers; {name} is a {adapter.task.name} model, "
                                               "whose answer is not a class")
    if explain is not None and boxes and explain != "gradcam":
        raise ApiError(422, "invalid_request", f"{name}'s boxes are explained by HiResCAM per box: explain=gradcam")
    pixels = await decode_request(request, adapter, srv.config.max_upload_bytes)
    state = request.scope["state"]  # the access middleware's; no State wrapper needed on the hot path
    if adapter.on_grid:  # an answer on the input's own grid, outside the fixed-size batcher
        upload = await _upload(request) if dicom_seg in ("1", "true") else None
        version, body = await srv.segment(dep, pixels, request.headers.get("x-lepton-client"), upload)
        state["log"]["version"] = version
        return JSONResponse({**body, "model": name, "version": version, "request_id": state["request_id"],
                             "latency_ms": round((time.perf_counter() - start) * 1000, 2)})
    if adapter.whole_frames:  # a volume answered whole on its own grid (sliding windows), as offline
        version, _, body = await srv.answer_frame(dep, pixels, request.headers.get("x-lepton-client"),
                                               explain is not None)
        state["log"]["version"] = version
        return JSONResponse({**body, "model": name, "version": version, "request_id": state["request_id"],
                             "latency_ms": round((time.perf_counter() - start) * 1000, 2)})
    if adapter.covariates is not None:  # a version that fuses covariates: the image with them
        if explain is not None:
            raise ApiError(422, "invalid_request", "explain is for models of the image alone")
        pixels = adapter.attach(pixels, await request_covariates(request))
    version, outputs = await srv.infer(dep, pixels, request.headers.get("x-lepton-client"))
    state["log"]["version"] = version
    served = (dep.handles.get(version) or dep.handles[dep.primary]).adapter
    body = served.encode_response(outputs)
    if explain is not None:
        if not served.explains:
            raise ApiError(422, "invalid_request", f"{name}@{version} is served with ONNX Runtime; "
                                                   "explanations need the PyTorch backend")
        if boxes:
            await asyncio.to_thread(srv.explain_findings, served, pixels, body)
            return JSONResponse({**body, "model": name, "version": version, "request_id": state["request_id"],
                                 "latency_ms": round((time.perf_counter() - start) * 1000, 2)})
        index = served.task.explain_index(outputs, served.info)
        pngs = await asyncio.to_thread(srv.explain, served, pixels, explain, index)
        body["explanation"] = {"method": explain, "class": served.label(outputs) or f"output {index}",
                               **{f"{k}_png_base64": base64.b64encode(v).decode() for k, v in pngs.items()}}
    # A ready-made response skips FastAPI's generic encoder: the body is plain JSON types already.
    return JSONResponse({**body, "model": name, "version": version, "request_id": state["request_id"],
                         "latency_ms": round((time.perf_counter() - start) * 1000, 2)})


async def _upload(request: Request) -> bytes:
    """The uploaded file's bytes again (Starlette keeps the body and the parsed form): a raw body or a multipart
    ``file``; a base64 JSON image or an array cannot carry a series."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        upload = (await request.form()).get("file")
        await upload.seek(0)
        return await upload.read()
    if ctype.startswith("application/json"):
        raise ApiError(422, "invalid_request", "dicom_seg needs the series as a zip upload (raw body or multipart)")
    return await request.body()
