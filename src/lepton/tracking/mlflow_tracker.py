"""MLflow: a run's parameters, tags, figures, files and model in an MLflow tracking store or server.

Training never waits on the tracking server: every call only queues, and one background thread sends the queue
with ``MlflowClient`` in batches. While the server is down or slow, figures stay buffered and are retried with
backoff (one warning says so); when the run ends the thread tries twice more and, if the server is still away,
writes what is left to ``RUN/tracking/mlflow-offline.jsonl`` (``lepton runs sync RUN`` sends it later). MLflow's own
HTTP retries are turned down (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=5`` unless set),
so a dead server costs the end of a run a few seconds at most.

The tracking URI is the one given (``--track mlflow=URI``), else ``$MLFLOW_TRACKING_URI``, else a local SQLite store
beside the run directories (``runs/mlflow.db``, artifacts in ``runs/mlartifacts``: ``mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db`` shows it). The experiment is ``$MLFLOW_EXPERIMENT_NAME``, else ``lepton``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError, RunError
from lepton.tracking.base import TRACKING_DIR, Tracker, metric_key, read_record, update_record

log = logging.getLogger("lepton.tracking")

OFFLINE_FILE = "mlflow-offline.jsonl"
DEFAULT_EXPERIMENT = "lepton"
#: MLflow's HTTP client settings unless the user set them: no retries of its own (this thread retries), short waits.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
#: Seconds between retries while the server is away (the last one repeats).
BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
#: Attempts once the run has ended before what is left goes to the offline file.
FINAL_ATTEMPTS = 2
#: Seconds the end of a run waits for a server that answers but slowly, before the rest goes to the offline file.
FINISH_WAIT_S = 120.0
#: Figures held in memory while the server is away; older ones go to the offline file beyond this.
MAX_PENDING = 200_000
#: MLflow's limits: values per log_batch call, parameters per call, characters of a parameter and of a tag.
BATCH_METRICS, BATCH_PARAMS, PARAM_CHARS, TAG_CHARS = 1000, 100, 6000, 5000
#: MLflow error codes that no retry fixes: the operation is dropped (with the one warning).
PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
             "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_STATE", "FEATURE_DISABLED"}


def resolve_uri(uri: str | None, run_dir: Path) -> str:
    """The tracking URI: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the local store beside the run directories."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def _client(uri: str):
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError("--track mlflow needs the MLflow client: pip install 'lepton-imaging[tracking]'") from None
    if not logging.getLogger("lepton").isEnabledFor(logging.DEBUG):
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store's INFO lines only with --debug
    return MlflowClient(tracking_uri=uri)


