"""The inference server: native API, Open Inference Protocol v2, API keys and tenants, dynamic batching,
A/B and canary routing with shadow traffic, hot model swaps and Prometheus metrics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import os
import random
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lepton import __version__
from lepton.errors import LeptonError, RegistryError
from lepton.registry import Registry
from lepton.registry.access import KeyInfo
from lepton.serve.adapters import ModelAdapter, make_adapter
from lepton.serve.batching import Batcher, QueueFull
from lepton.serve.metrics import Metrics
from lepton.serve.shared import ReloadSignal, SharedBuckets, spend_token

access_log = logging.getLogger("lepton.serve.access")
log = logging.getLogger("lepton.serve")

#: PNG uploads up to this many pixels are decoded on the event loop: for a small image a thread hand-off (and
#: the GIL contention it brings) costs more than the decode itself (measured with benchmarks/serve_load.py).
#: Larger PNGs, other rasters, DICOM, NIfTI and NPY are decoded in a thread.
INLINE_DECODE_PIXELS = 256 * 256


def _decodes_inline(data: bytes) -> bool:
    """A small PNG, judged from its IHDR chunk before any decoding, and no bigger on the wire than its
    pixels would be raw (a small image padded with megabytes of chunks goes to a thread)."""
    if not 24 <= len(data) <= 4 * INLINE_DECODE_PIXELS + 4096:
        return False
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return False
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return width * height <= INLINE_DECODE_PIXELS


async def decode_upload(adapter: ModelAdapter, data: bytes, filename: str | None) -> np.ndarray:
    """Decode an uploaded file with ``adapter``: small PNGs inline, everything else off the event loop."""
    if _decodes_inline(data):
        return adapter.decode_request(data, filename)
    return await asyncio.to_thread(adapter.decode_request, data, filename)


def _freeze_heap() -> None:
    """Collect, then move every object alive now (libraries, models) out of the garbage collector's sight.

    A full collection walks every tracked object: with torch, FastAPI and a model loaded that is ~400,000
    objects and ~200 ms with the event loop stopped, which under load came about every 20 s and made the
    p99 latency. After ``gc.freeze`` a collection walks only what was allocated since; frozen objects are
    still freed by reference counting (a retired model goes when its last reference does).
    """
    import gc

    gc.collect()  # cheap after the first freeze: only the unfrozen objects are walked
    gc.freeze()


class _RequestIds:
    """Request ids unique across processes without a system call per request: a random per-process prefix
    and a counter (``uuid4`` reads the OS entropy source, which also releases and re-takes the GIL)."""

    def __init__(self) -> None:
        self._prefix, self._next = os.urandom(6).hex(), 0

    def __call__(self) -> str:
        self._next += 1  # only ever called on the event loop thread
        return f"{self._prefix}{self._next:012x}"


@dataclass
class ServeConfig:
    """How the server runs; ``models`` are registry references (``name``, ``name@3``, ``name@production``)."""

    models: list[str]
    registry: str | None = None
    auth: bool = True
    backend: str = "auto"
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    batch_idle_ms: float = 0.0  # > 0: a batch also closes when no request arrived for this long
    max_queue: int = 256
    max_upload_bytes: int = 32 << 20
    rate_limit: float = 50.0  # requests per second per key; 0 disables
    rate_burst: int = 100
    poll_seconds: float = 0.0  # 0: swaps only through POST /v1/admin/reload
    key_cache_seconds: float = 2.0  # how long an accepted API key is trusted before it is checked again
    shared_dir: str | None = None  # set by `serve` for worker processes: rate limits and reloads shared there
    freeze_heap: bool = True  # gc.freeze() after models load: no full-heap garbage collection pauses under load


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass
class Handle:
    adapter: ModelAdapter
    batcher: Batcher


@dataclass
class Deployment:
    name: str
    selector: str | None
    primary: int = 0
    handles: dict[int, Handle] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    shadow: int | None = None
    tenant: str | None = None
    train_intensity: dict[str, float] = field(default_factory=dict)
    drift_mean: float | None = None

    def choose(self, client: str | None) -> int:
        """The version for one request: route weights (sticky per client id) or the primary version."""
        if not self.weights:
            return self.primary
        point = (int(hashlib.sha256(client.encode()).hexdigest()[:8], 16) % 10_000) / 100 if client \
            else random.uniform(0, 100)
        acc = 0.0
        for version, weight in sorted(self.weights.items()):
            acc += weight
            if point < acc:
                return version
        return max(self.weights)


class TokenBucket:
    def __init__(self, rate: float, burst: int):
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, float(burst), time.monotonic()

    def take(self) -> float:
        """0 when allowed, else the seconds until a token is available."""
        now = time.monotonic()
        self.tokens, wait = spend_token(self.tokens, now - self.stamp, self.rate, self.burst)
        self.stamp = now
        return wait


class Server:
    """State shared by the routes: the registry, the deployments and the metrics."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.registry = Registry.open(config.registry)
        self.metrics = Metrics()
        self.deployments: dict[str, Deployment] = {}
        self.buckets: dict[str, TokenBucket] = {}
        # Several workers: token buckets in a shared file (a key's limit holds whichever worker answers) and a
        # reload generation that carries an admin reload to every worker.
        shared = Path(config.shared_dir) if config.shared_dir else None
        self.shared_buckets = (SharedBuckets(shared / "rate-limits.bin", config.rate_limit, config.rate_burst)
                               if shared and config.rate_limit > 0 else None)
        self.reload_signal = ReloadSignal(shared / "reload-generation") if shared else None
        self._keys: dict[bytes, tuple[KeyInfo, float]] = {}
        self.ready = False
        self._reload_lock = asyncio.Lock()
        self._heap_grew = False  # a version was loaded since the heap was last frozen
        self._explain_lock = threading.Lock()

    async def reload(self) -> dict[str, Any]:
        """Resolve every served reference again; load new versions, swap them in, drain the old ones."""
        async with self._reload_lock:
            changes = {}
            for ref in self.config.models:
                name, _, selector = ref.partition("@")
                dep = self.deployments.get(name) or Deployment(name, selector or None)
                try:
                    changes[name] = await self._refresh(dep)
                except LeptonError as exc:
                    if name not in self.deployments:
                        raise
                    log.error("reload of %s failed, keeping version %s: %s", name, dep.primary, exc)
                    changes[name] = {"error": str(exc)}
                self.deployments[name] = dep
            if self._heap_grew and self.config.freeze_heap:
                _freeze_heap()
                self._heap_grew = False
            self.ready = True
            return changes

    async def _refresh(self, dep: Deployment) -> dict[str, Any]:
        reg = self.registry
        ref = f"{dep.name}@{dep.selector}" if dep.selector else dep.name
        version = await asyncio.to_thread(lambda: reg.get(ref))
        route = await asyncio.to_thread(reg.get_route, dep.name)
        dep.tenant = await asyncio.to_thread(reg.tenant_of, dep.name)
        dep.train_intensity = version.data_fingerprint.get("intensity", {})
        wanted = {version.version, *(route.weights if route else {})}
        if route and route.shadow is not None:
            wanted.add(route.shadow)
        handles = dict(dep.handles)
        for v in sorted(wanted - set(handles)):
            handles[v] = await self._load(dep.name, v)
        old = {v: h for v, h in handles.items() if v not in wanted}
        before = dep.primary
        # One assignment each: a request sees either the old or the new set, never a mix.
        dep.handles = {v: h for v, h in handles.items() if v in wanted}
        dep.primary = version.version
        dep.weights = dict(route.weights) if route else {}
        dep.shadow = route.shadow if route else None
        for v, h in old.items():
            asyncio.get_running_loop().create_task(h.batcher.drain_and_stop())
            log.info("%s@%s retired", dep.name, v)
        return {"primary": dep.primary, "previous": before or None, "weights": dep.weights, "shadow": dep.shadow,
                "loaded": sorted(dep.handles)}

    async def _load(self, name: str, version: int) -> Handle:
        adapter = make_adapter(self.registry, f"{name}@{version}", self.config.backend)
        await asyncio.to_thread(adapter.setup)
        m = self.metrics

        def on_batch(size: int, seconds: float) -> None:
            m.batch_size.labels(name, str(version)).observe(size)
            m.model_latency.labels(name, str(version)).observe(seconds)
            m.queue_depth.labels(name, str(version)).set(batcher.depth)  # kept current for other workers' scrapes

        batcher = Batcher(adapter.prepare, adapter.predict, max_batch_size=self.config.max_batch_size,
                          max_wait_ms=self.config.max_wait_ms, max_queue=self.config.max_queue,
                          idle_ms=self.config.batch_idle_ms, on_batch=on_batch)
        batcher.start()
        self._heap_grew = True
        log.info("%s@%s loaded (%s) in process %d", name, version, adapter.platform, os.getpid())
        return Handle(adapter, batcher)

    # -- access ------------------------------------------------------------------------------------
    def authenticate(self, request: Request) -> KeyInfo | None:
        if not self.config.auth:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"})
        info = self._verify(token.strip())
        if info is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
        return info

    def _verify(self, token: str) -> KeyInfo | None:
        """``Registry.verify_key`` behind a short cache of accepted keys (by digest, never the key itself),
        so a request does not cost a database query; a revoked key stops working within ``key_cache_seconds``."""
        ttl = self.config.key_cache_seconds
        if ttl <= 0:
            return self.registry.verify_key(token)
        digest = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        hit = self._keys.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        info = self.registry.verify_key(token)
        if info is None:
            self._keys.pop(digest, None)
            return None
        if len(self._keys) >= 10_000:  # bounded: keep only entries still valid, or start afresh
            self._keys = {k: v for k, v in self._keys.items() if v[1] > now}
            if len(self._keys) >= 10_000:
                self._keys.clear()
        self._keys[digest] = (info, now + ttl)
        return info

    def rate_limit(self, key: KeyInfo | None, request: Request) -> None:
        if self.config.rate_limit <= 0:
            return
        ident = key.key_id if key else (request.client.host if request.client else "anonymous")
        if self.shared_buckets is not None:
            wait = self.shared_buckets.take(ident)
        else:
            wait = self.buckets.setdefault(ident, TokenBucket(self.config.rate_limit, self.config.rate_burst)).take()
        if wait:
            raise ApiError(429, "rate_limited", "rate limit exceeded for this API key",
                           {"Retry-After": str(max(1, math.ceil(wait)))})

    def deployment(self, name: str, key: KeyInfo | None) -> Deployment:
        dep = self.deployments.get(name)
        visible = dep is not None and (key is None or key.scope == "admin" or dep.tenant in (None, key.tenant))
        if not visible:
            raise ApiError(404, "model_not_found", f"no served model named {name!r}")
        return dep

    def visible(self, key: KeyInfo | None) -> list[Deployment]:
        return [d for n, d in sorted(self.deployments.items())
                if key is None or key.scope == "admin" or d.tenant in (None, key.tenant)]

    # -- inference -----------------------------------------------------------------------------------
    async def infer(self, dep: Deployment, pixels: np.ndarray, client: str | None,
                    version: int | None = None) -> tuple[int, np.ndarray]:
        chosen = version if version is not None else dep.choose(client)
        handle = dep.handles.get(chosen)
        if handle is None:
            raise ApiError(404, "version_not_served", f"{dep.name} version {chosen} is not being served")
        try:
            probs = await handle.batcher.submit(pixels)
        except QueueFull:
            self.metrics.rejected.labels(dep.name).inc()
            raise ApiError(503, "overloaded", f"{dep.name} is at capacity; retry shortly", {"Retry-After": "1"}) \
                from None
        self._record(dep, chosen, pixels, handle.adapter, probs)
        if dep.shadow is not None and dep.shadow != chosen and dep.shadow in dep.handles:
            asyncio.get_running_loop().create_task(self._shadow(dep, pixels, probs))
        return chosen, probs

    async def _shadow(self, dep: Deployment, pixels: np.ndarray, served: np.ndarray) -> None:
        handle = dep.handles.get(dep.shadow)
        if handle is None:
            return
        try:
            probs = await handle.batcher.submit(pixels)
        except Exception as exc:  # shadow failures are recorded, never surfaced to clients
            self.metrics.shadow.labels(dep.name, str(dep.shadow), "error").inc()
            log.warning("shadow %s@%s failed: %s", dep.name, dep.shadow, type(exc).__name__)
            return
        agree = int(np.argmax(probs)) == int(np.argmax(served))
        self.metrics.shadow.labels(dep.name, str(dep.shadow), "agree" if agree else "disagree").inc()

    def explain(self, adapter, pixels: np.ndarray, method: str, class_idx: int) -> bytes:
        with self._explain_lock:  # Grad-CAM hooks the shared model: one explanation at a time
            return adapter.explain(pixels, method, class_idx)

    def _record(self, dep: Deployment, version: int, pixels: np.ndarray, adapter: ModelAdapter,
                probs: np.ndarray) -> None:
        m = self.metrics
        m.predictions.labels(dep.name, str(version), adapter.labels[adapter.decide(probs)]).inc()
        mean = float(pixels.mean())
        dep.drift_mean = mean if dep.drift_mean is None else 0.98 * dep.drift_mean + 0.02 * mean
        ref = dep.train_intensity
        if ref.get("std_of_image_means"):
            m.drift.labels(dep.name).set(abs(dep.drift_mean - ref["mean"]) / ref["std_of_image_means"])


