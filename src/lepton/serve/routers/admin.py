"""Admin actions: reload every served model from the registry (and, with several workers, signal the others)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from lepton.registry.access import KeyInfo
from lepton.serve import schemas
from lepton.serve.deps import admin_key

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/reload", response_model=schemas.Reload, responses=schemas.errors(401, 403))
async def reload(request: Request, key: KeyInfo | None = Depends(admin_key)):
    """Resolve every served reference in the registry again and swap in new versions (admin keys only)."""
    srv = request.app.state.server
    changes = await srv.reload()
    if srv.reload_signal is not None:
        srv.reload_signal.bump()  # the other workers follow within RELOAD_WATCH_SECONDS
    return JSONResponse({"changes": changes})
