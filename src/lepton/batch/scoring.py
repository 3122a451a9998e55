"""Evaluation of a classifier on a held-out set too large to hold in memory, through the batch engine.

The set is a CSV manifest (``path,label``) or class folders (each first-level sub-folder a class, named as the run's
classes); its images are streamed through ``predict_batch`` into ``predictions.parquet`` in the report's folder
(resumable like any batch job: a killed evaluation restarted with the same command predicts only what is missing),
then only the ground truth and the probabilities are read back (K floats an image) and scored by the task's own
report (metrics with bootstrap CIs, calibration, figures): the same ``report.json`` and ``report.md`` as
``lepton.evaluate.evaluate``. Unreadable images and labels that are not the run's classes are counted and left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError, DataError


def evaluate_stream(run, data: str | Path, *, output: str | Path | None = None, n_bootstrap: int = 1000,
                    plots: bool = True, engine: str = "local", workers: int | None = None,
                    progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate ``run`` (a ``Run`` or its directory) on every labelled image of ``data`` through the batch engine;
    writes ``predictions.parquet``, ``report.json`` and ``report.md`` to ``output`` (default
    ``RUN/eval/<data name>-stream``) and returns the report."""
    import pyarrow.parquet as pq

    from lepton.batch.engine import predict_batch
    from lepton.runs import Run, load_run
    from lepton.utils import atomic_write_json, atomic_write_text

    run = run if isinstance(run, Run) else load_run(run)
    if "stream_eval" not in run.task.capabilities:
        raise ConfigError(f"streaming evaluation scores classifiers; a {run.task.name} run is evaluated with "
                          "`lepton evaluate` without --stream")
    source = Path(data)
    out = Path(output) if output else run.path / "eval" / f"{source.stem}-stream"
    out.mkdir(parents=True, exist_ok=True)
    summary = predict_batch(run, [source], out / "predictions.parquet", engine=engine, workers=workers,
                            progress=progress, labelled=True, overwrite=overwrite)
    labels = run.label_names
    index = {name: i for i, name in enumerate(labels)}
    columns = ["truth", "error", *(f"prob_{c}" for c in labels)]
    ys, probs = [], []
    unreadable = unlabelled = 0
    for batch in pq.ParquetFile(out / "predictions.parquet").iter_batches(columns=columns):
        truth = batch.column("truth").to_pylist()
        error = batch.column("error").to_pylist()
        p = np.stack([batch.column(f"prob_{c}").to_numpy(zero_copy_only=False) for c in labels], axis=1)
        keep = np.array([e is None and t in index for t, e in zip(truth, error, strict=True)], bool)
        unreadable += sum(e is not None for e in error)
        unlabelled += sum(e is None and t not in index for t, e in zip(truth, error, strict=True))
        ys.append(np.array([index[t] for t, k in zip(truth, keep, strict=True) if k], np.int64))
        probs.append(p[keep].astype(np.float32))
    y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    outputs = np.concatenate(probs) if probs else np.zeros((0, len(labels)), np.float32)
    if len(y) == 0:
        raise DataError(f"{source}: no labelled image of the run's classes ({', '.join(labels)}) was read")
    body, lines = run.task.report(y, outputs, labels, run.info, n_bootstrap=n_bootstrap,
                                  plots=out if plots else None)
    report: dict[str, Any] = {"run": str(run.path), "task": run.task.name, "model": run.config.model,
                              "data": str(source), "split": "all", "images": len(y), "streamed": True,
                              "unreadable": unreadable, "unlabelled": unlabelled,
                              "predictions": str(out / "predictions.parquet"), "rate": round(summary.rate, 1),
                              **body, "output": str(out)}
    markdown = [f"# Evaluation: {run.path.name}", "", f"- Model: `{run.config.model}` ({run.task.name})",
                f"- Data: `{source}`, all of it streamed, {len(y)} images ({unreadable} unreadable and {unlabelled} "
                "without one of the run's classes left out)", *lines]
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", "\n".join(markdown) + "\n")
    return report
