"""Whole-slide jobs over HTTP: list the served slide models, submit a slide (the file as the raw body, JSON naming
a file under the server's slide root, or JSON naming a series on a trusted DICOMweb service) as a job (202 and its
id), follow it (status, tiles done) and read its answer: the slide probability, the regions the model attended to
with their GeoJSON, and the heatmap, reports and DICOM SR as files. The work itself is ``lepton.serve.slides``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from lepton.registry.access import KeyInfo
from lepton.serve import schemas, slideinputs
from lepton.serve.deps import api_key
from lepton.serve.errors import ApiError, registry_call
from lepton.serve.slides import FILES, MEDIA

router = APIRouter(tags=["slides"])

#: A JSON body naming a server-side slide is small.
MAX_JSON_BYTES = 64 << 10
_BINARY = {"schema": {"type": "string", "format": "binary", "minLength": 1}}
SUBMIT_BODY = {
    "requestBody": {"required": True, "description": (
        "A whole slide: the file as the raw body (a pyramidal TIFF, SVS, OME-TIFF, QPTIFF or NDPI, a DICOM VL "
        "whole-slide instance, or a zip of a DICOM slide's instances; recognised by content), or JSON naming a file "
        "under the server's slide root (`--slide-root`), or JSON naming a VL whole-slide series on a DICOMweb "
        "service the server trusts (`--dicomweb-allow`; any other is 403), which the job retrieves. A file that is "
        "not a readable slide is answered 415 or 422; over the server's slide size limit, 413."), "content": {
            "application/octet-stream": _BINARY, "image/tiff": _BINARY, "application/dicom": _BINARY,
            "application/zip": _BINARY,
            "application/json": {"schema": {"type": "object", "properties": {
                "path": {"type": "string", "minLength": 1, "description": "Relative to the slide root."},
                "dicomweb": {"type": "string", "minLength": 1, "description": (
                    "http(s)://HOST:PORT/dicom-web?StudyInstanceUID=…&SeriesInstanceUID=…: one VL whole-slide "
                    "series on a trusted service.")}}}}}},
    "parameters": [{"name": "filename", "in": "query", "required": False, "schema": {"type": "string"},
                    "description": "The file's name (its suffix tells QPTIFF and OME-TIFF apart)."}]}


class SlideModelInfo(BaseModel):
    name: str
    version: int
    kind: Literal["slide"]
    format: str
    task: str
    labels: list[str]
    threshold: float
    tile: dict[str, Any] = Field(description="The tiles the model reads: size (px), mpp (µm/px), overlap, min_tissue.")


class SlideModelList(BaseModel):
    models: list[SlideModelInfo]


class SlideModelVersions(SlideModelInfo):
    versions: list[schemas.VersionSummary] = Field(description="Every registered version with its stage, format and "
                                                                "test figures.")


class JobAccepted(BaseModel):
    id: str
    status: Literal["queued"]
    url: str = Field(description="Where to follow the job (GET).")


class JobState(BaseModel):
    id: str
    model: str
    version: int
    status: Literal["receiving", "queued", "retrieving", "running", "done", "failed"]
    progress: dict[str, int | None] = Field(description=(
        "tiles_done of tiles (null until the grid is planned); for a DICOMweb reference also instances_done of "
        "instances retrieved."))
    created: float
    started: float | None = None
    finished: float | None = None
    error: str | None = Field(None, description="Why the job failed (a slide that does not decode, no tissue…).")
    result: dict[str, Any] | None = Field(None, description=(
        "When done: label, probability (of the last label), threshold, labels, tiles, the slide's geometry, the "
        "regions the model attended to (level-0 polygons, attention, mean tile score) and their GeoJSON."))
    files: dict[str, str] | None = Field(None, description=(
        "When done: file name → URL (heatmap PNG, GeoJSON, report JSON and Markdown, and a DICOM SR for a DICOM "
        "slide)."))


@router.get("/v1/slide-models", response_model=SlideModelList, responses=schemas.errors(401))
async def list_slide_models(request: Request, key: KeyInfo | None = Depends(api_key)):
    """The served slide models this key may see."""
    return JSONResponse({"models": [d.describe() for d in request.app.state.server.slides.visible(key)]})


@router.get("/v1/slide-models/{name}", response_model=SlideModelVersions, responses=schemas.errors(401, 404))
async def slide_model_info(name: str, request: Request, key: KeyInfo | None = Depends(api_key)):
    """A served slide model and its versions in the registry (stage, format, test figures), as the console's Models
    page lists them beside image models."""
    srv = request.app.state.server
    dep = srv.slides.model(name, key)
    versions = await asyncio.to_thread(srv.registry.list, name)
    return JSONResponse({**dep.describe(), "versions": [
        {"version": v.version, "stage": v.stage, "format": v.format, "created_at": v.created_at,
         "metrics": {k: m for k, m in v.metrics.items() if isinstance(m, int | float)}} for v in versions]})


@router.get("/v1/slide-models/{name}/card", response_model=schemas.Card, responses=schemas.errors(401, 404, 422))
async def slide_model_card(name: str, request: Request, key: KeyInfo | None = Depends(api_key),
                           version: Annotated[int | None, Query(ge=1, le=schemas.MAX_VERSION,
                                                                description="Default: the served version.")] = None):
    """A slide model version's card as Markdown and as safe HTML (raw HTML in the card is shown as text)."""
    from lepton.registry.card import card_html

    srv = request.app.state.server
    dep = srv.slides.model(name, key)
    number = dep.version if version is None else version
    markdown = await registry_call(request, "card", f"{name}@{number}")
    return JSONResponse({"name": name, "version": number, "markdown": markdown, "html": card_html(markdown)})


