"""Labelled clips: a CSV manifest of sequences (multi-frame DICOM, videos, frame folders, still images as one-frame
clips, WFDB signal records) with a class or a value per clip and, optionally, clinical covariates from its other
columns.

Each clip is read at a fixed frame rate and length (``lepton.data.readers.sequence``: only those frames are decoded)
and each frame resized to the network's square size when read, so memory holds (C, T, S, S) per clip and no more.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton.data.base import pseudonymize
from lepton.data.index.dataset import SPLITS
from lepton.data.readers.covariates import CovariateSchema, check_table
from lepton.data.readers.manifest import read_rows
from lepton.errors import DataError

log = logging.getLogger("lepton.data")
MAX_ROWS = 1_000_000
#: Regression targets are split stratified by this many quantile bins.
VALUE_BINS = 4


@dataclass
class ClipSet:
    """Clips (C, T, H, W) in [0, 1] with their targets: ``labels`` are class indices — for a regression target the
    value's quantile bin, which only stratifies the splits — and ``values`` the regression targets (else None).
    ``covariates`` holds each clip's checked covariates by name (empty dicts when none are declared)."""

    images: list[np.ndarray]
    labels: np.ndarray
    label_names: list[str]
    splits: np.ndarray
    groups: np.ndarray
    names: list[str]
    modalities: list[str]
    source: str
    values: np.ndarray | None = None
    covariates: list[dict[str, Any]] = field(default_factory=list)
    has_patient_ids: bool = False
    partial_labels: bool = False
    bad_files: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def spatial_dims(self) -> int:
        """3 for clips of frames (C, T, H, W), 1 for signals (C, T)."""
        return 1 if self.images and self.images[0].ndim == 2 else 3

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(im.shape) for im in self.images]

    def subset(self, mask: np.ndarray) -> ClipSet:
        idx = np.flatnonzero(mask)
        return ClipSet([self.images[i] for i in idx], self.labels[idx], self.label_names, self.splits[idx],
                       self.groups[idx], [self.names[i] for i in idx], [self.modalities[i] for i in idx],
                       self.source, None if self.values is None else self.values[idx],
                       [self.covariates[i] for i in idx] if self.covariates else [], self.has_patient_ids,
                       self.partial_labels)

    def missing_classes(self, chosen: np.ndarray) -> list[str]:
        if self.values is not None:
            return []
        counts = np.bincount(self.labels[chosen], minlength=len(self.label_names))
        return [self.label_names[i] for i in np.flatnonzero(counts == 0)]

    def content_hashes(self) -> list[str]:
        """SHA-256 of each clip's frames with its target and covariates (the run's data fingerprint)."""
        out = []
        for i, img in enumerate(self.images):
            h = hashlib.sha256(str(img.shape).encode() + np.ascontiguousarray(img, np.float32).tobytes())
            if self.values is not None:
                h.update(repr(float(self.values[i])).encode())
            if self.covariates:
                h.update(repr(sorted(self.covariates[i].items())).encode())
            out.append(h.hexdigest())
        return out


def read_clip(path: Path, *, fps: float, length: int, size: int, mode: str = "uniform",
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, str, str | None]:
    """One clip as (C, T, size, size) float32 in [0, 1], its modality and patient pseudonym: a sequence source read
    at ``fps`` and ``length`` (``read_sequence``), or a still image repeated ``length`` times. A signal record
    (WFDB) is (C, T) in its physical units, resampled to ``fps`` samples per second, ``length`` of them."""
    import torch
    import torch.nn.functional as F

    from lepton.data.readers.io import read_image, sniff_format
    from lepton.data.readers.sequence import read_sequence
    from lepton.data.readers.video import is_video

    if path.is_dir() or path.suffix.lower() == ".hea" or (path.is_file() and (
            is_video(path) or sniff_format(path) == "dicom")):
        clip = read_sequence(path, fps=fps, length=length, mode=mode, rng=rng)
        if clip.frames.ndim == 2:  # a signal record: samples (T, C) in physical units, as (C, T)
            return np.ascontiguousarray(clip.frames.T, np.float32), clip.modality, clip.patient
        frames, modality, patient = clip.frames, clip.modality, clip.patient
    else:
        frame = read_image(path)[0]
        if frame.pixels.ndim != 3:
            raise DataError(f"{path}: a volume, not an image or a clip")
        frames, modality, patient = np.repeat(frame.pixels[None], length, 0), frame.modality, frame.patient
    x = torch.from_numpy(np.ascontiguousarray(frames))
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area" if min(x.shape[-2:]) >= size else "bilinear",
                          **({} if min(x.shape[-2:]) >= size else {"align_corners": False}))
    return x.permute(1, 0, 2, 3).contiguous().numpy(), modality, patient


