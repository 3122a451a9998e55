"""The server's state, testable without HTTP: the deployments of the served models (versions loaded, each
with its batcher), routing (A/B and canary weights, shadow traffic), hot reloads from the registry,
inference with its metrics, and the key cache and rate limiter the routes consult."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import LeptonError
from lepton.registry import Registry
from lepton.registry.access import KeyInfo
from lepton.serve import frames
from lepton.serve.adapters import ModelAdapter, make_adapter
from lepton.serve.auth import KeyCache, RateLimiter
from lepton.serve.batching import Batcher, QueueFull, model_concurrency
from lepton.serve.config import ServeConfig
from lepton.serve.errors import ApiError
from lepton.serve.metrics import Metrics
from lepton.serve.monitor import Monitor
from lepton.serve.monitor import parse as parse_metrics
from lepton.serve.shared import ReloadSignal
from lepton.serve.slides import SlideJobs

log = logging.getLogger("lepton.serve")


def freeze_heap() -> None:
    """Collect, then move every object alive now (libraries, models) out of the garbage collector's sight.

    A full collection walks every tracked object: with torch, FastAPI and a model loaded that is ~400,000
    objects and ~200 ms with the event loop stopped, which under load came about every 20 s and made the
    p99 latency. After ``gc.freeze`` a collection walks only what was allocated since; frozen objects are
    still freed by reference counting (a retired model goes when its last reference does).
    """
    import gc

    gc.collect()  # cheap after the first freeze: only the unfrozen objects are walked
    gc.freeze()


@dataclass
class Handle:
    adapter: ModelAdapter
    batcher: Batcher
    windows: Batcher | None = None  # sliding windows of a task answering on the input's grid, batched across requests

    def batchers(self) -> list[Batcher]:
        return [b for b in (self.batcher, self.windows) if b is not None]


@dataclass
class Deployment:
    """One served model name: the versions loaded, the primary one, route weights, shadow and tenant."""

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

    def version(self, version: str | None) -> int:
        """A served version by its path segment, or the primary one; ApiError 404 otherwise."""
        if version is None:
            return self.primary
        if not version.isdigit() or int(version) not in self.handles:
            raise ApiError(404, "version_not_served", f"{self.name} version {version} is not being served")
        return int(version)


class Server:
    """State shared by the routes: the registry, the deployments, the metrics, the key cache and rate limits."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.registry = Registry.open(config.registry)
        self.metrics = Metrics()
        self.monitor = Monitor()
        self.deployments: dict[str, Deployment] = {}
        self.slides = SlideJobs(self.registry, config)  # slide models: served as jobs, not through batchers
        # Several workers: token buckets in a shared file (a key's limit holds whichever worker answers) and a
        # reload generation that carries an admin reload to every worker.
        # Replicas on several hosts: both in Redis instead.
        shared = Path(config.shared_dir) if config.shared_dir else None
        self.keys = KeyCache(self.registry, config.key_cache_seconds)
        if config.redis:
            from lepton.serve.redis_store import RedisBuckets, RedisReloadSignal, connect

            client = connect(config.redis)
            store = RedisBuckets(client, config.rate_limit, config.rate_burst, config.redis_prefix) if (
                config.rate_limit > 0) else None
            self.limiter = RateLimiter(config.rate_limit, config.rate_burst, store=store)
            self.reload_signal = RedisReloadSignal(client, config.redis_prefix)
        else:
            self.limiter = RateLimiter(config.rate_limit, config.rate_burst,
                                       shared / "rate-limits.bin" if shared else None)
            self.reload_signal = ReloadSignal(shared / "reload-generation") if shared else None
        self.ready = False
        self._reload_lock = asyncio.Lock()
        self._heap_grew = False  # a version was loaded since the heap was last frozen
        self._explain_lock = threading.Lock()

    # -- models -------------------------------------------------------------------------------------------
    async def reload(self) -> dict[str, Any]:
        """Resolve every served reference again; load new versions, swap them in, drain the old ones."""
        async with self._reload_lock:
            changes = {}
            for ref in self.config.models:
                name, _, selector = ref.partition("@")
                dep = self.deployments.get(name) or Deployment(name, selector or None)
                slide = None
                try:
                    slide = None if name in self.deployments else await self.slides.refresh(ref)
                    changes[name] = slide or await self._refresh(dep)
                except LeptonError as exc:
                    if name not in self.deployments and name not in self.slides.models:
                        raise
                    log.error("reload of %s failed, keeping version %s: %s", name, dep.primary, exc)
                    changes[name] = {"error": str(exc)}
                if slide is None and name not in self.slides.models:
                    self.deployments[name] = dep
            if self._heap_grew and self.config.freeze_heap:
                freeze_heap()
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
            for b in h.batchers():
                asyncio.get_running_loop().create_task(b.drain_and_stop())
            log.info("%s@%s retired", dep.name, v)
        return {"primary": dep.primary, "previous": before or None, "weights": dep.weights, "shadow": dep.shadow,
                "loaded": sorted(dep.handles)}

    async def _load(self, name: str, version: int) -> Handle:
        adapter = await asyncio.to_thread(make_adapter, self.registry, f"{name}@{version}", self.config.backend,
                                          self.config.precision)
        await asyncio.to_thread(adapter.setup)
        m = self.metrics

        def on_batch(size: int, seconds: float) -> None:
            m.batch_size.labels(name, str(version)).observe(size)
            m.model_latency.labels(name, str(version)).observe(seconds)
            m.queue_depth.labels(name, str(version)).set(batcher.depth)  # kept current for other workers' scrapes

        def make(prepare, predict) -> Batcher:
            made = Batcher(prepare, predict, max_batch_size=self.config.max_batch_size,
                           max_wait_ms=self.config.max_wait_ms, max_queue=self.config.max_queue,
                           idle_ms=self.config.batch_idle_ms, on_batch=on_batch,
                           concurrency=self.config.model_concurrency or model_concurrency(self.config.max_batch_size))
            made.start()
            return made

        batcher = make(adapter.prepare, adapter.predict)
        windows = make(adapter.prepare_windows, adapter.predict_windows) if adapter.on_grid else None
        self._heap_grew = True
        log.info("%s@%s loaded (%s) in process %d, %s", name, version, adapter.platform, os.getpid(),
                 adapter.precision)
        return Handle(adapter, batcher, windows)

    async def close(self) -> None:
        """Drain every batcher and release the shared files."""
        for dep in self.deployments.values():
            for handle in dep.handles.values():
                for b in handle.batchers():
                    await b.drain_and_stop(timeout=5)
        self.slides.close()
        self.limiter.close()

    # -- access ------------------------------------------------------------------------------------------
    def authenticate(self, authorization: str) -> KeyInfo | None:
        """The caller's key (None when the server runs without authentication); ApiError 401 otherwise."""
        return self.keys.authenticate(authorization) if self.config.auth else None

    def rate_limit(self, key: KeyInfo | None, client_host: str | None) -> None:
        self.limiter.check(key.key_id if key else (client_host or "anonymous"))

    def deployment(self, name: str, key: KeyInfo | None) -> Deployment:
        """A served model the key's tenant may see; ApiError 404 otherwise (never revealing other tenants')."""
        dep = self.deployments.get(name)
        visible = dep is not None and (key is None or key.scope == "admin" or dep.tenant in (None, key.tenant))
        if not visible:
            raise ApiError(404, "model_not_found", f"no served model named {name!r}")
        return dep

    def metrics_text(self) -> bytes:
        """The Prometheus text of every metric, queue depths read now."""
        for dep in self.deployments.values():
            for v, h in dep.handles.items():
                self.metrics.queue_depth.labels(dep.name, str(v)).set(h.batcher.depth)
        return self.metrics.render()

    def sample_metrics(self) -> None:
        """One sample for the console's monitor (the app's lifespan calls this every ``SAMPLE_SECONDS``)."""
        self.monitor.add(parse_metrics(self.metrics_text().decode(), time.time()))

    def visible(self, key: KeyInfo | None) -> list[Deployment]:
        return [d for n, d in sorted(self.deployments.items())
                if key is None or key.scope == "admin" or d.tenant in (None, key.tenant)]

    # -- inference -----------------------------------------------------------------------------------------
    async def infer(self, dep: Deployment, pixels: np.ndarray, client: str | None,
                    version: int | None = None) -> tuple[int, np.ndarray]:
        """Run one decoded image through the chosen version's batcher; returns (version, task outputs)."""
        chosen = version if version is not None else dep.choose(client)
        handle = dep.handles.get(chosen)
        if handle is None:
            raise ApiError(404, "version_not_served", f"{dep.name} version {chosen} is not being served")
        try:
            outputs = await handle.batcher.submit(pixels)
        except QueueFull:
            self.metrics.rejected.labels(dep.name).inc()
            raise ApiError(503, "overloaded", f"{dep.name} is at capacity; retry shortly", {"Retry-After": "1"}) \
                from None
        self._record(dep, chosen, pixels, handle.adapter, outputs)
        if dep.shadow is not None and dep.shadow != chosen and dep.shadow in dep.handles:
            asyncio.get_running_loop().create_task(self._shadow(dep, pixels, outputs))
        return chosen, outputs

    async def _shadow(self, dep: Deployment, pixels, served: np.ndarray, on_grid: bool = False) -> None:
        handle = dep.handles.get(dep.shadow)
        if handle is None:
            return
        try:
            outputs = await (self._windows(dep, handle, pixels) if on_grid else handle.batcher.submit(pixels))
        except Exception as exc:  # shadow failures are recorded, never surfaced to clients
            self.metrics.shadow.labels(dep.name, str(dep.shadow), "error").inc()
            log.warning("shadow %s@%s failed: %s", dep.name, dep.shadow, type(exc).__name__)
            return
        adapter = handle.adapter
        agree = adapter.task.agrees(outputs, served, adapter.labels, adapter.info)
        self.metrics.shadow.labels(dep.name, str(dep.shadow), "agree" if agree else "disagree").inc()

    async def segment(self, dep: Deployment, frame, client: str | None,
                      upload: bytes | None = None) -> tuple[int, dict]:
        """The answer on its own grid (``ModelAdapter.on_grid``) for one decoded frame with the routed version — its
        sliding windows batched with those of every request in flight (the version's window batcher: queue limit,
        batch metrics) — with a base64 DICOM SEG when given the ``upload`` (a zipped series) it references; returns
        (version, response body). A shadow version answers the same frame in the background and is counted as agreeing
        or not."""
        chosen = dep.choose(client)
        handle = dep.handles.get(chosen)
        if handle is None:
            raise ApiError(404, "version_not_served", f"{dep.name} version {chosen} is not being served")
        probs = await self._windows(dep, handle, frame)

        def work() -> dict:
            body = handle.adapter.segment_response(frame, probs)
            if upload is not None:
                import base64

                seg = handle.adapter.dicom_seg(upload, frame, probs)
                body["dicom_seg"] = {"encoding": "base64", "data": base64.b64encode(seg).decode()}
            return body

        body = await asyncio.to_thread(work)
        mean = float(frame.pixels.mean())
        dep.drift_mean = mean if dep.drift_mean is None else 0.98 * dep.drift_mean + 0.02 * mean
        if dep.shadow is not None and dep.shadow != chosen and dep.shadow in dep.handles:
            asyncio.get_running_loop().create_task(self._shadow(dep, frame, probs, on_grid=True))
        return chosen, body

    async def _windows(self, dep: Deployment, handle: Handle, frame) -> np.ndarray:
        """One frame's probabilities through the version's window batcher (503 when its queue is full)."""
        batcher = handle.windows
        if batcher.depth >= batcher.max_queue:
            self.metrics.rejected.labels(dep.name).inc()
            raise ApiError(503, "overloaded", f"{dep.name} is at capacity; retry shortly", {"Retry-After": "1"})
        try:
            return await asyncio.to_thread(handle.adapter.segment, frame,
                                           batcher.window_submitter(asyncio.get_running_loop()),
                                           batcher.max_batch_size)
        except QueueFull:
            self.metrics.rejected.labels(dep.name).inc()
            raise ApiError(503, "overloaded", f"{dep.name} is at capacity; retry shortly", {"Retry-After": "1"}) \
                from None

    def explain(self, adapter, pixels: np.ndarray, method: str, index: int) -> dict[str, bytes]:
        with self._explain_lock:  # Grad-CAM hooks the shared model: one explanation at a time
            return adapter.explain(pixels, method, index)

    def explain_findings(self, adapter, pixels: np.ndarray, answer: dict[str, Any]) -> None:
        frames.explain_boxes(adapter, pixels, answer, self._explain_lock)  # a map per box into the answer

    async def answer_frame(self, dep: Deployment, frame, client: str | None, explain: bool = False,
                           version: int | None = None) -> tuple[int, np.ndarray | None, dict]:
        """A volume answered whole on its own grid as offline by ``version`` or the routed one (``frames.answer``)."""
        version, outputs, body = await frames.answer(self, dep, frame, client, explain, version)
        if outputs is not None:
            self._record(dep, version, frame.pixels, dep.handles[version].adapter, outputs)
        return version, outputs, body

    def _record(self, dep: Deployment, version: int, pixels: np.ndarray, adapter: ModelAdapter,
                outputs: np.ndarray) -> None:
        m = self.metrics
        label = adapter.label(outputs)
        if label is not None:
            m.predictions.labels(dep.name, str(version), label).inc()
        mean = float((pixels[0] if isinstance(pixels, tuple) else pixels).mean())  # (image, covariates)
        dep.drift_mean = mean if dep.drift_mean is None else 0.98 * dep.drift_mean + 0.02 * mean
        ref = dep.train_intensity
        if ref.get("std_of_image_means"):
            m.drift.labels(dep.name).set(abs(dep.drift_mean - ref["mean"]) / ref["std_of_image_means"])
