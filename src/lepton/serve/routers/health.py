"""Liveness, readiness and Prometheus metrics (no authentication: probes and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lepton.serve import schemas
from lepton.serve.errors import error_response

router = APIRouter(tags=["health"])

#: The Prometheus text exposition format.
PROMETHEUS = "text/plain; version=0.0.4"


@router.get("/healthz", response_model=schemas.Health)
async def healthz():
    """The process is up."""
    return JSONResponse({"status": "ok"})


@router.get("/readyz", response_model=schemas.Ready,
            responses=schemas.errors(503, retry_after_503=False))
async def readyz(request: Request):
    """Every served model is loaded; 503 while they load."""
    srv = request.app.state.server
    if not srv.ready:
        return error_response(503, "not_ready", "models are loading")
    return JSONResponse({"status": "ready", "models": {n: d.primary for n, d in srv.deployments.items()}})


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus metrics (text exposition format 0.0.4).",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request):
    """Request counts and latency, batch sizes, queue depth, predictions per label, input drift."""
    return Response(request.app.state.server.metrics_text(), media_type=PROMETHEUS)
