"""Admin actions (admin-scope keys only, checked here on the server): reload every served model from the registry
(and, with several workers, signal the others); promote, roll back and route a served model, each followed by a
reload so the change is served at once."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from lepton.registry.access import KeyInfo
from lepton.serve import schemas
from lepton.serve.deps import admin_key, served_model
from lepton.serve.errors import registry_call

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/reload", response_model=schemas.Reload, responses=schemas.errors(401, 403))
async def reload(request: Request, key: KeyInfo | None = Depends(admin_key)):
    """Resolve every served reference in the registry again and swap in new versions (admin keys only)."""
    return JSONResponse({"changes": await _reloaded(request)})  # other workers follow within RELOAD_WATCH_SECONDS


async def _reloaded(request: Request) -> dict:
    srv = request.app.state.server
    changes = await srv.reload()
    if srv.reload_signal is not None:
        srv.reload_signal.bump()
    return changes


@router.post("/models/{name}/promote", response_model=schemas.StageChange,
             responses=schemas.errors(400, 401, 403, 404, 409, 413, 422))
async def promote(name: str, body: schemas.Promote, request: Request, key=Depends(admin_key),
                  dep=Depends(served_model)):
    """Move a version of a served model to staging or production (the previous holder is archived)."""
    await registry_call(request, "get", f"{name}@{body.version}")
    version = await registry_call(request, "promote", name, body.version, body.stage, writes=True)
    return JSONResponse({"name": name, "version": version.version, "stage": version.stage,
                         "changes": await _reloaded(request)})


@router.post("/models/{name}/rollback", response_model=schemas.StageChange,
             responses=schemas.errors(401, 403, 404, 409))
async def rollback(name: str, request: Request, key=Depends(admin_key), dep=Depends(served_model)):
    """Put the previous production version of a served model back in production."""
    version = await registry_call(request, "rollback", name, writes=True)
    return JSONResponse({"name": name, "version": version.version, "stage": version.stage,
                         "changes": await _reloaded(request)})


@router.put("/models/{name}/route", response_model=schemas.RouteChange,
            responses=schemas.errors(400, 401, 403, 404, 409, 413, 422))
async def route(name: str, body: schemas.RouteRequest, request: Request, key=Depends(admin_key),
                dep=Depends(served_model)):
    """Split a served model's traffic between versions (A/B, canary) and name a shadow version. Weights are relative,
    each from 0 to 1e6 with one above 0; the answer holds the shares of 100 as stored (a share under 0.0001 is left
    out). ``{"weights": {}}`` is refused here (use the primary version alone: ``{"weights": {"N": 1}}``)."""
    weights = {int(version): weight for version, weight in body.weights.items()}  # checked by the schema
    result = await registry_call(request, "set_route", name, weights, body.shadow, writes=True)
    return JSONResponse({"name": name, "weights": {str(v): w for v, w in result.weights.items()},
                         "shadow": result.shadow, "changes": await _reloaded(request)})
