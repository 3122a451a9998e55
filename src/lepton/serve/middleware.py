"""The access middleware: request ids, the upload-size gate (a declared Content-Length over the limit is refused
before the body is read, a chunked body as soon as it passes the limit; either way the rest of the body is drained,
within bounds, before the answer goes out, so the client reads its 413 instead of a reset), request metrics and one
JSON access-log line per request. Plain ASGI rather than ``@app.middleware``: Starlette's BaseHTTPMiddleware runs
every request through an extra task group and response stream, which measurably cost requests/s under load."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from starlette.exceptions import HTTPException

from lepton.serve.errors import error_response

access_log = logging.getLogger("lepton.serve.access")
log = logging.getLogger("lepton.serve")

#: A body the app did not read (refused early: 413, 401, 404) is read and dropped up to this many bytes and seconds
#: before the answer is sent: a client that sends its whole body before reading (urllib, ``Connection: close``)
#: would otherwise see the connection reset instead of the answer. Past either bound the connection just closes.
DRAIN_BYTES = 256 << 20
DRAIN_SECONDS = 15.0


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


class BodyGate:
    """The request body as the app reads it (``receive``): counted against the upload limit, and what was left
    unread drained before the answer starts (``drain``)."""

    __slots__ = ("asked", "done", "expects_continue", "limit", "read", "receive")

    def __init__(self, receive, limit: int, expects_continue: bool):
        self.receive, self.limit, self.expects_continue = receive, limit, expects_continue
        self.read, self.done, self.asked = 0, False, False

    async def __call__(self):
        self.asked = True
        message = await self.receive()
        if message["type"] == "http.request":
            self.read += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
            if self.read > self.limit:  # an HTTPException: FastAPI passes it on while it reads a JSON body
                raise HTTPException(413, f"request body over {self.limit} bytes")
        else:  # the client went away
            self.done = True
        return message

    async def drain(self) -> None:
        """Read and drop the rest of the body, within DRAIN_BYTES and DRAIN_SECONDS. A client waiting for ``100
        Continue`` before it sends is not invited to send a body nobody reads."""
        if self.done or (self.expects_continue and not self.asked):
            return
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                while not self.done and self.read <= DRAIN_BYTES:
                    message = await self.receive()
                    self.read += len(message.get("body", b""))
                    self.done = message["type"] != "http.request" or not message.get("more_body", False)
        except TimeoutError:
            pass


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
        limit = self.server.config.max_upload_bytes
        if scope["path"].startswith("/v1/slide-models/"):  # a whole slide: its own, larger limit
            limit = self.server.config.max_slide_bytes
        length = headers.get(b"content-length", b"")
        gate = None
        if length not in (b"", b"0") or b"transfer-encoding" in headers:  # a body: gated
            gate = BodyGate(receive, limit, headers.get(b"expect", b"").lower() == b"100-continue")
            receive = gate

        async def send_with_id(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                if gate is not None and not gate.done:
                    await gate.drain()
                started, status = True, message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

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
