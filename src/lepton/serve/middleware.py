"""The access middleware: request ids, the upload-size gate, request metrics and one JSON access-log line per
request. Plain ASGI rather than ``@app.middleware``: Starlette's BaseHTTPMiddleware runs every request through
an extra task group and response stream, which measurably cost requests/s under load."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from lepton.serve.errors import error_response

access_log = logging.getLogger("lepton.serve.access")
log = logging.getLogger("lepton.serve")


def json_access_log(stream=None) -> None:
    """Write the access log as bare JSON lines (one object per request, no level or logger prefix) to ``stream``
    (stderr by default), apart from the other logs; idempotent."""
    import sys

    if any(getattr(h, "_lepton_access", False) for h in access_log.handlers):
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._lepton_access = True  # type: ignore[attr-defined]
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


class RequestIds:
    """Request ids unique across processes without a system call per request: a random per-process prefix
    and a counter (``uuid4`` reads the OS entropy source, which also releases and re-takes the GIL)."""

    def __init__(self) -> None:
        self._prefix, self._next = os.urandom(6).hex(), 0

    def __call__(self) -> str:
        self._next += 1  # only ever called on the event loop thread
        return f"{self._prefix}{self._next:012x}"


class AccessMiddleware:
    """Wraps the app: ``scope["state"]`` carries ``request_id`` and ``log`` (fields routes add to the line)."""

    def __init__(self, app, server):
        self.app, self.server = app, server
        self.worker = os.getpid()  # which worker process answered, when several share the port
        self.new_id = RequestIds()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or self.new_id()
        info: dict[str, Any] = {}
        state = scope.setdefault("state", {})
        state["request_id"], state["log"] = request_id, info
        oip = scope["path"].startswith("/v2")
        status = 500
        started = False

        async def send_with_id(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        limit = self.server.config.max_upload_bytes
        length = headers.get(b"content-length", b"")
        try:
            if length.isdigit() and int(length) > limit:
                await error_response(413, "payload_too_large", f"request body over {limit} bytes", oip)(
                    scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:  # a server fault: logged with its request id, answered 500 if nothing was sent yet
            log.exception("request %s failed", request_id)
            if not started:
                await error_response(500, "internal_error", f"internal error (request {request_id})", oip)(
                    scope, receive, send_with_id)
        latency = time.perf_counter() - start
        metrics = self.server.metrics
        if info.get("model"):
            metrics.requests.labels(info["model"], str(info.get("version", "")), str(status)).inc()
            metrics.latency.labels(info["model"]).observe(latency)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(json.dumps({"request_id": request_id, "method": scope["method"], "path": scope["path"],
                                        "status": status, "latency_ms": round(latency * 1000, 2),
                                        "tenant": info.get("tenant"), "model": info.get("model"),
                                        "version": info.get("version"), "worker": self.worker}))
