"""MedMNIST-format ``.npz`` files: ``{split}_images`` and ``{split}_labels`` per split."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from lepton.data.index.dataset import SPLITS, ImageSet
from lepton.errors import DataError

#: Class names of the single-label 2-D MedMNIST datasets (from the MedMNIST v2 INFO table).
MEDMNIST_LABELS: dict[str, list[str]] = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": [
        "basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
        "monocyte", "neutrophil", "platelet",
    ],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
        "vascular lesions",
    ],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "organamnist": [
        "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
        "lung-left", "lung-right", "pancreas", "spleen",
    ],
}


def medmnist_root() -> Path:
    """The MedMNIST download cache: ``$MEDMNIST_ROOT`` or ``~/.medmnist``."""
    return Path(os.environ.get("MEDMNIST_ROOT", Path.home() / ".medmnist")).expanduser()


def resolve_medmnist(name: str) -> Path:
    """``medmnist:pneumoniamnist`` → ``~/.medmnist/pneumoniamnist.npz`` (``_64`` etc. for sizes)."""
    path = medmnist_root() / f"{name}.npz"
    if not path.is_file():
        raise DataError(
            f"medmnist:{name}: {path} not found. Download it with the medmnist package "
            f"(e.g. `python -m medmnist download`) or place the .npz there, or pass a file path"
        )
    return path


def read_npz(path: Path, *, source: str | None = None) -> ImageSet:
    """Read a MedMNIST ``.npz`` (gray or RGB, any size) with whatever splits it holds."""
    source = source or str(path)
    try:
        npz = np.load(path, allow_pickle=False)
        keys = set(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from exc
    present = [s for s in SPLITS if f"{s}_images" in keys or f"{s}_labels" in keys]
    if not present:
        raise DataError(
            f"{path}: no MedMNIST arrays found (keys: {sorted(keys)}); expected "
            "train_images/train_labels and optionally val_* and test_*"
        )
    images, labels, splits = [], [], []
    for split in present:
        for kind in ("images", "labels"):
            if f"{split}_{kind}" not in keys:
                raise DataError(f"{path}: has {split}_* but no {split}_{kind}")
        try:
            imgs, labs = npz[f"{split}_images"], npz[f"{split}_labels"]
        except Exception as exc:
            raise DataError(f"{path}: cannot read the {split} arrays ({exc})") from exc
        if len(imgs) != len(labs):
            raise DataError(
                f"{path}: {split}_images has {len(imgs)} images but {split}_labels has {len(labs)} labels"
            )
        if labs.ndim == 2 and labs.shape[1] > 1:
            raise DataError(
                f"{path}: {split}_labels has shape {labs.shape}: multi-label data is not supported"
            )
        labs = labs.reshape(-1)
        if not np.issubdtype(labs.dtype, np.integer):
            raise DataError(f"{path}: {split}_labels must be integers (got {labs.dtype})")
        images.append(_to_nchw(path, split, imgs))
        labels.append(labs.astype(np.int64))
        splits.extend([split] * len(labs))
    if len({im.ndim for im in images}) > 1:
        raise DataError(f"{path}: splits mix images and volumes")
    stacked = np.concatenate(images)
    labels_all = np.concatenate(labels)
    if "label_names" in keys:
        label_names = [str(x) for x in npz["label_names"].tolist()]
    else:
        stem = path.stem.split("_")[0].lower()
        k = int(labels_all.max()) + 1 if len(labels_all) else 0
        label_names = MEDMNIST_LABELS.get(stem, [str(i) for i in range(k)])
    n = len(labels_all)
    return ImageSet(
        images=stacked,
        labels=labels_all,
        label_names=label_names,
        splits=np.asarray(splits, dtype=object),
        groups=np.asarray([f"{source}#{i}" for i in range(n)], dtype=object),
        names=[f"{path.name}#{s}" for s in splits],
        modalities=["npz"] * n,
        source=source,
    )


def _to_nchw(path: Path, split: str, imgs: np.ndarray) -> np.ndarray:
    """Images as (N, C, H, W) or volumes as (N, C, D, H, W), in [0, 1]."""
    if imgs.ndim == 3:
        imgs = imgs[:, None]
    elif imgs.ndim == 4 and imgs.shape[-1] in (1, 3):
        imgs = imgs.transpose(0, 3, 1, 2)
    elif imgs.ndim == 4:  # MedMNIST-3D: (N, D, H, W) grey volumes
        imgs = imgs[:, None]
    elif imgs.ndim == 5 and imgs.shape[-1] in (1, 3):
        imgs = imgs.transpose(0, 4, 1, 2, 3)
    else:
        raise DataError(
            f"{path}: {split}_images has shape {imgs.shape}; expected (N, H, W), (N, H, W, 1|3) images or "
            "(N, D, H, W), (N, D, H, W, 1|3) volumes"
        )
    if imgs.dtype == np.uint8:
        return imgs.astype(np.float32) / 255.0
    out = imgs.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{path}: {split}_images contains NaN or infinite values")
    hi = float(out.max()) if out.size else 1.0
    return out / hi if hi > 1.0 else out
