"""The in-memory labelled image set every reader produces, with its validation."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lepton.data.readers.io import read_image
from lepton.errors import DataError

log = logging.getLogger("lepton.data")

SPLITS = ("train", "val", "test")


@dataclass
class ImageSet:
    """Labelled images in memory.

    ``images`` holds float32 arrays (C, H, W) in [0, 1] — volumes (C, D, H, W) — either a list (mixed sizes) or
    one stacked array (N, C, H, W) / (N, C, D, H, W). ``splits`` holds "train"/"val"/"test" or "" when the source
    has none.
    ``groups`` holds a patient pseudonym (or the source file) so that one patient or volume never
    spans two splits.
    """

    images: list[np.ndarray] | np.ndarray
    labels: np.ndarray
    label_names: list[str]
    splits: np.ndarray
    groups: np.ndarray
    names: list[str]
    modalities: list[str]
    source: str
    has_patient_ids: bool = False
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    # One site's share of a larger set (``lepton data partition``): the label set is the whole set's, and a class
    # may have no image here (label skew).
    partial_labels: bool = False
    #: Each image's checked clinical covariates by name (``lepton.data.readers.covariates``), when a manifest's
    #: columns are declared as covariates; empty otherwise.
    covariates: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def spatial_dims(self) -> int:
        """2 for images (C, H, W), 3 for volumes (C, D, H, W)."""
        first = self.images[0] if len(self.images) else np.zeros((1, 1, 1))
        return int(np.ndim(first)) - 1

    def image(self, i: int) -> np.ndarray:
        return self.images[i]

    def subset(self, mask: np.ndarray) -> ImageSet:
        idx = np.flatnonzero(mask)
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        return ImageSet(
            images=images,
            labels=self.labels[idx],
            label_names=self.label_names,
            splits=self.splits[idx],
            groups=self.groups[idx],
            names=[self.names[i] for i in idx],
            modalities=[self.modalities[i] for i in idx],
            source=self.source,
            has_patient_ids=self.has_patient_ids,
            partial_labels=self.partial_labels,
            covariates=[self.covariates[i] for i in idx] if self.covariates else [],
        )

    def missing_classes(self, chosen: np.ndarray) -> list[str]:
        """Classes that no chosen image has."""
        counts = np.bincount(self.labels[chosen], minlength=self.num_classes)
        return [self.label_names[i] for i in np.flatnonzero(counts == 0)]

    def content_hashes(self) -> list[str]:
        """SHA-256 of each image's decoded pixels (exact-duplicate and fingerprint key), with its covariates when
        there are any."""
        out = []
        for i, img in enumerate(self.images):
            h = hashlib.sha256(str(np.shape(img)).encode() + np.ascontiguousarray(img, dtype=np.float32).tobytes())
            if self.covariates:
                h.update(repr(sorted(self.covariates[i].items())).encode())
            out.append(h.hexdigest())
        return out

    def image_hashes(self) -> list[str]:
        """The images' hashes (``content_hashes``: an image set's cases are their pixels)."""
        return self.content_hashes()

    def validate(self) -> ImageSet:
        """Raise DataError for an empty set, a single class, empty classes (except in a site's share, see
        ``partial_labels``) or bad labels."""
        n = len(self.labels)
        if n == 0:
            raise DataError(f"{self.source}: no images were found")
        if len(self.images) != n:
            raise DataError(f"{self.source}: {len(self.images)} images but {n} labels")
        if self.labels.min() < 0 or self.labels.max() >= len(self.label_names):
            raise DataError(
                f"{self.source}: labels must lie in 0..{len(self.label_names) - 1} "
                f"(found {int(self.labels.min())}..{int(self.labels.max())})"
            )
        if len(self.label_names) < 2:
            raise DataError(
                f"{self.source}: only one class ({self.label_names[0] if self.label_names else '?'}); "
                "a classifier needs at least two"
            )
        counts = np.bincount(self.labels, minlength=len(self.label_names))
        empty = [self.label_names[i] for i in np.flatnonzero(counts == 0)]
        if empty and not self.partial_labels:
            raise DataError(f"{self.source}: class(es) {', '.join(empty)} have no images")
        bad_splits = sorted(set(self.splits.tolist()) - {"", *SPLITS})
        if bad_splits:
            raise DataError(f"{self.source}: unknown split name(s) {bad_splits}; use train, val, test")
        return self


def report_bad(source: str, bad: list[tuple[str, str]], skip_bad: bool) -> None:
    """Fail listing every bad file, or warn and continue with ``skip_bad``."""
    if not bad:
        return
    listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
    if not skip_bad:
        raise DataError(
            f"{source}: {len(bad)} file(s) could not be read:\n{listing}\n"
            "Fix or remove them, or pass --skip-bad to skip them with a warning."
        )
    log.warning("%s: skipping %d unreadable file(s):\n%s", source, len(bad), listing)


def from_files(
    source: str,
    records: Iterable[tuple[Path, int, str, str | None] | tuple[Path, int, str, str | None, str | None]],
    label_names: list[str],
    *,
    window: str | None,
    slices: str,
    skip_bad: bool,
    steps: list[dict] | None = None,
    covariates: list[dict] | None = None,
) -> ImageSet:
    """Read (path, label, split, patient[, series]) records into an ImageSet, collecting bad files; ``series``
    picks one DICOM series of a folder by UID, or ``*`` every one as its own case. ``covariates``, one mapping per
    record, go with every image its file gives."""
    images, labels, splits, groups, names, modalities = [], [], [], [], [], []
    kept: list[dict] = []
    bad: list[tuple[str, str]] = []
    has_patient = False
    for k, (path, label, split, patient, *rest) in enumerate(records):
        try:
            frames = read_image(path, window=window, slices=slices, steps=steps, series=rest[0] if rest else None)
        except DataError as exc:
            bad.append((str(path), str(exc).removeprefix(f"{path}: ")))
            continue
        for frame in frames:
            group = patient or frame.patient
            has_patient = has_patient or group is not None
            images.append(frame.pixels)
            labels.append(label)
            splits.append(split)
            groups.append(group or f"file:{path}")
            names.append(str(path) if frame.name == path.name else f"{path}{frame.name[len(path.name):]}")
            modalities.append(frame.modality)
            if covariates is not None:
                kept.append(covariates[k])
    report_bad(source, bad, skip_bad)
    return ImageSet(
        images=images,
        labels=np.asarray(labels, dtype=np.int64),
        label_names=label_names,
        splits=np.asarray(splits, dtype=object),
        groups=np.asarray(groups, dtype=object),
        names=names,
        modalities=modalities,
        source=source,
        has_patient_ids=has_patient,
        bad_files=bad,
        covariates=kept,
    )
