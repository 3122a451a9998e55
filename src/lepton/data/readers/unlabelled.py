"""Unlabelled sources: images without labels for self-supervised pretraining, semi-supervised training and active
learning. Cases are listed up front and decoded in batches as they are used (``UnlabelledSet.batch``), so a
folder or manifest larger than memory streams; an ``.npz`` holds its arrays (its ``train`` split only: the val
and test images of a MedMNIST file are never unlabelled training data).

The leakage check (``check_pool``) keeps the pool apart from a labelled set's val and test splits: no image with the
same pixels and no shared patient.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lepton.data.base import pseudonymize
from lepton.errors import DataError

if TYPE_CHECKING:
    import torch

    from lepton.data.transforms.preprocessing import Preprocessing

#: Suffixes that are never images in a folder (manifests, notes, label files written beside the images).
_SKIP_SUFFIXES = {".csv", ".tsv", ".json", ".txt", ".md", ".yaml", ".yml", ".pt", ".gz.json"}


def pixel_hash(image: np.ndarray) -> str:
    """SHA-256 of decoded pixels: the same key as ``ImageSet.content_hashes`` (exact duplicates across sets)."""
    return hashlib.sha256(str(np.shape(image)).encode()
                          + np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()


@dataclass
class UnlabelledSet:
    """Cases without labels: files (decoded on demand) or the arrays of an ``.npz``.

    ``names`` identify cases (a path relative to the source, or ``file.npz#i``); ``patients`` holds a pseudonym where
    the source gives one (a manifest's ``patient_id``; DICOM headers once ``scan`` has read them), else None.
    """

    source: str
    names: list[str]
    paths: list[Path] = field(default_factory=list)
    arrays: np.ndarray | None = None
    patients: list[str | None] = field(default_factory=list)
    window: str | None = None
    slices: str = "middle"
    steps: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Case ``i`` as float32 (C, H, W) or (C, D, H, W) in [0, 1], with a volume's affine (None for 2-D)."""
        if self.arrays is not None:
            return self.arrays[i], None
        from lepton.data.readers.io import read_image

        slices = self.slices
        if slices == "auto":  # segmentation's rule: volumes whole, 2-D images as they are
            from lepton.data.readers.masks import is_volume

            slices = "volume" if is_volume(self.paths[i]) else "middle"
        frames = read_image(self.paths[i], window=self.window, slices=slices, steps=self.steps)
        if len(frames) != 1:
            raise DataError(f"{self.paths[i]}: holds {len(frames)} frames; an unlabelled case is one image or "
                            "volume (set slices=middle or volume)")
        if self.patients[i] is None and frames[0].patient is not None:
            self.patients[i] = frames[0].patient
        return frames[0].pixels, frames[0].affine

    def unseen(self, known: set[str], batch_size: int):
        """The pool a batch at a time, without the images whose pixel hash is in ``known`` (cases labelled already):
        ``(start, indices, images)`` per batch of ``batch_size`` positions that keeps at least one image."""
        for start in range(0, len(self), batch_size):
            idx, images = [], []
            for i in range(start, min(start + batch_size, len(self))):
                pixels = self.read(i)[0]
                if pixel_hash(pixels) not in known:
                    idx.append(i)
                    images.append(pixels)
            if idx:
                yield start, idx, images

    def batch(self, indices, spec: Preprocessing) -> torch.Tensor:
        """The cases at ``indices`` decoded and preprocessed with ``spec`` (in [0, 1], not normalised)."""
        idx = [int(i) for i in indices]
        if self.arrays is not None:
            return spec.resize(self.arrays[idx])
        return spec.resize([self.read(i)[0] for i in idx])

    def scan(self, progress: bool = False) -> list[str]:
        """Decode every case once (streamed, nothing kept): the pixel hashes, filling patients from DICOM headers."""
        hashes = []
        cases = range(len(self))
        if progress and len(self) > 64:
            from rich.progress import track

            cases = track(cases, description="reading the unlabelled cases", transient=True)
        for i in cases:
            hashes.append(pixel_hash(self.read(i)[0]))
        return hashes

    def subset(self, keep: np.ndarray) -> UnlabelledSet:
        """The cases where ``keep`` (a boolean mask or indices) holds."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, dtype=int)
        return UnlabelledSet(self.source, [self.names[i] for i in idx],
                             [self.paths[i] for i in idx] if self.paths else [],
                             self.arrays[idx] if self.arrays is not None else None,
                             [self.patients[i] for i in idx], self.window, self.slices, self.steps)


def load_unlabelled(source: str | Path, *, window: str | None = None, slices: str = "middle",
                    steps: list[dict] | None = None) -> UnlabelledSet:
    """List an unlabelled source without decoding it: a folder (every image file below it, class folders or not;
    with ``slices="volume"``, a folder of DICOM files is one series), a CSV with a ``path`` column (``patient_id``
    optional; any ``label`` column is ignored) or an ``.npz`` (``images``, else ``train_images``). ``slices="auto"``
    reads volumes whole and 2-D images as they are (as segmentation does)."""
    path = Path(str(source)).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (an unlabelled source is a folder, a .csv with a path "
                        "column, or a .npz)")
    if path.suffix.lower() == ".npz":
        return _npz(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        paths, patients = _manifest(path)
    elif path.is_dir():
        paths = _folder(path, slices)
        patients = [None] * len(paths)
    else:
        raise DataError(f"{path}: an unlabelled source is a folder, a .csv with a path column, or a .npz")
    if not paths:
        raise DataError(f"{path}: no image files found")
    root = path if path.is_dir() else path.parent
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths]
    return UnlabelledSet(str(source), names, paths, None, patients, window, slices, steps)


def _npz(path: Path) -> UnlabelledSet:
    from lepton.data.readers.medmnist import _to_nchw

    try:
        npz = np.load(path, allow_pickle=False)
        key = "images" if "images" in npz.files else "train_images" if "train_images" in npz.files else None
        if key is None:
            raise DataError(f"{path}: no 'images' or 'train_images' array (keys: {sorted(npz.files)}); the val and "
                            "test images of a labelled file are never used as unlabelled data")
        arrays = _to_nchw(path, key.split("_")[0], npz[key])
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from exc
    return UnlabelledSet(str(path), [f"{path.name}#{i}" for i in range(len(arrays))], [], arrays,
                         [None] * len(arrays))


def _manifest(path: Path) -> tuple[list[Path], list[str | None]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from exc
    if not rows or "path" not in rows[0]:
        raise DataError(f"{path}: an unlabelled manifest needs a header with a path column "
                        "(path[,patient_id]) and at least one row")
    empty = [n for n, r in enumerate(rows, start=2) if not r["path"]]
    if empty:
        raise DataError(f"{path}: line {empty[0]}: empty path")
    paths = [Path(r["path"]) if Path(r["path"]).is_absolute() else path.parent / r["path"] for r in rows]
    patients = [pseudonymize(r["patient_id"]) if r.get("patient_id") else None for r in rows]
    return paths, patients


def _folder(root: Path, slices: str) -> list[Path]:
    out: list[Path] = []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        if any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() not in _SKIP_SUFFIXES)
        subdirs = [p for p in folder.iterdir() if p.is_dir()]
        if slices == "volume" and files and not subdirs and all(p.suffix.lower() in (".dcm", "") for p in files) \
                and len(files) > 1:
            out.append(folder)  # a DICOM series: one volume
        else:
            out.extend(files)
    return out


def check_pool(pool: UnlabelledSet, pool_hashes: list[str], labelled, splits: np.ndarray,
               held_out: tuple[str, ...] = ("val", "test")) -> None:
    """Refuse an unlabelled pool that shares an image (same pixels) or a patient with the labelled set's val or test
    splits: a model must not see the images it is judged on, labelled or not. Names the cases and the fix."""
    held = np.isin(splits, held_out)
    if not held.any():
        return
    held_set = labelled.subset(held)  # images alone: a segmentation case's hash would include its mask
    held_hashes = dict(zip(held_set.image_hashes(), held_set.names, strict=True))
    same = [(pool.names[i], held_hashes[h]) for i, h in enumerate(pool_hashes) if h in held_hashes]
    if same:
        shown = "; ".join(f"{a} = {b}" for a, b in same[:5]) + (f" (+{len(same) - 5} more)" if len(same) > 5 else "")
        raise DataError(f"{pool.source}: {len(same)} unlabelled image(s) are val/test images of {labelled.source} "
                        f"({shown}); remove them from the unlabelled pool")
    if labelled.has_patient_ids:
        held_patients = {g for g, keep in zip(labelled.groups.tolist(), held, strict=True) if keep}
        shared = sorted({pool.names[i] for i, p in enumerate(pool.patients) if p is not None and p in held_patients})
        if shared:
            raise DataError(f"{pool.source}: {len(shared)} unlabelled case(s) belong to patients in the val/test "
                            f"splits of {labelled.source} ({', '.join(shared[:5])}); remove those patients' images "
                            "from the pool or move the patients out of val/test")