def _permanent(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in PERMANENT


class MlflowTracker(Tracker):
    """One MLflow run fed from a background thread. ``run_id`` continues an existing run (a resumed training, or an
    evaluation of a tracked run); otherwise the thread creates one in the experiment when it first reaches the
    server. A run it created (or a training's) is ended with the run's status; one it only logs into is left as is."""

    backend = "mlflow"

    def __init__(self, uri: str, run_dir: Path, *, run_name: str, kind: str = "train", run_id: str | None = None,
                 experiment: str | None = None):
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError("--track mlflow needs the MLflow client: pip install 'lepton-imaging[tracking]'")
        self.uri, self.run_dir, self.run_name, self.kind = uri, Path(run_dir), run_name, kind
        self.run_id, self.experiment_id, self.client = run_id, None, None
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self.owns_run = run_id is None or kind == "train"
        self.resumed = run_id is not None and kind == "train"
        self.offline_path = self.run_dir / TRACKING_DIR / OFFLINE_FILE
        self.offline_values = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._wake, self._abandon, self._done = threading.Event(), threading.Event(), threading.Event()
        self._warned = self._finished = False
        self._thread = threading.Thread(target=self._work, name="lepton-mlflow", daemon=True)
        self._thread.start()

    # -- what the run calls (queue only) ------------------------------------------------------------------------
    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        self._queue.put({"op": "start", "params": params, "tags": tags})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._queue.put({"op": "metrics", "metrics": [[metric_key(k), float(v), now, int(step)]
                                                      for k, v in metrics.items()]})

    def log_step(self, metrics: dict[str, float], step: int) -> None:
        self.log_metrics(metrics, step)

    def log_images(self, tag: str, image: np.ndarray, step: int = 0) -> None:
        from PIL import Image

        path = self.run_dir / TRACKING_DIR / f"{tag.replace('/', '-')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
        self._queue.put({"op": "artifact", "path": str(path), "folder": "images"})

    def log_text(self, tag: str, text: str) -> None:
        path = self.run_dir / TRACKING_DIR / f"{tag.replace('/', '-')}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self._queue.put({"op": "artifact", "path": str(path), "folder": tag})

    def log_artifacts(self, paths: list[Path], folder: str = "") -> None:
        for path in paths:
            self._queue.put({"op": "artifact", "path": str(Path(path).resolve()), "folder": folder})

    def log_model(self, model: Any) -> None:
        """The network in MLflow's PyTorch flavour (``mlflow.pytorch.load_model("runs:/ID/model")``), saved here
        and sent by the thread."""
        import copy
        import inspect

        import torch

        try:
            import mlflow.pytorch
        except ImportError:
            raise ConfigError("--track mlflow needs the MLflow client: pip install 'lepton-imaging[tracking]'") \
                from None
        from lepton import __version__

        path = self.run_dir / TRACKING_DIR / "mlflow-model"
        shutil.rmtree(path, ignore_errors=True)
        # Pickled (loads into the same network class), not MLflow 3's default pt2, which needs an input example and
        # a network torch.export can trace.
        pickled = ({"serialization_format": "pickle"} if "serialization_format" in
                   inspect.signature(mlflow.pytorch.save_model).parameters else {})
        quiet = logging.getLogger("mlflow.pytorch")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its warning about pickles: the choice is made above, for the reason given
        try:
            mlflow.pytorch.save_model(copy.deepcopy(model).float().cpu().eval(), str(path),
                                      pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                        f"lepton-imaging=={__version__}"], **pickled)
        finally:
            quiet.setLevel(level)
        self._queue.put({"op": "model", "path": str(path), "folder": "model"})

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is queued (or write it to the offline file) and end the run; returns once the thread is done:
        at once while the server answers, after ``FINAL_ATTEMPTS`` short tries when it does not."""
        if self._finished:
            return
        self._finished = True
        self._queue.put({"op": "end", "status": status})
        self._wake.set()
        if not self._done.wait(FINISH_WAIT_S):
            self._abandon.set()
            self._wake.set()
            self._done.wait(float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")) + 5)
        if self.offline_values:
            log.info("MLflow at %s still unreachable: %d figures and the run's files are in %s; send them with "
                     "`lepton runs sync %s`", self.uri, self.offline_values, self.offline_path, self.run_dir)

    # -- the thread ----------------------------------------------------------------------------------------------
    def _work(self) -> None:
        pending: list[dict[str, Any]] = []
        failures, closing, tries_after_end = 0, False, 0
        while True:
            closing = self._drain(pending, block=not pending and not closing) or closing
            if self._abandon.is_set():
                self._drain(pending, block=False)
                self._write_offline(pending)
                break
            if not pending:
                if closing:
                    break
                continue
            try:
                self._send(pending)
                failures = 0
            except Exception as exc:
                if _permanent(exc):
                    dropped = pending.pop(0)
                    self._warn(f"MLflow refused {dropped['op']} ({type(exc).__name__}: {exc}); it is left out")
                    continue
                failures += 1
                self._warn(f"MLflow at {self.uri} cannot be reached ({type(exc).__name__}: {_short(exc)}); training "
                           f"goes on: figures are buffered and retried, and written to {self.offline_path} if it "
                           f"stays away")
                if closing:
                    tries_after_end += 1
                    if tries_after_end >= FINAL_ATTEMPTS:
                        self._write_offline(pending)
                        break
                self._spill(pending)
                self._wake.wait(0.5 if closing else BACKOFF[min(failures, len(BACKOFF)) - 1])
                self._wake.clear()
        self._done.set()

    def _drain(self, pending: list[dict[str, Any]], block: bool) -> bool:
        """Move queued operations to ``pending``; True when the run's end was among them."""
        ended = False
        try:
            item = self._queue.get(timeout=0.5) if block else self._queue.get_nowait()
            while True:
                ended = ended or item["op"] == "end"
                pending.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            return ended

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s", message)

    def _send(self, pending: list[dict[str, Any]]) -> None:
        """Send the first operation of ``pending`` (consecutive figures together) and remove what was sent."""
        self._ensure_run(pending[0].get("tags") if pending[0]["op"] == "start" else None)
        from mlflow.entities import Metric, Param, RunTag

        op = pending[0]
        if op["op"] == "metrics":
            values = []
            while pending and pending[0]["op"] == "metrics" and len(values) < BATCH_METRICS:
                values += pending.pop(0)["metrics"]
            for i in range(0, len(values), BATCH_METRICS):
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s)
                                                            for k, v, ts, s in values[i:i + BATCH_METRICS]])
            return
        if op["op"] == "start":
            params = [Param(k[:250], str(v)[:PARAM_CHARS]) for k, v in op["params"].items()]
            tags = [RunTag(k, str(v)[:TAG_CHARS]) for k, v in op["tags"].items()]
            for i in range(0, max(len(params), len(tags)), BATCH_PARAMS):
                self.client.log_batch(self.run_id, params=[] if self.resumed else params[i:i + BATCH_PARAMS],
                                      tags=tags[i:i + BATCH_PARAMS])
        elif op["op"] in ("artifact", "model"):
            path = Path(op["path"])
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), op["folder"] or None)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), op["folder"] or None)
            if op["op"] == "model":
                shutil.rmtree(path, ignore_errors=True)
        elif op["op"] == "end" and self.owns_run:
            self.client.set_terminated(self.run_id, op["status"])
        pending.pop(0)

    def _ensure_run(self, tags: dict[str, str] | None) -> None:
        if self.client is None:
            self.client = _client(self.uri)
        if self.run_id is None:
            self.experiment_id = self._experiment_id()
            run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags={
                **(tags or {}), "lepton.run_dir": str(self.run_dir.resolve()), "lepton.kind": self.kind})
            self.run_id = run.info.run_id
            self._record()
        elif self.experiment_id is None:
            self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
            if self.resumed:
                self.client.update_run(self.run_id, status="RUNNING")

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        local = self.uri.startswith("sqlite:///") and os.environ.get("MLFLOW_TRACKING_URI") != self.uri
        location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() if local else None
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except Exception:  # created meanwhile by another run
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _record(self) -> None:
        """The run's MLflow address in its tracking record: training's own run, or the first one of a run that
        training did not track to MLflow."""
        if self.kind == "train" or not read_record(self.run_dir).get("mlflow"):
            update_record(self.run_dir, "mlflow", {
                "tracking_uri": self.uri, "experiment": self.experiment, "experiment_id": self.experiment_id,
                "run_id": self.run_id, "run_name": self.run_name, "model_uri": f"runs:/{self.run_id}/model"})

    def _spill(self, pending: list[dict[str, Any]]) -> None:
        """Past ``MAX_PENDING`` buffered figures, the oldest go to the offline file (memory stays bounded)."""
        held = sum(len(op["metrics"]) for op in pending if op["op"] == "metrics")
        if held > MAX_PENDING:
            figures = [op for op in pending if op["op"] == "metrics"]
            self._write_offline(figures)
            pending[:] = [op for op in pending if op["op"] != "metrics"]

    def _write_offline(self, ops: list[dict[str, Any]]) -> None:
        if not ops:
            return
        self.offline_path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.offline_path.exists()
        with self.offline_path.open("a", encoding="utf-8") as fh:
            if fresh:
                fh.write(json.dumps({"op": "run", "tracking_uri": self.uri, "experiment": self.experiment,
                                     "run_id": self.run_id, "run_name": self.run_name, "kind": self.kind}) + "\n")
            for op in ops:
                fh.write(json.dumps(op) + "\n")
        self.offline_values += sum(len(op["metrics"]) for op in ops if op["op"] == "metrics")
        update_record(self.run_dir, "mlflow", {"tracking_uri": self.uri, "offline": str(self.offline_path)})


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]


