"""FastAPI dependencies: the server state, the caller's API key, admin scope, rate limits and the tenant
check on a served model. Routes declare them in the order their errors take precedence (401, 403/429, 404)."""

from __future__ import annotations

from fastapi import Depends, Request

from lepton.registry.access import KeyInfo
from lepton.serve.errors import ApiError
from lepton.serve.state import Deployment, Server


def server(request: Request) -> Server:
    return request.app.state.server


async def api_key(request: Request) -> KeyInfo | None:
    """The caller's key (None when authentication is off); 401 without a valid one."""
    return request.app.state.server.authenticate(request.headers.get("authorization", ""))


async def admin_key(key: KeyInfo | None = Depends(api_key)) -> KeyInfo | None:
    """An admin-scope key; 403 for any other."""
    if key is not None and key.scope != "admin":
        raise ApiError(403, "forbidden", "this action needs an admin-scope key")
    return key


async def rate_limited_key(request: Request, key: KeyInfo | None = Depends(api_key)) -> KeyInfo | None:
    """The caller's key after its rate limit (429 when over); names the tenant and model in the access log."""
    request.state.log.update(tenant=key.tenant if key else None, model=request.path_params.get("name"))
    request.app.state.server.rate_limit(key, request.client.host if request.client else None)
    return key


async def served_model(request: Request, name: str, key: KeyInfo | None = Depends(api_key)) -> Deployment:
    """The served model ``name`` if the key's tenant may see it; 404 otherwise."""
    return request.app.state.server.deployment(name, key)


async def served_version(request: Request, dep: Deployment = Depends(served_model)) -> tuple[Deployment, int]:
    """The model and the version the path names (``…/versions/{version}/…``), or its primary version; 404 when
    that version is not served."""
    return dep, dep.version(request.path_params.get("version"))
