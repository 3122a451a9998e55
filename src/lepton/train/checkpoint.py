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
from lepton.utils import atomic_torch_save, atomic_write_text

BASE_FIELDS = ("epoch", "lr", "train_loss")
VAL_SET_FILE = "val_set.npz"
TAIL_FIELDS = ("images_per_s", "seconds")


def save_best(run_dir: Path, model: torch.nn.Module, model_spec: dict[str, Any], epoch: int,
              metrics: dict[str, float], path: Path | None = None) -> None:
    """The selected weights with the network spec that rebuilds them (in ``best.pt`` unless ``path`` is given)."""
    atomic_torch_save(path or run_dir / "best.pt", {"model": {k: v.cpu() for k, v in model.state_dict().items()},
                                            "spec": model_spec, "epoch": epoch, "val": metrics})


def save_last(run_dir: Path, state: dict[str, Any]) -> None:
    """The resumable checkpoint: everything ``load_last`` needs to continue exactly where the run stopped."""
    atomic_torch_save(run_dir / "last.pt", state)


def load_last(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / "last.pt").is_file() or not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir}: nothing to resume (no last.pt/config.yaml)")
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """``history.csv``: one row per epoch, the task's validation figures between the fixed columns."""
    val = [k for k in history[0] if k not in BASE_FIELDS + TAIL_FIELDS] if history else []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=(*BASE_FIELDS, *val, *TAIL_FIELDS), extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(run_dir / "history.csv", buf.getvalue())


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
