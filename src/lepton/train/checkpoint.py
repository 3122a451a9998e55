"""What a run directory holds while it trains: ``best.pt``, the resumable ``last.pt`` and ``history.csv``,
each written atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton.errors import RunError
from lepton.rundir import BEST, CONFIG, HISTORY, LAST, VAL_SET, RunDir
from lepton.utils import atomic_write_text

BASE_FIELDS = ("epoch", "lr", "train_loss")
VAL_SET_FILE = VAL_SET
TAIL_FIELDS = ("images_per_s", "seconds")


def save_best(run_dir: Path, model: torch.nn.Module, model_spec: dict[str, Any], epoch: int,
              metrics: dict[str, float], path: Path | None = None) -> None:
    """The selected weights with the network spec that rebuilds them (in ``best.pt`` unless ``path`` is given)."""
    checkpoint = {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "spec": model_spec, "epoch": epoch,
                  "val": metrics}
    if path is None:
        RunDir(run_dir).save_checkpoint(checkpoint, BEST)
    else:
        RunDir(path.parent).save_checkpoint(checkpoint, path.name)


def save_last(run_dir: Path, state: dict[str, Any]) -> None:
    """The resumable checkpoint: everything ``load_last`` needs to continue exactly where the run stopped."""
    RunDir(run_dir).save_checkpoint(state, LAST)


def load_last(run_dir: Path) -> dict[str, Any]:
    files = RunDir(run_dir)
    if files.missing((LAST, CONFIG)):
        raise RunError(f"{run_dir}: nothing to resume (no last.pt/config.yaml)")
    return files.load_checkpoint(LAST, full=True)


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """``history.csv``: one row per epoch, the task's validation figures between the fixed columns."""
    val = [k for k in history[0] if k not in BASE_FIELDS + TAIL_FIELDS] if history else []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=(*BASE_FIELDS, *val, *TAIL_FIELDS), extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(run_dir / HISTORY, buf.getvalue())


def save_val_set(path: Path, task, x_val, y_val, x_train, spec, seed: int = 0) -> Path | None:
    """Write what the task keeps for checking lower serving precisions (``Task.precision_val_set``: a bounded subset
    of the val split and calibration inputs, in [0, 1] before normalisation), compressed; None for tasks whose
    precisions are not checked."""
    from lepton.utils import atomic_write_bytes

    arrays = task.precision_val_set(x_val, y_val, x_train, spec, seed=seed)
    if arrays is None:
        return None
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return path
