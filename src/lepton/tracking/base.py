"""The tracking seam: a ``Tracker`` that a run calls at a few points (its configuration and tags at the start, each
epoch's figures, each step's loss, sample images, the model graph, its files and model at the end). The base does
nothing, which is what a run gets without ``--track``; ``open_tracker`` builds the backends a run asks for.

A run directory remembers where it was tracked in ``tracking/tracking.json``: a resumed training continues the same
MLflow run, and evaluation, robustness and export of the run log to the same places unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError
from lepton.utils import atomic_write_json

log = logging.getLogger("lepton.tracking")

#: The folder inside a run directory that holds the tracking record (and MLflow's offline file, if any).
TRACKING_DIR = "tracking"
RECORD_FILE = "tracking.json"
BACKENDS = ("tensorboard", "mlflow")
_ALIASES = {"tb": "tensorboard", "tensorboard": "tensorboard", "mlflow": "mlflow"}
_record_lock = threading.Lock()


@dataclass(frozen=True)
class TrackSpec:
    """One backend a run is tracked with: ``tensorboard`` (event files in the run directory), or ``mlflow`` with a
    tracking URI (None: ``$MLFLOW_TRACKING_URI``, else a local store beside the run directories)."""

    backend: str
    uri: str | None = None

    def __str__(self) -> str:
        return self.backend if self.uri is None else f"{self.backend}={self.uri}"


def parse_track(track: str | list[str] | tuple[str, ...] | None) -> list[TrackSpec]:
    """``--track`` values as specs: ``tensorboard``, ``mlflow`` or ``mlflow=URI``, repeatable; ``none`` adds none.
    ConfigError naming the value otherwise."""
    items = [track] if isinstance(track, str) else list(track or [])
    specs: list[TrackSpec] = []
    for item in items:
        name, sep, uri = str(item).strip().partition("=")
        key = _ALIASES.get(name.strip().lower())
        if name.strip().lower() == "none" and not sep:
            continue
        if key is None:
            raise ConfigError(f"--track {item!r}: use tensorboard, mlflow or mlflow=URI (or none)")
        if key == "tensorboard" and sep:
            raise ConfigError(f"--track {item!r}: TensorBoard writes into the run directory and takes no URI")
        if sep and not uri.strip():
            raise ConfigError(f"--track {item!r}: give the tracking URI after '=' (or leave '=' out)")
        spec = TrackSpec(key, uri.strip() or None)
        if spec not in specs:
            specs.append(spec)
    return specs


class Tracker:
    """What a run tells its trackers. This base does nothing: it is what a run gets without ``--track``. A backend
    never stops the run: ``open_tracker`` wraps backends so that one that fails is warned about once and dropped.
    Used as a context manager, an exception ends the tracked run as FAILED (KILLED on Ctrl-C)."""

    backend = "none"

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        """The run's configuration (flattened to strings) and its tags (data fingerprint, code version, CPU…)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Figures at ``step``: an epoch's history row, a federated round, a report's figures."""

    def log_step(self, metrics: dict[str, float], step: int) -> None:
        """Figures of one optimiser step (many: backends buffer them)."""

    def log_images(self, tag: str, image: np.ndarray, step: int = 0) -> None:
        """An (H, W, 3) image in [0, 1]: sample inputs, with their masks over them for a dense task."""

    def log_graph(self, model: Any, example: Any) -> None:
        """The network's graph, where it traces (TensorBoard)."""

    def log_text(self, tag: str, text: str) -> None:
        """Markdown: a report, a configuration."""

    def log_artifacts(self, paths: list[Path], folder: str = "") -> None:
        """Files (that exist) stored with the tracked run under ``folder``."""

    def log_model(self, model: Any) -> None:
        """The trained network in the backend's own model format (MLflow's PyTorch flavour)."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the tracked run (FINISHED, FAILED or KILLED); what is buffered is sent or written down first."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")
        return False


class Trackers(Tracker):
    """Several backends as one. A backend that raises is warned about once (per backend); the run goes on, and the
    backend still gets the calls after (a model that MLflow cannot save does not leave its run unfinished)."""

    backend = "trackers"

    def __init__(self, backends: list[Tracker]):
        self.backends = list(backends)
        self.warned: set[int] = set()
        self.finished = False

    def _each(self, method: str, *args: Any) -> None:
        for i, backend in enumerate(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # tracking must never stop a run
                if i not in self.warned:
                    self.warned.add(i)
                    log.warning("%s tracking failed in %s (%s: %s); the run goes on", backend.backend, method,
                                type(exc).__name__, exc)

    def start(self, params, tags):
        self._each("start", params, tags)

    def log_metrics(self, metrics, step):
        self._each("log_metrics", metrics, step)

    def log_step(self, metrics, step):
        self._each("log_step", metrics, step)

    def log_images(self, tag, image, step=0):
        self._each("log_images", tag, image, step)

    def log_graph(self, model, example):
        self._each("log_graph", model, example)

    def log_text(self, tag, text):
        self._each("log_text", tag, text)

    def log_artifacts(self, paths, folder=""):
        self._each("log_artifacts", [Path(p) for p in paths if Path(p).exists()], folder)

    def log_model(self, model):
        self._each("log_model", model)

    def finish(self, status="FINISHED"):
        if not self.finished:
            self.finished = True
            self._each("finish", status)


# -- the record in the run directory ------------------------------------------------------------------------------
def read_record(run_dir: Path) -> dict[str, Any]:
    """``RUN/tracking/tracking.json``: where the run was tracked ({} when it was not)."""
    path = Path(run_dir) / TRACKING_DIR / RECORD_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def update_record(run_dir: Path, key: str, value: dict[str, Any]) -> None:
    """Set one backend's entry in the run's tracking record (merged with the others', atomically)."""
    with _record_lock:
        record = read_record(run_dir)
        record[key] = {**record.get(key, {}), **value}
        atomic_write_json(Path(run_dir) / TRACKING_DIR / RECORD_FILE, record)


def with_cis(figures: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{name: {"value", "ci95"}}`` as flat figures: ``name``, ``name_ci_low``, ``name_ci_high``."""
    out = {}
    for name, figure in figures.items():
        out[name] = figure["value"]
        if figure.get("ci95"):
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = figure["ci95"]
    return out


# -- what a run tells: parameters, tags, figures, images ----------------------------------------------------------
def flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A configuration as ``{dotted.key: text}`` (nested mappings flattened; lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return out


def flat_figures(values: Any, prefix: str = "", *, max_list: int = 4) -> dict[str, float]:
    """The numbers in a report as ``{dotted.key: value}``: nested mappings flattened, short lists (confidence
    intervals) by index; longer lists (curves, cases) and booleans left out."""
    out: dict[str, float] = {}
    if isinstance(values, dict):
        for key, value in values.items():
            out.update(flat_figures(value, f"{prefix}{key}.", max_list=max_list))
    elif isinstance(values, list | tuple) and len(values) <= max_list:
        for i, value in enumerate(values):
            out.update(flat_figures(value, f"{prefix}{i}.", max_list=max_list))
    elif isinstance(values, int | float | np.number) and not isinstance(values, bool):
        out[metric_key(prefix.rstrip("."))] = float(values)
    return out


def metric_key(name: str) -> str:
    """A figure's name as both backends accept it (letters, digits, ``_ - . / space``)."""
    return re.sub(r"[^\w\-./ ]", "_", name)


@lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """Lepton's version and, when it runs from a git checkout, the commit (MLflow's ``mlflow.source.git.commit``)
    and whether the tree had changes."""
    from lepton import __version__

    tags = {"lepton.version": __version__}
    root = Path(__file__).resolve().parents[3]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=5, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5, check=True).stdout.strip()
            tags.update({"mlflow.source.git.commit": commit, "lepton.code_changed": str(bool(dirty)).lower()})
        except (OSError, subprocess.SubprocessError):
            pass
    return tags


#: Mask colours of a sample grid (label 1, 2, …), RGB in [0, 1].
MASK_COLOURS = np.array([(0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.2, 0.4, 1.0), (1.0, 0.8, 0.0), (0.8, 0.2, 0.9)])


def image_grid(images: np.ndarray, masks: np.ndarray | None = None, limit: int = 8) -> np.ndarray:
    """Up to ``limit`` images (N, C, H, W) or volumes (N, C, D, H, W) in [0, 1] side by side as one (H, W', 3)
    image; volumes show their middle slice; label maps (N, H, W) or (N, D, H, W) are laid over them in colour."""
    images = np.asarray(images[:limit], dtype=np.float32)
    with_channels = images.ndim
    if images.ndim == 5:
        images = images[:, :, images.shape[2] // 2]
    if masks is not None:
        masks = np.asarray(masks[:limit])
        if masks.ndim == with_channels:  # a task's targets (N, 1, …): the label map without its channel axis
            masks = masks[:, 0]
        if masks.ndim == 4:
            masks = masks[:, masks.shape[1] // 2]
    tiles = []
    for i, image in enumerate(images):
        rgb = np.repeat(image[:1], 3, axis=0) if image.shape[0] != 3 else image
        rgb = np.clip(np.moveaxis(rgb, 0, -1), 0, 1)
        if masks is not None:
            mask = masks[i]
            for label in range(1, int(mask.max()) + 1):
                where = mask == label
                rgb[where] = 0.55 * rgb[where] + 0.45 * MASK_COLOURS[(label - 1) % len(MASK_COLOURS)]
        tiles += [rgb, np.ones((rgb.shape[0], 2, 3), np.float32)]
    return np.concatenate(tiles[:-1], axis=1) if tiles else np.zeros((1, 1, 3), np.float32)