def _video_folder_rows(root: Path, target: str, covariates: CovariateSchema | None
                       ) -> tuple[list[str], list[dict[str, str]]]:
    """Class folders of videos (``root/CLASS/*.mp4``, or ``root/SPLIT/CLASS/…``) as manifest rows."""
    from lepton.data.readers.video import VIDEO_SUFFIXES

    if target != "class" or covariates is not None:
        raise DataError(f"{root}: class folders of videos give a class per clip and no covariates; for values or "
                        "covariates list the clips in a manifest.csv (path,label,…)")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_layout = bool(subdirs) and {p.name for p in subdirs} <= set(SPLITS)
    rows = []
    for base in subdirs if split_layout else [root]:
        for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for file in sorted(folder.iterdir()):
                if file.is_file() and file.suffix.lower() in VIDEO_SUFFIXES:
                    rows.append({"path": str(file), "label": folder.name,
                                 "split": base.name if split_layout else ""})
    if not rows:
        raise DataError(f"{root}: no manifest.csv and no class folders of videos "
                        f"({', '.join(VIDEO_SUFFIXES)}) to read clips from")
    if len(rows) > MAX_ROWS:
        raise DataError(f"{root}: more than {MAX_ROWS} videos")
    return ["path", "label", "split"], rows


def load_clips(source: str | Path, *, fps: float, length: int, size: int, target: str = "class",
               covariates: CovariateSchema | None = None, skip_bad: bool = False) -> ClipSet:
    """The clips a CSV manifest lists (``path,label[,patient_id][,split]`` and covariate columns; a folder holding
    ``manifest.csv`` names that file), or class folders of videos (``root/CLASS/*.mp4``, optionally under
    ``train/``, ``val/``, ``test/``). ``target``: ``class`` (labels are class names) or ``value`` (labels are
    numbers: a regression target)."""
    from rich.progress import Progress

    from lepton.data.index.dataset import report_bad

    path = Path(source)
    if target not in ("class", "value"):
        raise DataError(f"target={target!r} is not one of class, value")
    if path.is_dir() and not (path / "manifest.csv").is_file():
        header, rows = _video_folder_rows(path, target, covariates)
        path = path / "manifest.csv"  # relative paths below are taken from here: the folder itself
    else:
        path = path / "manifest.csv" if path.is_dir() else path
        if not path.is_file():
            raise DataError(f"{source}: no clip manifest (a CSV file, a folder holding manifest.csv, or class "
                            "folders of videos)")
        header, rows = read_rows(path, MAX_ROWS)
    missing = {"path", "label"} - set(header)
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}; the header must be "
                        f"path,label[,patient_id][,split][,covariates…] (found: {', '.join(header) or 'no header'})")
    if not rows:
        raise DataError(f"{path}: the manifest lists no clips")
    problems = []
    for line, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("label"):
            problems.append(f"line {line}: empty path or label")
        if row.get("split", "") and row["split"] not in SPLITS:
            problems.append(f"line {line}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
        if target == "value":
            try:
                if not np.isfinite(float(row.get("label", ""))):
                    raise ValueError
            except ValueError:
                problems.append(f"line {line}: label {row.get('label')!r} is not a finite number (target=value)")
    if problems:
        raise DataError(f"{path}: invalid manifest:\n  " + "\n  ".join(problems[:50]))
    table = check_table(covariates, header, rows, str(path)) if covariates is not None else []
    if target == "value":
        label_names = ["value"]
    else:
        label_names = sorted({r["label"] for r in rows})
        if all(x.lstrip("-").isdigit() for x in label_names):
            label_names = sorted(label_names, key=int)
    index = {n: i for i, n in enumerate(label_names)}
    images, keep, modalities, groups, names, bad = [], [], [], [], [], []
    with Progress(transient=True, disable=len(rows) < 50) as progress:
        bar = progress.add_task(f"reading {len(rows)} clips", total=len(rows))
        for i, row in enumerate(rows):
            file = Path(row["path"]) if Path(row["path"]).is_absolute() else path.parent / row["path"]
            try:
                clip, modality, patient = read_clip(file, fps=fps, length=length, size=size)
            except DataError as exc:
                bad.append((str(file), str(exc).removeprefix(f"{file}: ")))
                continue
            finally:
                progress.advance(bar)
            images.append(clip)
            keep.append(i)
            modalities.append(modality)
            pid = row.get("patient_id")
            groups.append(pseudonymize(pid) if pid else (patient or f"file:{file}"))
            names.append(str(file))
    report_bad(str(path), bad, skip_bad)
    if not images:
        raise DataError(f"{path}: no clip could be read")
    kinds = {(im.ndim, im.shape[0]) if im.ndim == 2 else (im.ndim,) for im in images}
    if len(kinds) > 1:
        signals = [n for n, im in zip(names, images, strict=True) if im.ndim == 2][:3]
        raise DataError(f"{path}: the manifest mixes signal records with different channel counts, or signals with "
                        f"frame clips (e.g. {', '.join(signals)}); one data set holds one kind")
    kept = [rows[i] for i in keep]
    if target == "value":
        values = np.asarray([float(r["label"]) for r in kept], np.float32)
        edges = np.quantile(values, np.linspace(0, 1, VALUE_BINS + 1)[1:-1]) if len(values) >= 2 * VALUE_BINS \
            else np.array([])
        labels = np.searchsorted(edges, values, side="right").astype(np.int64)
    else:
        values, labels = None, np.asarray([index[r["label"]] for r in kept], np.int64)
        if len(set(labels.tolist())) < 2:
            raise DataError(f"{path}: only one class ({label_names[int(labels[0])]}); a classifier needs two")
    return ClipSet(images, labels, label_names, np.asarray([r.get("split", "") for r in kept], object),
                   np.asarray(groups, object), names, modalities, str(path), values,
                   [table[i] for i in keep] if table else [], any(r.get("patient_id") for r in kept),
                   bad_files=bad)
