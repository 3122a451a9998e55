"""Image + mask cases held on disk: decoded once into the case cache (in parallel), then read a patch at a time.

``cache_segmentation`` turns a segmentation source (Decathlon folder, paired folders, CSV) into a ``CaseStore``:
every case is decoded, preprocessed (window, volume steps) and written to the ``CaseCache`` by worker processes, or
found there from an earlier run. The store keeps only metadata in memory — shapes, geometry, class voxel counts,
intensity sums, content hashes — so splits, fingerprints and class checks need no pixels; training reads patches
from memory-mapped cases, and validation reads one case at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton.data.index.cache import CaseCache, Entry
from lepton.data.index.dataset import report_bad
from lepton.errors import DataError

log = logging.getLogger("lepton.data")

#: Foreground voxel coordinates kept per case for foreground-centred patches (as nnU-Net samples class locations).
FG_SAMPLE = 10_000


def _build(image: str, mask: str, window: str | None, steps: list[dict] | None, root: str, source: str):
    """One case into the cache (a worker's job): ``(key, meta, decoded now)``, or ``(None, reason, False)`` for a
    bad pair."""
    from lepton.data.readers.masks import read_pair

    cache = CaseCache(root)
    try:
        key = cache.key([Path(image), Path(mask)], {"kind": "segmentation", "window": window or None,
                                                     "steps": steps or []})
        found = cache.get(key)
        if found is not None:
            return key, found.meta, False
        pixels, labels, affine, modality, patient = read_pair(Path(image), Path(mask), window=window, steps=steps)
    except DataError as exc:
        return None, str(exc).removeprefix(f"{image}: "), False
    except OSError as exc:
        return None, f"unreadable ({exc})", False
    pixels = np.ascontiguousarray(pixels, np.float32)
    labels = np.ascontiguousarray(labels, np.uint8)
    # one pass over the pixels for both hashes (image alone; image and mask), without copying them
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(pixels.data)
    image_sha = digest.hexdigest()
    digest.update(labels.data)
    content = digest.hexdigest()
    stored, scale = compact(pixels)
    fg = np.argwhere(labels[0] > 0).astype(np.int32)
    if len(fg) > FG_SAMPLE:
        fg = fg[np.random.default_rng(int(content[:8], 16)).choice(len(fg), FG_SAMPLE, replace=False)]
    axes = tuple(range(1, pixels.ndim))
    meta = {"source": source, "image": image, "mask": mask, "shape": list(pixels.shape), "modality": modality,
            "patient": patient, "affine": None if affine is None else np.asarray(affine).tolist(),
            "class_counts": np.bincount(labels.ravel()).tolist(), "content_sha256": content,
            "image_sha256": image_sha, "image_scale": scale,
            "sum": pixels.sum(axis=axes, dtype=np.float64).tolist(),
            "sumsq": np.square(pixels, dtype=np.float64).sum(axis=axes).tolist()}
    entry = cache.put(key, {"image": stored, "mask": labels, "fg": fg.reshape(-1, pixels.ndim - 1)}, meta)
    return key, entry.meta, True


def compact(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """How an image is stored: values in [0, 1] (what the readers give) as uint16 steps of 1/65535 — half the disk
    and page cache of float32, at most 7.7e-6 off, far below the 1/4096 of a 12-bit CT's unit steps — with the scale
    that reads them back; anything else as float32, scale 1."""
    if pixels.size and float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0:
        return np.rint(pixels * np.float32(65535)).astype(np.uint16), 1.0 / 65535
    return pixels, 1.0


def stored_values(part: np.ndarray, scale: float) -> np.ndarray:
    """Stored image values (a region of a memory map, uint16 or float32) as float32 in [0, 1] (``compact``)."""
    values = np.array(part, np.float32)
    return values * np.float32(scale) if scale != 1.0 else values


def run_jobs(build: Callable[..., Any], jobs: list[tuple], workers: int, label: str, quiet: bool) -> list[Any]:
    """``build(*job)`` for every job, in order, in ``workers`` spawned processes (in this one for a single worker),
    with a progress bar: how both caches decode their sources. ``build`` must be a module-level function."""
    results: list[Any] = [None] * len(jobs)
    with _Progress(len(jobs), label, quiet) as progress:
        if workers == 1:
            for i, job in enumerate(jobs):
                results[i] = build(*job)
                progress.advance()
        else:
            import multiprocessing

            # spawn, not fork: the parent may hold PyTorch's thread pools, which a forked child must not inherit
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(build, *job): i for i, job in enumerate(jobs)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    progress.advance()
    return results


def cache_segmentation(source: str | Path, *, window: str | None = None, steps: list[dict] | None = None,
                       skip_bad: bool = False, validate: bool = True, cache: CaseCache | None = None,
                       workers: int | None = None, quiet: bool = False) -> CaseStore:
    """A segmentation source decoded into the cache (what is there already is verified and reused) as a store.
    ``workers`` processes decode in parallel (default: every core); a progress bar shows on a terminal."""
    from lepton.data.readers.masks import segmentation_records

    cache = cache or CaseCache()
    path, records, names = segmentation_records(source)
    workers = max(1, min(workers or os.cpu_count() or 1, len(records) or 1))
    jobs = [(str(image), str(mask), window, steps, str(cache.root), str(path.absolute()))
            for image, mask, _, _ in records]
    start = time.perf_counter()
    results = run_jobs(_build, jobs, workers, f"caching {path.name}", quiet)
    built = sum(1 for _key, _meta, decoded in results if decoded)
    log.info("%d case(s) of %s in the cache %s, %d decoded now (%.1f s, %d worker(s))", len(jobs), path,
             cache.root, built, time.perf_counter() - start, workers)
    entries, splits, groups, bad = [], [], [], []
    has_patient = False
    for (image, _mask, split, patient), (key, meta, _) in zip(records, results, strict=True):
        if key is None:
            bad.append((str(image), meta))
            continue
        entries.append(Entry(cache.folder(key), meta))
        group = patient or meta.get("patient")
        has_patient = has_patient or group is not None
        splits.append(split)
        groups.append(group or f"file:{image}")
    report_bad(str(path), bad, skip_bad)
    top = max((len(e.meta["class_counts"]) - 1 for e in entries), default=0)
    if names is None:
        names = ["background", *[f"class {k}" for k in range(1, top + 1)]] if top > 1 else ["background", "foreground"]
    if top >= len(names):
        raise DataError(f"{path}: masks hold class {top} but only {len(names)} label names are given "
                        f"({', '.join(names)})")
    store = CaseStore(entries, names, np.asarray(splits, dtype=object), np.asarray(groups, dtype=object),
                      str(path), has_patient, bad, decoded=built)
    return store.validate() if validate else store


@dataclass
class CaseStore:
    """Cases in the cache, by metadata; pixels are read on demand. Mirrors ``MaskSet`` where splits, fingerprints
    and checks look (``labels``, ``groups``, ``splits``, ``content_hashes``, ``missing_classes``, ``validate``)."""

    entries: list[Entry]
    label_names: list[str]
    splits: np.ndarray
    groups: np.ndarray
    source: str
    has_patient_ids: bool = False
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    #: The size the in-memory path would pad every case to (set by the task): normalisation statistics match it.
    pad_to: tuple[int, ...] | None = None
    #: How many cases were decoded by the call that made the store (the rest came from the cache).
    decoded: int = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, idx) -> CaseStore:
        """The cases at ``idx`` (an index array or tensor), as a store."""
        picked = np.asarray(idx).reshape(-1).astype(np.int64)
        return CaseStore([self.entries[i] for i in picked], self.label_names, self.splits[picked],
                         self.groups[picked], self.source, self.has_patient_ids, pad_to=self.pad_to)

    def subset(self, mask: np.ndarray) -> CaseStore:
        return self[np.flatnonzero(mask)]

    @property
    def names(self) -> list[str]:
        return [e.meta["image"] for e in self.entries]

    @property
    def modalities(self) -> list[str]:
        return [e.meta.get("modality") for e in self.entries]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Each case's array shape (C, …)."""
        return [tuple(e.meta["shape"]) for e in self.entries]

    @property
    def labels(self) -> np.ndarray:
        """1 for cases with any foreground (the stratum of splits, as ``MaskSet.labels``)."""
        return np.array([int(sum(e.meta["class_counts"][1:]) > 0) for e in self.entries], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def spatial_dims(self) -> int:
        return len(self.entries[0].meta["shape"]) - 1 if self.entries else 2

    def content_hashes(self) -> list[str]:
        """The same SHA-256 per case as ``MaskSet.content_hashes`` (decoded image and mask), from the metadata."""
        return [e.meta["content_sha256"] for e in self.entries]

    def image_hashes(self) -> list[str]:
        """SHA-256 of each case's image alone, as ``MaskSet.image_hashes``, from the metadata (taken of the decoded
        float32 image before it was stored)."""
        return [e.meta["image_sha256"] for e in self.entries]

    def class_counts(self) -> np.ndarray:
        """Voxels per class over all cases."""
        out = np.zeros(self.num_classes, np.int64)
        for e in self.entries:
            counts = e.meta["class_counts"][: self.num_classes]
            out[: len(counts)] += counts
        return out

    def missing_classes(self, chosen: np.ndarray) -> list[str]:
        seen = np.zeros(self.num_classes, bool)
        for i in np.flatnonzero(chosen):
            counts = np.asarray(self.entries[i].meta["class_counts"][: self.num_classes])
            seen[: len(counts)] |= counts > 0
        return [self.label_names[k] for k in range(1, self.num_classes) if not seen[k]]

    def validate(self) -> CaseStore:
        from lepton.data.readers.masks import check_cases

        check_cases(self.source, len(self), self.label_names, {len(s) for s in self.shapes},
                    self.missing_classes(np.ones(len(self), bool)), self.splits)
        return self

    # -- pixels ---------------------------------------------------------------------------------------------------
    def image(self, i: int) -> np.ndarray:
        """Case ``i``'s image (C, …) float32 in memory."""
        return stored_values(*self.image_source(i))

    def image_source(self, i: int) -> tuple[np.ndarray, float]:
        """Case ``i``'s image as stored (a memory map, uint16 or float32) and the scale that gives its values."""
        return self.entries[i].array("image"), float(self.entries[i].meta.get("image_scale", 1.0))

    def mask(self, i: int) -> np.ndarray:
        return np.array(self.entries[i].array("mask"))

    def affine(self, i: int) -> np.ndarray | None:
        value = self.entries[i].meta.get("affine")
        return None if value is None else np.asarray(value)

    def to_memory(self):
        """The cases read into a ``MaskSet`` (the in-memory path, for sets that fit): the stored images (within
        7.7e-6 of the decoding), keyed by the decoding's hashes."""
        from lepton.data.readers.masks import MaskSet

        return MaskSet([self.image(i) for i in range(len(self))], [self.mask(i) for i in range(len(self))],
                       [self.affine(i) for i in range(len(self))], self.label_names, self.splits, self.groups,
                       self.names, self.modalities, self.source, self.has_patient_ids, self.bad_files,
                       known_content_hashes=self.content_hashes(), known_image_hashes=self.image_hashes())

    def padded_stats(self, size: tuple[int, ...]) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation of the cases centre-padded with zeros to ``size`` — what the
        in-memory path computes over its padded tensor — from the stored sums."""
        total = np.sum([e.meta["sum"] for e in self.entries], axis=0)
        squares = np.sum([e.meta["sumsq"] for e in self.entries], axis=0)
        count = len(self) * float(np.prod(size))
        mean = total / count
        var = np.maximum(squares / count - mean ** 2, 0.0) * count / max(count - 1, 1)
        return mean.tolist(), np.sqrt(var).tolist()

    def padded_means(self, size: tuple[int, ...]) -> np.ndarray:
        """Each case's mean intensity over all channels when centre-padded with zeros to ``size``."""
        return np.array([float(np.sum(e.meta["sum"])) / (len(e.meta["sum"]) * float(np.prod(size)))
                         for e in self.entries])

    def patches(self, size: tuple[int, ...], generator, fg_share: float = 1 / 3):
        """One patch of ``size`` per case as tensors (N, C, …) float32 and (N, 1, …) int64: centred on a stored
        foreground voxel for ``fg_share`` of the patches, anywhere in the case (centre-padded when smaller) for the
        rest. Only the patch's region of each case is read: MONAI's ``RandCropByPosNegLabeld`` needs whole cases
        (reading them made the same batches 3.5-22× slower, ``benchmarks/transforms.py``)."""
        import torch

        xs, ys = [], []
        for i, entry in enumerate(self.entries):
            shape = tuple(entry.meta["shape"][1:])
            extent = [max(s, p) for s, p in zip(shape, size, strict=True)]
            offset = [int((e - s) / 2) for e, s in zip(extent, shape, strict=True)]
            fg = None
            if float(torch.rand(1, generator=generator)) < fg_share:
                coords = entry.array("fg")
                if len(coords):
                    fg = np.asarray(coords[int(torch.randint(len(coords), (1,), generator=generator))])
            if fg is not None:
                start = [int(min(max(int(c) + o - p // 2, 0), e - p))
                         for c, o, p, e in zip(fg, offset, size, extent, strict=True)]
            else:
                start = [int(torch.randint(e - p + 1, (1,), generator=generator)) for e, p in zip(extent, size,
                                                                                                 strict=True)]
            xs.append(stored_values(self._region(i, "image", start, offset, size, shape, np.float32),
                                    entry.meta.get("image_scale", 1.0)))
            ys.append(self._region(i, "mask", start, offset, size, shape, np.uint8))
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))

    def _region(self, i: int, name: str, start, offset, size, shape, dtype) -> np.ndarray:
        """The patch at ``start`` (in the padded case's coordinates) read from the memory map, zeros outside."""
        arr = self.entries[i].array(name)
        out = np.zeros((arr.shape[0], *size), dtype)
        src, dst = [], []
        for a, o, p, s in zip(start, offset, size, shape, strict=True):
            lo, hi = max(a - o, 0), min(a - o + p, s)
            src.append(slice(lo, max(hi, lo)))
            dst.append(slice(lo - (a - o), lo - (a - o) + max(hi - lo, 0)))
        out[(slice(None), *dst)] = arr[(slice(None), *src)]
        del arr
        return out


class _Progress:
    """A rich progress bar on a terminal; nothing otherwise (the caller logs a line at the end)."""

    def __init__(self, total: int, label: str, quiet: bool):
        self.bar = None
        if not quiet and total and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                transient=True)
            self.task = self.bar.add_task(label, total=total)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