@router.post("/v1/slide-models/{name}/jobs", status_code=202, response_model=JobAccepted,
             responses=schemas.errors(400, 401, 403, 404, 413, 415, 422, 503), openapi_extra=SUBMIT_BODY)
async def submit_slide(name: str, request: Request, key: KeyInfo | None = Depends(api_key)):
    """Queue a slide for the model: 202 with the job's id; 503 with Retry-After when the slide queue is full."""
    jobs = request.app.state.server.slides
    dep = jobs.model(name, key)
    jobs.reserve()
    folder, queued = None, False
    try:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            body = await request.body()
            if len(body) > MAX_JSON_BYTES:
                raise ApiError(413, "payload_too_large", f"a JSON body here is at most {MAX_JSON_BYTES} bytes")
            try:
                given = json.loads(body)
            except ValueError:
                raise ApiError(400, "invalid_json", "the body is not JSON") from None
            if isinstance(given, dict) and "dicomweb" in given:  # retrieved by the job: 202 before any request
                source = slideinputs.resolve_reference(jobs.config.dicomweb_allow, given["dicomweb"])
                job, folder = jobs.create(dep, key)
                jobs.start(job, dep, None, owned=True, source=source)
            else:
                path = slideinputs.resolve_path(jobs.config, given.get("path") if isinstance(given, dict) else None)
                await asyncio.to_thread(_check_slide, path)
                job, folder = jobs.create(dep, key)
                jobs.start(job, dep, path, owned=False)
        elif kind.startswith("multipart/"):
            raise ApiError(415, "unsupported_media_type", "send the slide as the raw body (Content-Type "
                           "application/octet-stream), not as a multipart form")
        else:
            job, folder = jobs.create(dep, key)
            await _receive(request, folder / "upload.part")
            filename = Path(request.query_params.get("filename") or "").name[:200]
            slide = await asyncio.to_thread(slideinputs.prepare_upload, jobs.config, folder, filename)
            jobs.start(job, dep, slide, owned=True)
        queued = True
    finally:
        if not queued:
            jobs.release()
            if folder is not None:
                jobs.discard(folder)
    url = f"/v1/slide-jobs/{job}"
    return JSONResponse({"id": job, "status": "queued", "url": url}, status_code=202, headers={"Location": url})


async def _receive(request: Request, path: Path) -> None:
    """The body streamed to ``path`` (the middleware holds it to the slide size limit); 400 when empty."""
    size = 0
    with open(path, "wb") as fh:
        async for chunk in request.stream():
            size += len(chunk)
            fh.write(chunk)
    if size == 0:
        raise ApiError(400, "empty_body", "the request body is empty: send the slide file")


def _check_slide(path: Path) -> None:
    from lepton.data.readers.slides import open_slide
    from lepton.errors import LeptonError

    try:
        with open_slide(path) as slide:
            slide.thumbnail(256)
    except LeptonError as exc:
        raise ApiError(422, "unreadable_slide", str(exc)) from None


def _public(state: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in state.items() if k not in ("tenant", "pid", "files")}
    if state.get("files"):
        out["files"] = {k: f"/v1/slide-jobs/{state['id']}/files/{k}" for k in state["files"] if k in FILES}
    return out


@router.get("/v1/slide-jobs/{job_id}", response_model=JobState, responses=schemas.errors(401, 404))
async def slide_job(job_id: str, request: Request, key: KeyInfo | None = Depends(api_key)):
    """A slide job's status and progress, and its answer once done."""
    state = await asyncio.to_thread(request.app.state.server.slides.read, job_id, key)
    return JSONResponse(_public(state))


@router.get("/v1/slide-jobs/{job_id}/files/{kind}", responses={
    200: {"content": {MEDIA[k]: {} for k in FILES}, "description": "The file."}, **schemas.errors(401, 404)})
async def slide_job_file(job_id: str, kind: str, request: Request, key: KeyInfo | None = Depends(api_key)):
    """A finished job's file: ``heatmap`` (PNG over the thumbnail), ``geojson`` (regions for QuPath), ``report``
    (JSON), ``markdown``, ``sr`` (DICOM SR, for a DICOM slide)."""
    path = await asyncio.to_thread(request.app.state.server.slides.file, job_id, key, kind)
    if not path.is_file():
        raise ApiError(404, "not_found", f"slide job {job_id}'s {kind} file is gone")
    return FileResponse(path, media_type=MEDIA[kind], headers={"Cache-Control": "no-store"})


# Not DELETE on the job's own path: Starlette's 405 names the methods of the first route matching a path, so one path
# is served by one route.
@router.delete("/v1/slide-jobs/{job_id}/files", status_code=204, responses=schemas.errors(401, 404, 409))
async def delete_slide_job(job_id: str, request: Request, key: KeyInfo | None = Depends(api_key)):
    """Remove an ended job's files and the job with them (409 while it waits or runs)."""
    await asyncio.to_thread(request.app.state.server.slides.delete, job_id, key)
    return Response(status_code=204)
