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
#: The stored val set holds at most this many values (float16): a random subset of larger val splits.
MAX_VAL_VALUES = 16 << 20
CALIBRATION_IMAGES = 256
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


def save_val_set(path: Path, x_val, y_val, x_train, seed: int = 0) -> Path | None:
    """Write the val images and targets (a random subset if large) and a calibration slice of the training images,
    all in [0, 1] before normalisation, as float16; None for tasks with dense targets."""
    from lepton.utils import atomic_write_bytes

    x_val, y_val, x_train = (np.asarray(a) for a in (x_val, y_val, x_train))
    if y_val.ndim != 1 or len(y_val) == 0:
        return None
    rng = np.random.default_rng(seed)
    per_image = int(np.prod(x_val.shape[1:]))
    keep = max(1, MAX_VAL_VALUES // max(per_image, 1))
    pick = np.sort(rng.permutation(len(y_val))[:keep]) if len(y_val) > keep else np.arange(len(y_val))
    calib = rng.permutation(len(x_train))[:CALIBRATION_IMAGES]
    buf = io.BytesIO()
    np.savez_compressed(buf, x_val=x_val[pick].astype(np.float16), y_val=y_val[pick].astype(np.int64),
                        x_calib=x_train[calib].astype(np.float16))
    atomic_write_bytes(path, buf.getvalue())
    return path
