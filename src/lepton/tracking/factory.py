"""Building a run's trackers: the backends ``--track`` names, or those its record says it was tracked with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lepton.tracking.base import Tracker, Trackers, TrackSpec, parse_track, read_record


def record_specs(record: dict[str, Any]) -> list[TrackSpec]:
    """The backends a run was tracked with, from its record."""
    specs = []
    if "tensorboard" in record:
        specs.append(TrackSpec("tensorboard"))
    if record.get("mlflow", {}).get("tracking_uri"):
        specs.append(TrackSpec("mlflow", record["mlflow"]["tracking_uri"]))
    return specs


def open_tracker(track: str | list[str] | None, run_dir: Path, *, run_name: str, kind: str = "train",
                 resume: bool = False) -> Tracker:
    """The trackers of a run directory: those ``track`` names (``--track`` values), or with ``track=None`` the ones
    the run was tracked with (none for a new run). Training (``kind="train"``) starts a new MLflow run, or continues
    its own with ``resume``; the other kinds (evaluate, robustness, export) log into the training's MLflow run when
    the tracking URI is the same, else into a run of their own tagged with the run directory."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    specs = parse_track(track) if track is not None else record_specs(record)
    backends: list[Tracker] = []
    for spec in specs:
        if spec.backend == "tensorboard":
            from lepton.tracking.board import TensorBoardTracker

            backends.append(TensorBoardTracker(run_dir, kind=kind))
        else:
            from lepton.tracking.mlflow_tracker import MlflowTracker, resolve_uri

            uri = resolve_uri(spec.uri, run_dir)
            before = record.get("mlflow", {})
            same = before.get("tracking_uri") == uri and before.get("run_id") and (resume or kind != "train")
            backends.append(MlflowTracker(uri, run_dir, run_name=run_name, kind=kind,
                                          run_id=before["run_id"] if same else None))
    return Trackers(backends) if backends else Tracker()


def log_report(run_dir: Path, track: str | list[str] | None, *, kind: str, folder: str, metrics: dict[str, float],
               files: list[Path], text: str | None = None, series: dict[str, list[tuple[int, float]]] | None = None
               ) -> None:
    """A report on a trained run (evaluation, robustness, export) to the run's trackers: its figures at step 0 (and
    ``series``: figures along a step such as a severity), its Markdown, and its files under ``folder``."""
    tracker = open_tracker(track, run_dir, run_name=Path(run_dir).name, kind=kind)
    if tracker.backend == "none":
        return
    with tracker:
        tracker.log_metrics({f"{folder}/{k}": v for k, v in metrics.items()}, 0)
        for key, points in (series or {}).items():
            for step, value in points:
                tracker.log_metrics({f"{folder}/{key}": value}, step)
        if text:
            tracker.log_text(folder, text)
        tracker.log_artifacts(files, folder)
