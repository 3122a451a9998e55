"""Liveness, readiness and Prometheus metrics (no authentication: probes and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from lepton.serve.errors import error_response

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    srv = request.app.state.server
    if not srv.ready:
        return error_response(503, "not_ready", "models are loading")
    return {"status": "ready", "models": {n: d.primary for n, d in srv.deployments.items()}}


@router.get("/metrics")
async def metrics(request: Request):
    srv = request.app.state.server
    for dep in srv.deployments.values():
        for v, h in dep.handles.items():
            srv.metrics.queue_depth.labels(dep.name, str(v)).set(h.batcher.depth)
    return Response(srv.metrics.render(), media_type="text/plain; version=0.0.4")
