"""Access checks: the caller's API key, admin scope, the tenant check on a served model, and, for the two
inference routes, all of it with the rate limit in one step (``predict_target``, ``infer_target``).

The cold routes take these as FastAPI dependencies. Each is a single ``async def`` without sub-dependencies: a
plain ``def`` dependency would run in FastAPI's thread pool. The two inference routes call their check directly:
a dependency makes FastAPI solve a second set of parameters on every request (~60 µs with 64 concurrent clients,
measured), more than the check itself."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from lepton.registry.access import KeyInfo
from lepton.serve.errors import ApiError
from lepton.serve.state import Deployment, Server


@dataclass
class Target:
    """What an inference request may use: the server, the caller's key, the model and the version asked for."""

    server: Server
    key: KeyInfo | None
    deployment: Deployment
    version: int | None


def _key(request: Request) -> KeyInfo | None:
    server = request.app.state.server
    if not server.config.auth:
        return None
    return server.authenticate(request.headers.get("authorization", ""))


def _rate_limit(request: Request, key: KeyInfo | None) -> None:
    """Name the tenant and model in the access log, then spend a token (429 when over the limit)."""
    request.scope["state"]["log"].update(tenant=key.tenant if key else None, model=request.path_params.get("name"))
    server = request.app.state.server
    if server.limiter.rate > 0:
        server.rate_limit(key, request.client.host if request.client else None)


async def api_key(request: Request) -> KeyInfo | None:
    """The caller's key (None when authentication is off); 401 without a valid one."""
    return _key(request)


async def admin_key(request: Request) -> KeyInfo | None:
    """An admin-scope key: 401 without a valid key, 403 for any other scope."""
    key = _key(request)
    if key is not None and key.scope != "admin":
        raise ApiError(403, "forbidden", "this action needs an admin-scope key")
    return key


async def served_model(request: Request) -> Deployment:
    """The served model the path names, if the key's tenant may see it: 401, then 404."""
    return request.app.state.server.deployment(request.path_params["name"], _key(request))


async def served_version(request: Request) -> tuple[Deployment, int]:
    """The model and the version the path names (``…/versions/{version}/…``), else its primary version; 404 when
    that version is not served."""
    dep = await served_model(request)
    return dep, dep.version(request.path_params.get("version"))


async def predict_target(request: Request) -> Target:
    """The native predict route's checks in their order: 401, 429, 404. The version is routed later (A/B)."""
    key = _key(request)
    _rate_limit(request, key)
    server = request.app.state.server
    return Target(server, key, server.deployment(request.path_params["name"], key), None)


async def infer_target(request: Request) -> Target:
    """The OIP infer route's checks in their order: 401, 404 (model, then version), 429."""
    key = _key(request)
    server = request.app.state.server
    dep = server.deployment(request.path_params["name"], key)
    version = dep.version(request.path_params.get("version"))
    request.scope["state"]["log"]["version"] = version
    _rate_limit(request, key)
    return Target(server, key, dep, version)
