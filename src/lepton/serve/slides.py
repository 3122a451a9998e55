"""Whole-slide jobs: the served slide models (registry format ``slide-mil``) and the jobs that run them.

A slide takes longer than a request, so a slide is a job: the route stores the upload (or names a file under the
configured ``slide_root``) in the job's folder, checks that it opens as a slide, and queues it; a job given a
DICOMweb reference (to a trusted service only) first retrieves the series into its folder, its status
``retrieving`` (``lepton.serve.slideinputs`` holds what a job reads). A bounded pool of
worker threads (``slide_workers``) tiles it and runs the MIL model (``lepton.pathology.workflow.predict_slide``, the
same code as ``lepton slides predict``); at most ``slide_queue`` jobs wait or run per process, beyond which a
submission is refused 503 with Retry-After. A job's state is a ``job.json`` in its folder under ``slide_dir``,
written atomically, so any worker process answers for any job. The uploaded slide is deleted when its job ends,
whatever the outcome; outputs (heatmap, GeoJSON, reports, DICOM SR) are kept ``slide_job_hours`` and then pruned.
Jobs that a stopped process left waiting or running are marked failed at start-up and their inputs removed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton.errors import LeptonError
from lepton.registry.slides import SLIDE_FORMAT, load_slide_model
from lepton.serve.errors import ApiError
from lepton.serve.slideinputs import hide_paths, retrieve
from lepton.utils import atomic_write_json

log = logging.getLogger("lepton.serve")

#: Files a finished job offers, by name in the URL.
FILES = ("heatmap", "geojson", "report", "markdown", "sr")
MEDIA = {"heatmap": "image/png", "geojson": "application/geo+json", "report": "application/json",
         "markdown": "text/markdown; charset=utf-8", "sr": "application/dicom"}
ACTIVE = ("receiving", "queued", "retrieving", "running")


@dataclass
class SlideDeployment:
    """A served slide model: the registered version, the MIL model, its tile backbone and its tenant."""

    name: str
    version: int
    model: Any
    backbone: Any
    tenant: str | None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "kind": "slide", "format": SLIDE_FORMAT,
                "task": "slide-classification", "labels": self.model.labels, "threshold": self.model.threshold,
                "tile": self.model.spec}


def _visible(tenant: str | None, key) -> bool:
    return key is None or key.scope == "admin" or tenant in (None, key.tenant)


class SlideJobs:
    """The slide models a server serves and their jobs (state on disk, work on a bounded thread pool)."""

    def __init__(self, registry, config):
        from lepton.registry.core import lepton_home

        self.registry, self.config = registry, config
        # made when the first job is: a server without slide models writes nothing there
        self.root = Path(config.slide_dir).expanduser() if config.slide_dir else lepton_home() / "slide-jobs"
        self.models: dict[str, SlideDeployment] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._active = 0
        self._recover()

    # -- models ----------------------------------------------------------------------------------------------
    async def refresh(self, ref: str) -> dict[str, Any] | None:
        """Load ``ref`` when it names a slide model (None otherwise: an image model, for the batchers)."""
        from lepton.pathology.embed import Backbone

        reg = self.registry
        version = await asyncio.to_thread(reg.get, ref)
        if version.format != SLIDE_FORMAT:
            return None
        tenant = await asyncio.to_thread(reg.tenant_of, version.name)
        current = self.models.get(version.name)
        if current is None or current.version != version.version:
            model = await asyncio.to_thread(load_slide_model, reg, version.ref)
            backbone = await asyncio.to_thread(Backbone.from_identity, model.backbone)
            current = SlideDeployment(version.name, version.version, model, backbone, tenant)
            log.info("%s loaded (slide model, tiles %s)", version.ref, model.spec)
        current.tenant = tenant
        self.models[version.name] = current
        return {"primary": version.version, "slide_model": True}

    def visible(self, key) -> list[SlideDeployment]:
        return [d for _, d in sorted(self.models.items()) if _visible(d.tenant, key)]

    def model(self, name: str, key) -> SlideDeployment:
        dep = self.models.get(name)
        if dep is None or not _visible(dep.tenant, key):
            raise ApiError(404, "model_not_found", f"no served slide model named {name!r}")
        return dep

    # -- jobs --------------------------------------------------------------------------------------------------
    def reserve(self) -> None:
        """Take a place in the queue; 503 with Retry-After when ``slide_queue`` jobs already wait or run."""
        with self._lock:
            if self._active >= self.config.slide_queue:
                raise ApiError(503, "overloaded", f"{self._active} slide jobs are waiting or running (the limit is "
                               f"{self.config.slide_queue}); retry later", {"Retry-After": "30"})
            self._active += 1

    def release(self) -> None:
        with self._lock:
            self._active -= 1

    def create(self, dep: SlideDeployment, key) -> tuple[str, Path]:
        """A new job's id and folder, its state ``receiving``."""
        job = uuid.uuid4().hex
        folder = self.root / job
        folder.mkdir(parents=True)
        self._write(folder, {"id": job, "model": dep.name, "version": dep.version, "status": "receiving",
                             "tenant": key.tenant if key is not None else None, "created": time.time(),
                             "pid": os.getpid(), "progress": {"tiles_done": 0, "tiles": None}})
        return job, folder

    def start(self, job: str, dep: SlideDeployment, slide: Path | None, owned: bool, source: Any = None) -> None:
        """Queue the job on the worker pool; ``owned`` inputs (uploads, retrieved series) are deleted when it ends.
        With a DICOMweb ``source`` (and no ``slide``) the job retrieves the series first."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.slide_workers, thread_name_prefix="lepton-slide")
        self._update(job, status="queued")
        self._pool.submit(self._run, job, dep, slide, owned, source)

    def discard(self, folder: Path) -> None:
        """A job refused before it was queued: nothing of it stays."""
        shutil.rmtree(folder, ignore_errors=True)

    def _run(self, job: str, dep: SlideDeployment, slide: Path | None, owned: bool, source: Any = None) -> None:
        from lepton.pathology.workflow import predict_slide

        folder = self.root / job
        last, retrieved = [0.0], {}

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.5 or done == total:
                last[0] = now
                self._update(job, progress={**retrieved, "tiles_done": done, "tiles": total})

        def fetched(**changes: Any) -> None:  # the retrieval's progress, kept beside the tiles'
            retrieved.update({k: v for k, v in changes["progress"].items() if k.startswith("instances")})
            self._update(job, **changes)

        try:
            self._update(job, started=time.time())
            if source is not None:
                slide = retrieve(source, folder / "dicomweb", self.config.max_slide_bytes, fetched)
            self._update(job, status="running")
            report = predict_slide(dep.model, slide, folder / "out", cache=False, backbone=dep.backbone,
                                   on_progress=progress, model_name=dep.name, model_version=str(dep.version))
            geojson = json.loads(Path(report["files"]["geojson"]).read_text())
            slide_info = {k: v for k, v in report["slide"].items() if k != "file"}
            result = {**report["prediction"], "labels": report["labels"], "tiles": report["tiles"],
                      "spec": report["spec"], "slide": slide_info, "regions": report["regions"], "geojson": geojson}
            files = {k: Path(v).name for k, v in report["files"].items()}
            self._update(job, status="done", finished=time.time(), result=result, files=files)
        except LeptonError as exc:
            self._update(job, status="failed", finished=time.time(), error=hide_paths(str(exc), folder))
        except Exception as exc:  # a fault of ours: logged by kind (never the slide's path or content), job failed
            log.error("slide job %s failed: %s", job, type(exc).__name__)
            self._update(job, status="failed", finished=time.time(), error="internal error while processing the "
                         f"slide ({type(exc).__name__})")
        finally:
            if owned:
                _remove_inputs(folder)
            self.release()
            self.prune()

    def read(self, job: str, key) -> dict[str, Any]:
        """A job's state as the client sees it; 404 for an unknown job or another tenant's."""
        if len(job) != 32 or not all(c in "0123456789abcdef" for c in job):
            raise ApiError(404, "job_not_found", f"no slide job {job!r}")
        try:
            state = json.loads((self.root / job / "job.json").read_text())
        except (OSError, ValueError):
            raise ApiError(404, "job_not_found", f"no slide job {job!r}") from None
        if not _visible(state.get("tenant"), key):
            raise ApiError(404, "job_not_found", f"no slide job {job!r}")
        return state

    def file(self, job: str, key, kind: str) -> Path:
        state = self.read(job, key)
        name = (state.get("files") or {}).get(kind)
        if kind not in FILES or name is None:
            raise ApiError(404, "not_found", f"slide job {job} has no {kind!r} file" +
                           ("" if state["status"] == "done" else f" (it is {state['status']})"))
        return self.root / job / "out" / name

    def delete(self, job: str, key) -> None:
        state = self.read(job, key)
        if state["status"] in ACTIVE:
            raise ApiError(409, "conflict", f"slide job {job} is {state['status']}; delete it when it has ended")
        shutil.rmtree(self.root / job, ignore_errors=True)

    # -- state on disk -----------------------------------------------------------------------------------------
    def _write(self, folder: Path, state: dict[str, Any]) -> None:
        atomic_write_json(folder / "job.json", state)

    def _update(self, job: str, **changes: Any) -> None:
        folder = self.root / job
        with self._lock:
            state = json.loads((folder / "job.json").read_text())
            self._write(folder, {**state, **changes})

    def _recover(self) -> None:
        """Jobs an ended process left waiting or running: failed, inputs removed; old jobs pruned."""
        for path in self.root.glob("*/job.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if state.get("status") in ACTIVE and not _alive(state.get("pid")):
                _remove_inputs(path.parent)
                self._write(path.parent, {**state, "status": "failed", "finished": time.time(),
                                          "error": "the server stopped while the job was waiting or running; "
                                                   "submit the slide again"})
        self.prune()

    def prune(self) -> None:
        """Remove jobs that ended more than ``slide_job_hours`` ago."""
        cutoff = time.time() - self.config.slide_job_hours * 3600
        for path in self.root.glob("*/job.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if state.get("status") not in ACTIVE and (state.get("finished") or state.get("created", 0)) < cutoff:
                shutil.rmtree(path.parent, ignore_errors=True)

    def close(self) -> None:
        """Stop taking work: jobs still waiting are cancelled (failed, inputs removed); running ones finish."""
        if self._pool is None:
            return
        self._pool.shutdown(wait=False, cancel_futures=True)
        for path in self.root.glob("*/job.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if state.get("status") == "queued" and state.get("pid") == os.getpid():
                _remove_inputs(path.parent)
                self._update(state["id"], status="failed", finished=time.time(),
                             error="the server stopped before the job ran; submit the slide again")


def _remove_inputs(folder: Path) -> None:
    """Everything in a job's folder but its state and outputs: the uploaded slide, unpacked instances, a part."""
    for child in folder.iterdir():
        if child.name not in ("job.json", "out"):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
