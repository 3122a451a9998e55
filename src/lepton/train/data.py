"""Training data: a source loaded, split, fingerprinted and preprocessed into tensors once per run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lepton.config import TrainConfig
from lepton.data import ImageSet
from lepton.data.splits import assign_splits
from lepton.data.transforms import Preprocessing
from lepton.errors import DataError
from lepton.tasks import Task, get_task
from lepton.utils import sha256_bytes


@dataclass
class Prepared:
    """Tensors and metadata of a loaded, split, preprocessed dataset: images in [0, 1] and the task's targets."""

    spec: Preprocessing
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    label_names: list[str]
    fingerprint: dict[str, Any]


def data_fingerprint(data: ImageSet, splits: np.ndarray) -> dict[str, Any]:
    """A content hash of every image, label and split assignment, plus counts (no paths, no ids)."""
    rows = sorted(f"{h}:{int(y)}:{s}" for h, y, s in
                  zip(data.content_hashes(), data.labels, splits, strict=True))
    per_case = hasattr(data, "masks")  # segmentation: every case holds several classes
    counts = {
        split: {"cases": int((splits == split).sum())} if per_case else
        {name: int(((splits == split) & (data.labels == k)).sum()) for k, name in enumerate(data.label_names)}
        for split in ("train", "val", "test") if (splits == split).any()
    }
    return {"source": data.source, "sha256": sha256_bytes("\n".join(rows).encode()),
            "images": len(data), "counts": counts, "patient_grouped": data.has_patient_ids}


def intensity_stats(x: torch.Tensor) -> dict[str, float]:
    """Mean intensity of preprocessed training images and the spread of per-image means (drift reference)."""
    means = x.mean(dim=tuple(range(1, x.ndim)))
    return {"mean": float(means.mean()), "std_of_image_means": float(means.std().clamp_min(1e-6))}


def prepare_data(config: TrainConfig, spec: Preprocessing | None = None, task: Task | None = None) -> Prepared:
    """Load, split and preprocess the data a config names (``spec`` fixed when resuming); data, input size and
    targets from ``task`` (the config's task when not given)."""
    from lepton.data.pipeline import check_steps

    task = task or get_task(config.task)
    steps = spec.steps if spec is not None else check_steps(config.preprocess)
    data = task.load(config.data, window=config.window, slices=config.slices, steps=steps,
                     skip_bad=config.skip_bad)
    splits = assign_splits(data, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                           seed=config.seed)
    train, val = data.subset(splits == "train"), data.subset(splits == "val")
    if len(val) == 0:
        raise DataError(f"{config.data}: the val split is empty; set val_fraction > 0 or add val data")
    fresh = spec is None
    if spec is None:
        dims = train.spatial_dims
        size = task.input_size(train, config) or \
            ((config.image_size,) * dims if config.image_size else _native_size(train))
        channels = config.channels or (3 if all(np.shape(im)[0] == 3 for im in train.images) else 1)
        spec = Preprocessing(size, channels, [0.5] * channels, [0.5] * channels, config.window, config.slices,
                             steps, "pad" if task.dense else "resize")
    x, y = task.tensors(train, spec)
    if fresh and config.normalize == "dataset":
        axes = (0, *range(2, x.ndim))
        spec.mean = x.mean(dim=axes).tolist()
        spec.std = x.std(dim=axes).clamp_min(1e-3).tolist()
    fingerprint = data_fingerprint(data, splits) | {"intensity": intensity_stats(x)}
    x_val, y_val = task.tensors(val, spec)
    return Prepared(spec=spec, x_train=x, y_train=y, x_val=x_val, y_val=y_val, label_names=data.label_names,
                    fingerprint=fingerprint)


def _native_size(data: ImageSet) -> tuple[int, ...]:
    """Images: a square of the median longest side (at most 224); volumes: the median size per axis (at most 128)."""
    shapes = [np.shape(im)[1:] for im in data.images] if isinstance(data.images, list) else [data.images.shape[2:]]
    if data.spatial_dims == 2:
        side = int(min(224, np.median([max(s) for s in shapes])))
        return side, side
    return tuple(int(min(128, np.median([s[i] for s in shapes]))) for i in range(3))
