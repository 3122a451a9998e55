"""The web console under ``/ui`` (sign in, predict, models, monitor) and the two JSON endpoints only it needs:
``POST /v1/view`` (an upload's slices under a CT window) and ``GET /v1/monitor`` (the last hour of the server's
metrics).

The pages are HTML shipped in the package with their scripts and styles (no CDN, no build step); every script is
a file, so the Content-Security-Policy allows no inline script or style and no other origin. The API key lives in the
browser's ``sessionStorage`` and goes out as a Bearer header: no cookie, so nothing for a cross-site request to
ride on. Whatever a user wrote (labels, model cards, descriptions) reaches the page as JSON and is set as text,
except the model card, which the server renders as Markdown with raw HTML off (``lepton.registry.card``)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

from lepton.registry.access import KeyInfo
from lepton.serve import schemas
from lepton.serve.deps import api_key
from lepton.serve.errors import ApiError

router = APIRouter(tags=["console"])

UI = Path(__file__).resolve().parent.parent / "ui"
PAGES = {"": ("Sign in", "signin"), "predict": ("Predict", "predict"), "models": ("Models", "models"),
         "monitor": ("Monitor", "monitor"), "slides": ("Slides", "slides")}
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".svg": "image/svg+xml"}
#: The console's security headers: its own scripts, styles and API only; images also from data:/blob: URLs (the
#: previews); never framed (clickjacking on the admin buttons).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
NOTICE = ('<p class="notice" role="note">Research use only — not for diagnosis. Predictions have not been '
          'cleared for clinical use.</p>')
#: Slices a view returns at most (a volume's every slice up to this; more are evenly picked).
MAX_VIEW_SLICES = 256


@lru_cache(maxsize=8)
def _page(slug: str, notice: bool) -> str:
    title, body = PAGES[slug]
    layout = (UI / "layout.html").read_text()
    return (layout.replace("{{title}}", title).replace("{{page}}", body)
            .replace("{{notice}}", NOTICE if notice else "")
            .replace("{{body}}", (UI / f"{body}.html").read_text()))


@router.get("/ui", include_in_schema=False)
async def ui_root():
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/static/{name}", include_in_schema=False)
async def ui_static(name: str):
    path = UI / "static" / name
    if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
        raise ApiError(404, "not_found", f"no console file {name!r}")
    return FileResponse(path, media_type=STATIC_TYPES[path.suffix], headers=SECURITY_HEADERS)


@router.get("/ui/", include_in_schema=False)
async def ui_signin(request: Request):
    return await ui_page("", request)


@router.get("/ui/{page}", include_in_schema=False)
async def ui_page(page: str, request: Request):
    if page not in PAGES:
        raise ApiError(404, "not_found", f"no console page {page!r}: {', '.join('/ui/' + p for p in PAGES)}")
    return HTMLResponse(_page(page, request.app.state.server.config.ui_notice), headers=SECURITY_HEADERS)


@router.get("/v1/whoami", response_model=schemas.WhoAmI, responses=schemas.errors(401))
async def whoami(request: Request, key: KeyInfo | None = Depends(api_key)):
    """The caller's tenant and scope (what the console shows and which actions it offers; the server checks
    every admin action again)."""
    if key is None:
        return JSONResponse({"auth": False, "tenant": None, "scope": None})
    return JSONResponse({"auth": True, "tenant": key.tenant, "scope": key.scope})


@router.post("/v1/view", response_model=schemas.View, responses=schemas.errors(400, 401, 413, 422),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary", "minLength": 1}}},
                 "description": "An image file (PNG, JPEG, DICOM, zipped DICOM series, NIfTI, NPY), raw."},
                 "parameters": [
                     {"name": "window", "in": "query", "required": False, "schema": {"type": "string"},
                      "description": "CT window: lung, mediastinum, bone, brain, soft-tissue or CENTER,WIDTH "
                                     "(HU); default: the file's own."},
                     {"name": "filename", "in": "query", "required": False, "schema": {"type": "string"},
                      "description": "The file's name (helps recognise NIfTI and zipped series)."}]})
async def view(request: Request, key: KeyInfo | None = Depends(api_key)):
    """An uploaded image's slices as PNGs under a window, for the console's viewer (no model involved)."""
    from lepton.data.base import resolve_window
    from lepton.data.readers.io import read_image_bytes
    from lepton.errors import DataError
    from lepton.serve.inputs import read_body

    window = request.query_params.get("window") or None
    name = Path(request.query_params.get("filename") or "upload").name[:200] or "upload"
    body = await read_body(request, request.app.state.server.config.max_upload_bytes)
    try:
        resolve_window(window)  # checked whatever the upload (a PNG has no window to apply)
        frames = await asyncio.to_thread(read_image_bytes, body, name, window=window, slices="all")
    except DataError as exc:
        raise ApiError(422, "unreadable_image", str(exc)) from None
    indices = list(range(len(frames)))
    if len(frames) > MAX_VIEW_SLICES:
        indices = np.linspace(0, len(frames) - 1, MAX_VIEW_SLICES).round().astype(int).tolist()
        frames = [frames[i] for i in indices]
    images = await asyncio.to_thread(lambda: [_png(f.pixels) for f in frames])
    return JSONResponse({"name": name, "window": window, "slices": len(images), "images": images,
                         "indices": indices})


def _png(pixels: np.ndarray) -> str:
    """A (C, H, W) frame in [0, 1] as a base64 PNG (gray, or RGB for three channels)."""
    from PIL import Image

    array = np.asarray(pixels, dtype=np.float32)
    array = array.transpose(1, 2, 0) if array.shape[0] == 3 else array.mean(0)
    buf = io.BytesIO()
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@router.get("/v1/monitor", response_model=schemas.MonitorSummary, responses=schemas.errors(401))
async def monitor(request: Request, key: KeyInfo | None = Depends(api_key)):
    """The last hour of the server's own metrics for the models this key may see: request rate, errors, p50/p99
    latency, batch size, queue depth and input drift per interval; predictions per class over the window."""
    from lepton.serve.monitor import parse

    srv = request.app.state.server
    now = parse(srv.metrics_text().decode(), time.time())
    models = {d.name for d in srv.visible(key)}
    return JSONResponse(srv.monitor.summary(now, models))