def offline_figures(run_dir: Path) -> list[list[Any]]:
    """The figures a run wrote to its offline file: ``[key, value, timestamp_ms, step]`` rows."""
    path = Path(run_dir) / TRACKING_DIR / OFFLINE_FILE
    rows: list[list[Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        op = json.loads(line)
        if op["op"] == "metrics":
            rows += op["metrics"]
    return rows


def sync_offline(run_dir: Path, uri: str | None = None) -> dict[str, Any]:
    """Send a run's offline file to MLflow (its own tracking URI, or ``uri``) and remove it once everything is
    there; RunError when the server is still away (the file is kept). Returns the run id and what was sent."""
    run_dir = Path(run_dir)
    path = run_dir / TRACKING_DIR / OFFLINE_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: nothing to send (no {TRACKING_DIR}/{OFFLINE_FILE})")
    ops = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    head = ops.pop(0) if ops and ops[0]["op"] == "run" else {}
    target = uri or head.get("tracking_uri") or resolve_uri(None, run_dir)
    sending = path.with_suffix(".sending")
    os.replace(path, sending)
    tracker = MlflowTracker(target, run_dir, run_name=head.get("run_name") or run_dir.name,
                            kind=head.get("kind", "train"), experiment=head.get("experiment"),
                            run_id=head.get("run_id") if target == head.get("tracking_uri") else None)
    tracker.resumed = False  # the parameters were never sent
    for op in ops:
        tracker._queue.put(op)
    if not any(op["op"] == "end" for op in ops):
        tracker._queue.put({"op": "end", "status": "FINISHED"})
    tracker._finished = True
    tracker._wake.set()
    tracker._done.wait(FINISH_WAIT_S)
    if tracker.offline_values or path.exists() or not tracker._done.is_set():
        if path.exists():  # written anew by the tracker, with everything that was not sent
            sending.unlink()
        else:
            os.replace(sending, path)
        raise RunError(f"MLflow at {target} is still unreachable; {path} is kept for another try")
    sending.unlink()
    update_record(run_dir, "mlflow", {"offline": None})
    return {"run_id": tracker.run_id, "tracking_uri": target,
            "figures": sum(len(op["metrics"]) for op in ops if op["op"] == "metrics")}


def download_run(uri: str, dest: Path) -> Path:
    """The Lepton run directory logged with an MLflow run (``runs:/RUN_ID`` or ``runs:/RUN_ID/run``), downloaded
    into ``dest``: what ``lepton models register`` takes. The tracking URI is ``$MLFLOW_TRACKING_URI``, else the local
    store of ``runs/``."""
    if not uri.startswith("runs:/"):
        raise ConfigError(f"{uri!r} is not an MLflow run URI: use runs:/RUN_ID")
    run_id, _, sub = uri.removeprefix("runs:/").partition("/")
    if sub not in ("", "run", "model"):
        raise ConfigError(f"{uri!r}: Lepton registers the run directory logged as runs:/{run_id}/run")
    client = _client(resolve_uri(None, Path("runs") / run_id))
    try:
        local = client.download_artifacts(run_id, "run", str(dest))
    except Exception as exc:
        raise RunError(f"{uri}: no Lepton run directory among the MLflow run's artifacts at "
                       f"{client.tracking_uri} ({type(exc).__name__}: {_short(exc)})") from None
    return Path(local)


def mlflow_link(run_dir: Path) -> dict[str, Any] | None:
    """Where a run was tracked in MLflow (tracking URI, experiment, run id, model URI), for a registered version's
    record; None for a run not tracked to MLflow, or whose MLflow run was never created."""
    found = read_record(run_dir).get("mlflow") or {}
    if not found.get("run_id"):
        return None
    return {k: found.get(k) for k in ("tracking_uri", "experiment", "experiment_id", "run_id", "model_uri")}


def note_registration(run_dir: Path, ref: str, card: str) -> None:
    """The other way of the link: the registered version (``NAME@V``) as a tag of the run's MLflow run, and its model
    card among the run's files. Best effort: a server that is away gets it in the run's offline file."""
    link = mlflow_link(run_dir)
    try:
        tracker = MlflowTracker(link["tracking_uri"], run_dir, run_name=Path(run_dir).name, kind="register",
                                run_id=link["run_id"])
    except ConfigError as exc:  # registered where MLflow is not installed: the version still records the link
        log.warning("%s: the MLflow run is not told about %s (%s)", run_dir, ref, exc)
        return
    with tracker:
        tracker.start({}, {"lepton.registered": ref})
        tracker.log_text("model_card", card)
