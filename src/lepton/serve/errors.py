"""One place for the server's error answers: the native shape ``{"error": {"code", "message"}}`` and the Open
Inference Protocol's ``{"error": "message"}`` (any path under ``/v2``), and the handlers that map exceptions
to them."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lepton.errors import LeptonError, RegistryError


class ApiError(Exception):
    """A client's mistake (or a refusal) with its HTTP status, a stable code, a message and extra headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


async def registry_call(request, method: str, *args, writes: bool = False):
    """A registry call off the event loop, its refusal as the client's answer, never a 500: a read that fails is a
    404 (no such version); a write is 404 when it names a missing version and 409 when the registry refuses the
    change in its state (nothing to roll back to)."""
    import asyncio

    try:
        return await asyncio.to_thread(getattr(request.app.state.server.registry, method), *args)
    except RegistryError as exc:
        missing = not writes or "has no version" in str(exc)
        raise ApiError(404 if missing else 409, "version_not_found" if missing else "conflict", str(exc)) from None


def is_oip(path: str) -> bool:
    return path.startswith("/v2")


def error_response(status: int, code: str, message: str, oip: bool = False,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error body in the shape of the API the request used."""
    body = {"error": message} if oip else {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer ApiError, LeptonError (bad input: 422; an unknown registry version: 404), HTTP errors and request
    validation errors in the shape above."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, is_oip(request.url.path), exc.headers)

    @app.exception_handler(LeptonError)
    async def _lepton_error(request: Request, exc: LeptonError):
        status = 404 if isinstance(exc, RegistryError) and "no such version" in str(exc) else 422
        return error_response(status, "invalid_input", str(exc), is_oip(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # e.g. 404 no route, 405 with its Allow
        code = "payload_too_large" if exc.status_code == 413 else "http_error"  # a chunked body past the limit
        return error_response(exc.status_code, code, str(exc.detail), is_oip(request.url.path),
                              getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", "; ".join(f"{_field(e.get('loc', ()))}: {e.get('msg')}"
                                                                for e in exc.errors()), is_oip(request.url.path))


def _field(loc: tuple) -> str:
    """Where a validation error is: ``weights.1`` in the body, ``query parameter a``."""
    where, *path = [str(part) for part in loc] or ["request"]
    if where == "body":
        return ".".join(path) or "body"
    return f"{where} parameter {'.'.join(path)}" if path else where