class AccessMiddleware:
    """Request ids, the upload-size gate, metrics and one JSON access-log line per request.

    Plain ASGI rather than ``@app.middleware``: Starlette's BaseHTTPMiddleware runs every request through
    an extra task group and response stream, which measurably cost requests/s under load.
    """

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        self.worker = os.getpid()  # which worker process answered, when several share the port
        self.new_id = _RequestIds()

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
                await _error(413, "payload_too_large", f"request body over {limit} bytes", oip)(
                    scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:  # a server fault: logged with its request id, answered 500 if nothing was sent yet
            log.exception("request %s failed", request_id)
            if not started:
                await _error(500, "internal_error", f"internal error (request {request_id})", oip)(
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


def _error(status: int, code: str, message: str, oip: bool = False,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": message} if oip else {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


#: How often a worker checks whether another worker was asked to reload (with several workers).
RELOAD_WATCH_SECONDS = 0.25

#: Environment variable that carries the ServeConfig (JSON) to worker processes started by uvicorn.
CONFIG_ENV = "LEPTON_SERVE_CONFIG"


def create_app_from_env() -> FastAPI:
    """The app for a worker process: ``ServeConfig`` from ``$LEPTON_SERVE_CONFIG`` (see ``lepton.serve.serve``)."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{CONFIG_ENV} is not set; start workers with `lepton serve --workers N`")
    # A spawned worker starts with bare logging: the same format as the CLI, to stderr.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return create_app(ServeConfig(**json.loads(raw)))


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI application for ``config`` (models load at start-up)."""
    server = Server(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.reload()
        poller = None
        if config.poll_seconds > 0:
            async def poll() -> None:
                while True:
                    await asyncio.sleep(config.poll_seconds)
                    try:
                        await server.reload()
                    except Exception as exc:  # the next poll tries again; serving continues
                        log.error("registry poll failed: %s", exc)
            poller = asyncio.get_running_loop().create_task(poll())
        watcher = None
        if server.reload_signal is not None:
            async def watch() -> None:  # another worker answered an admin reload: reload here too
                while True:
                    await asyncio.sleep(RELOAD_WATCH_SECONDS)
                    try:
                        if server.reload_signal.changed():
                            await server.reload()
                    except Exception as exc:
                        log.error("reload requested by another worker failed: %s", exc)
            watcher = asyncio.get_running_loop().create_task(watch())
        yield
        for task in (poller, watcher):
            if task:
                task.cancel()
        for dep in server.deployments.values():
            for handle in dep.handles.values():
                await handle.batcher.drain_and_stop(timeout=5)
        if server.shared_buckets is not None:
            server.shared_buckets.close()

    app = FastAPI(title="Lepton inference server", version=__version__, lifespan=lifespan)
    app.state.server = server

    def error(status: int, code: str, message: str, headers: dict[str, str] | None = None,
              oip: bool = False) -> JSONResponse:
        return _error(status, code, message, oip, headers)

    def is_oip(request: Request) -> bool:
        return request.url.path.startswith("/v2")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.code, exc.message, exc.headers, is_oip(request))

    @app.exception_handler(LeptonError)
    async def _lepton_error(request: Request, exc: LeptonError):
        status = 404 if isinstance(exc, RegistryError) and "no such version" in str(exc) else 422
        return error(status, "invalid_input", str(exc), oip=is_oip(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, "http_error", str(exc.detail), oip=is_oip(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error(422, "invalid_request", "; ".join(str(e.get("msg")) for e in exc.errors()), oip=is_oip(request))

    app.add_middleware(AccessMiddleware, server=server)

    async def read_body(request: Request) -> bytes:
        body = await request.body()
        if len(body) > config.max_upload_bytes:
            raise ApiError(413, "payload_too_large", f"request body over {config.max_upload_bytes} bytes")
        if not body:
            raise ApiError(400, "empty_body", "the request body is empty")
        return body

    async def decode(request: Request, adapter: ModelAdapter) -> np.ndarray:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            await read_body(request)
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "missing_file", "multipart requests need a 'file' field")
            data = await upload.read()
            if not data:
                raise ApiError(400, "empty_file", "the uploaded file is empty")
            return await decode_upload(adapter, data, upload.filename)
        body = await read_body(request)
        if ctype.startswith("application/json"):
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from exc
            if not isinstance(payload, dict) or not ({"image", "array"} & set(payload)):
                raise ApiError(422, "invalid_request", "JSON body needs 'image' (base64 file) or 'array' (nested list)")
            if "image" in payload:
                try:
                    data = base64.b64decode(str(payload["image"]), validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise ApiError(422, "invalid_base64", f"'image' is not valid base64: {exc}") from exc
                return await decode_upload(adapter, data, payload.get("filename"))
            return adapter.decode_array(payload["array"])
        return await decode_upload(adapter, body, request.headers.get("x-filename"))

    # -- native API ---------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not server.ready:
            return error(503, "not_ready", "models are loading")
        return {"status": "ready", "models": {n: d.primary for n, d in server.deployments.items()}}

    @app.get("/metrics")
    async def metrics():
        for dep in server.deployments.values():
            for v, h in dep.handles.items():
                server.metrics.queue_depth.labels(dep.name, str(v)).set(h.batcher.depth)
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    def describe(dep: Deployment) -> dict[str, Any]:
        adapter = dep.handles[dep.primary].adapter
        spec = adapter.preprocessing
        return {"name": dep.name, "version": dep.primary, "platform": adapter.platform, "labels": adapter.labels,
                "threshold": adapter.threshold, "served_versions": sorted(dep.handles), "route": dep.weights or None,
                "shadow": dep.shadow, "input": {"size": list(spec.size), "channels": spec.channels,
                                                "window": spec.window}}

    @app.get("/v1/models")
    async def list_models(request: Request):
        key = server.authenticate(request)
        return {"models": [describe(d) for d in server.visible(key)]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str, request: Request):
        key = server.authenticate(request)
        dep = server.deployment(name, key)
        versions = await asyncio.to_thread(server.registry.list, name)
        card = await asyncio.to_thread(server.registry.card, f"{name}@{dep.primary}")
        return {**describe(dep), "versions": [{"version": v.version, "stage": v.stage, "format": v.format,
                                               "created_at": v.created_at, "metrics": {
                                                   "val_auc": v.metrics.get("val_auc"),
                                                   "val_acc": v.metrics.get("val_acc")}} for v in versions],
                "card_summary": "\n".join(card.splitlines()[:12])}

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, request: Request):
        start = time.perf_counter()
        key = server.authenticate(request)
        request.state.log.update(tenant=key.tenant if key else None, model=name)
        server.rate_limit(key, request)
        dep = server.deployment(name, key)
        adapter = dep.handles[dep.primary].adapter
        pixels = await decode(request, adapter)
        version, probs = await server.infer(dep, pixels, request.headers.get("x-lepton-client"))
        request.state.log["version"] = version
        served = (dep.handles.get(version) or dep.handles[dep.primary]).adapter
        body = served.encode_response(probs)
        method = request.query_params.get("explain")
        if method is not None:
            if method not in ("gradcam", "gradcam++"):
                raise ApiError(422, "invalid_request", "explain must be gradcam or gradcam++")
            if not hasattr(served, "explain"):
                raise ApiError(422, "invalid_request", f"{name}@{version} is served with ONNX Runtime; "
                                                       "explanations need the PyTorch backend")
            png = await asyncio.to_thread(server.explain, served, pixels, method, served.decide(probs))
            body["explanation"] = {"method": method, "class": body["label"],
                                   "overlay_png_base64": base64.b64encode(png).decode()}
        # A ready-made response skips FastAPI's generic encoder: the body is plain JSON types already.
        return JSONResponse({**body, "model": name, "version": version, "request_id": request.state.request_id,
                             "latency_ms": round((time.perf_counter() - start) * 1000, 2)})

    @app.post("/v1/admin/reload")
    async def admin_reload(request: Request):
        key = server.authenticate(request)
        if key is not None and key.scope != "admin":
            raise ApiError(403, "forbidden", "this action needs an admin-scope key")
        changes = await server.reload()
        if server.reload_signal is not None:
            server.reload_signal.bump()  # the other workers follow within RELOAD_WATCH_SECONDS
        return {"changes": changes}

    # -- Open Inference Protocol v2 -----------------------------------------------------------------
    @app.get("/v2")
    async def oip_server_metadata():
        return {"name": "lepton", "version": __version__, "extensions": []}

    @app.get("/v2/health/live")
    async def oip_live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def oip_ready():
        if not server.ready:
            return JSONResponse({"ready": False}, status_code=400)
        return {"ready": True}

    def oip_target(name: str, version: str | None, request: Request) -> tuple[Deployment, int, KeyInfo | None]:
        key = server.authenticate(request)
        dep = server.deployment(name, key)
        if version is None:
            return dep, dep.primary, key
        if not version.isdigit() or int(version) not in dep.handles:
            raise ApiError(404, "version_not_served", f"{name} version {version} is not being served")
        return dep, int(version), key

    def oip_metadata(dep: Deployment, version: int) -> dict[str, Any]:
        adapter = dep.handles[version].adapter
        c, (h, w) = adapter.preprocessing.channels, adapter.preprocessing.size
        return {"name": dep.name, "versions": [str(v) for v in sorted(dep.handles)], "platform": adapter.platform,
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(adapter.labels)]},
                            {"name": "label", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"labels": adapter.labels, "threshold": adapter.threshold,
                               "input_range": "[0, 1] before the model's normalisation"}}

    @app.get("/v2/models/{name}")
    async def oip_model(name: str, request: Request):
        dep, version, _ = oip_target(name, None, request)
        return oip_metadata(dep, version)

    @app.get("/v2/models/{name}/versions/{version}")
    async def oip_model_version(name: str, version: str, request: Request):
        dep, v, _ = oip_target(name, version, request)
        return oip_metadata(dep, v)

    @app.get("/v2/models/{name}/ready")
    async def oip_model_ready(name: str, request: Request):
        oip_target(name, None, request)
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def oip_model_version_ready(name: str, version: str, request: Request):
        oip_target(name, version, request)
        return {"name": name, "ready": True}

    async def oip_infer(name: str, version: str | None, request: Request):
        dep, v, key = oip_target(name, version, request)
        request.state.log.update(tenant=key.tenant if key else None, model=name, version=v)
        server.rate_limit(key, request)
        try:
            payload = json.loads(await read_body(request))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from exc
        inputs = payload.get("inputs") if isinstance(payload, dict) else None
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise ApiError(400, "invalid_request", "'inputs' must hold exactly one tensor named 'input'")
        tensor = inputs[0]
        adapter = dep.handles[v].adapter
        c, (h, w) = adapter.preprocessing.channels, adapter.preprocessing.size
        if tensor.get("datatype") != "FP32":
            raise ApiError(400, "invalid_request", f"input datatype must be FP32 (got {tensor.get('datatype')!r})")
        shape = tensor.get("shape")
        if not (isinstance(shape, list) and len(shape) == 4 and shape[1:] == [c, h, w] and isinstance(shape[0], int)
                and 1 <= shape[0] <= 1024):
            raise ApiError(400, "invalid_request", f"input shape must be [N, {c}, {h}, {w}] with 1 <= N <= 1024 "
                                                   f"(got {shape})")
        try:
            data = np.asarray(tensor.get("data"), dtype=np.float32).reshape(shape)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, "invalid_request", f"input data does not match shape {shape}: {exc}") from exc
        if not np.isfinite(data).all() or data.min() < 0 or data.max() > 1:
            raise ApiError(400, "invalid_request", "input values must be finite and within [0, 1]")
        results = await asyncio.gather(*(server.infer(dep, img, None, version=v) for img in data))
        probs = np.stack([p for _, p in results])
        labels = [adapter.labels[adapter.decide(p)] for p in probs]
        requested = {o.get("name") for o in payload.get("outputs") or [] if isinstance(o, dict)} \
            or {"probabilities", "label"}
        outputs = []
        if "probabilities" in requested:
            outputs.append({"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
                            "data": probs.astype(float).ravel().tolist()})
        if "label" in requested:
            outputs.append({"name": "label", "datatype": "BYTES", "shape": [len(labels)], "data": labels})
        return JSONResponse({"model_name": name, "model_version": str(v),
                             "id": str(payload.get("id") or request.state.request_id), "outputs": outputs})

    @app.post("/v2/models/{name}/infer")
    async def oip_infer_default(name: str, request: Request):
        return await oip_infer(name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def oip_infer_version(name: str, version: str, request: Request):
        return await oip_infer(name, version, request)

    return app
