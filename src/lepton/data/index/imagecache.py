"""Labelled images (2-D images, or volumes classified whole) held on disk for classification out of core.

``cache_images`` lists a folder or CSV manifest without reading pixels, then decodes every file once — in worker
processes, with a progress bar — into the ``CaseCache``: a metadata entry per file (each frame's native shape,
modality, patient pseudonym and the SHA-256 of its decoded pixels, the same hash ``ImageSet.content_hashes`` gives)
and, once the network's input size is known, a pixel entry per file at that size. The ``ImageStore`` it returns holds
metadata only, so splits, leakage checks and fingerprints need no pixels; ``ImageStore.pixels`` gives
``CachedImages``, which training indexes like a tensor and which reads only the images a batch asks for, from memory
maps.

Pixels are stored at the input size with their own channels (converted to the run's on reading: a linear step, so
the order does not matter): as uint8 when the decoded image holds 8-bit values (PNG, JPEG, 8-bit TIFF: its rounding
is at most half the source's own step, 1/510), else as float16 (relative rounding at most 2^-11). The largest
rounding of each file is recorded in its entry (``max_error``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton.data.index.cache import CaseCache
from lepton.data.index.dataset import ImageSet, from_files, report_bad
from lepton.errors import DataError

log = logging.getLogger("lepton.data")

#: Files decoded in-process to estimate what the in-memory path would hold (``estimate_memory_gb``).
ESTIMATE_SAMPLE = 8


def image_records(source: str | Path) -> tuple[str, list[tuple], list[str]] | None:
    """A folder's or CSV manifest's records (path, label, split, patient[, series]) and label names, listed without
    reading an image; None for sources held in memory as they are (MedMNIST ``.npz``, a site's partition)."""
    from lepton.data.index.partition import is_partition
    from lepton.data.readers.folder import folder_records
    from lepton.data.readers.manifest import manifest_records

    text = str(source)
    if text.startswith("medmnist:"):
        return None
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        records, names = folder_records(path)
    elif path.suffix.lower() in (".csv", ".tsv") and not is_partition(path):
        records, names, _ = manifest_records(path)
    else:
        return None
    return str(path), records, names


def _decode_options(window: str | None, slices: str, steps: list[dict] | None, series: str | None) -> dict:
    return {"window": window or None, "slices": slices, "steps": steps or [], "series": series}


def _frame_hash(pixels: np.ndarray) -> str:
    """As ``ImageSet.content_hashes`` (without covariates)."""
    return hashlib.sha256(str(np.shape(pixels)).encode()
                          + np.ascontiguousarray(pixels, dtype=np.float32).tobytes()).hexdigest()


def _stored(frames: list[np.ndarray], size: tuple[int, ...] | None) -> tuple[np.ndarray, str, float]:
    """Frames at ``size`` (their own channels) as one array to store, its dtype name and the largest rounding."""
    import torch

    from lepton.data.transforms.preprocessing import Preprocessing

    channels = {f.shape[0] for f in frames}
    if len(channels) != 1:
        raise DataError(f"frames of {sorted(channels)} channels in one file")
    c = channels.pop()
    fit = Preprocessing(tuple(size), c, [0.5] * c, [0.5] * c) if size else None
    with torch.inference_mode():
        resized = fit.resize(frames).numpy() if fit is not None else np.stack(frames).astype(np.float32)
    eight_bit = all(f.size == 0 or float(np.abs(np.round(f * 255) - f * 255).max()) < 1e-3 for f in frames)
    if eight_bit:
        out = np.round(np.clip(resized, 0, 1) * 255).astype(np.uint8)
        error = float(np.abs(out.astype(np.float32) / 255 - resized).max()) if out.size else 0.0
        return out, "uint8", error
    out = resized.astype(np.float16)
    return out, "float16", float(np.abs(out.astype(np.float32) - resized).max()) if out.size else 0.0


def _build(path: str, series: str | None, window: str | None, slices: str, steps: list[dict] | None,
           size: int | list[int] | None, root: str, source: str):
    """One file into the cache (a worker's job): ``(meta key, meta, pixel key, decoded now)``, or
    ``(None, reason, None, False)`` for a bad file. Pixels are written when ``size`` is given: a list, or one side
    for every axis of the file's images."""
    from lepton.data.readers.io import read_image

    cache = CaseCache(root)
    decode = _decode_options(window, slices, steps, series)
    try:
        files = [Path(path)]
        mkey = cache.key(files, {"kind": "image-meta", **decode})
        pkey = cache.key(files, {"kind": "image-pixels", **decode, "size": size}) if size else None
        meta = cache.get(mkey)
        if meta is not None and (pkey is None or cache.get(pkey) is not None):
            return mkey, meta.meta, pkey, False
        frames = read_image(Path(path), window=window, slices=slices, steps=steps, series=series)
        if not frames:
            raise DataError(f"{path}: no image in the file")
        if meta is None:
            info = {"source": source, "path": path, "frames": [
                {"name": f.name, "shape": list(f.pixels.shape), "modality": f.modality, "patient": f.patient,
                 "sha256": _frame_hash(f.pixels)} for f in frames]}
            meta = cache.put(mkey, {}, info)
        if pkey is not None:
            full = [size] * (frames[0].pixels.ndim - 1) if isinstance(size, int) else list(size)
            arr, dtype, error = _stored([np.asarray(f.pixels, np.float32) for f in frames], tuple(full))
            cache.put(pkey, {"pixels": arr}, {"source": source, "path": path, "size": full, "dtype": dtype,
                                              "max_error": error})
    except DataError as exc:
        return None, str(exc).removeprefix(f"{path}: "), None, False
    except OSError as exc:
        return None, f"unreadable ({exc})", None, False
    return mkey, meta.meta, pkey, True


def _run(jobs: list[tuple], workers: int | None, label: str, quiet: bool) -> list[Any]:
    """``_build`` over ``jobs`` in ``workers`` spawned processes (every core by default), with a progress bar."""
    from lepton.data.index.cases import run_jobs

    return run_jobs(_build, jobs, max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1)), label, quiet)


def cache_images(source: str | Path, *, window: str | None = None, slices: str = "middle",
                 steps: list[dict] | None = None, image_size: int | None = None, skip_bad: bool = False,
                 validate: bool = True, cache: CaseCache | None = None, workers: int | None = None,
                 quiet: bool = False) -> ImageStore | None:
    """A labelled folder or CSV manifest decoded into the cache (what is there is verified and reused) as an
    ``ImageStore``; None for a source that is held in memory as it is (``image_records``). With ``image_size`` the
    pixels are stored at that square (cubic, for volumes) size in the same pass; otherwise ``ImageStore.pixels``
    decodes them again at the size the run picks."""
    listed = image_records(source)
    if listed is None:
        return None
    name, records, label_names = listed
    cache = cache or CaseCache()
    store = ImageStore([], np.zeros(0, np.int64), label_names, np.zeros(0, object), np.zeros(0, object), [], [],
                       name, records=records, window=window, slices=slices, steps=steps or [], cache=cache,
                       workers=workers, quiet=quiet)
    results = store._build(image_size)
    bad, frames, labels, splits, groups, names, modalities, hashes, shapes = [], [], [], [], [], [], [], [], []
    has_patient = False
    for k, (record, (mkey, meta, _pkey, _)) in enumerate(zip(records, results, strict=True)):
        path, label, split, patient = record[:4]
        if mkey is None:
            bad.append((str(path), meta))
            continue
        for j, frame in enumerate(meta["frames"]):
            group = patient or frame["patient"]
            has_patient = has_patient or group is not None
            frames.append((k, j))
            labels.append(label)
            splits.append(split)
            groups.append(group or f"file:{path}")
            names.append(str(path) if frame["name"] == Path(path).name
                         else f"{path}{frame['name'][len(Path(path).name):]}")
            modalities.append(frame["modality"])
            hashes.append(frame["sha256"])
            shapes.append(tuple(frame["shape"]))
    report_bad(name, bad, skip_bad)
    store.frames, store.labels = frames, np.asarray(labels, np.int64)
    store.splits, store.groups = np.asarray(splits, dtype=object), np.asarray(groups, dtype=object)
    store.names, store.modalities, store.hashes, store.shapes = names, modalities, hashes, shapes
    store.has_patient_ids, store.bad_files = has_patient, bad
    return store.validate() if validate else store


@dataclass
class ImageStore:
    """Labelled images in the cache, by metadata; mirrors ``ImageSet`` where splits, fingerprints and checks look
    (``labels``, ``splits``, ``groups``, ``content_hashes``, ``missing_classes``, ``validate``). ``frames`` holds
    (record, frame) pairs: a file may give several images (a volume's slices)."""

    frames: list[tuple[int, int]]
    labels: np.ndarray
    label_names: list[str]
    splits: np.ndarray
    groups: np.ndarray
    names: list[str]
    modalities: list[str]
    source: str
    has_patient_ids: bool = False
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    #: Each image's decoded shape (C, H, W) or (C, D, H, W), before any resizing.
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    records: list[tuple] = field(default_factory=list)
    window: str | None = None
    slices: str = "middle"
    steps: list[dict] = field(default_factory=list)
    cache: CaseCache | None = None
    workers: int | None = None
    quiet: bool = False
    #: How many files the last build decoded (the rest came from the cache).
    decoded: int = 0
    partial_labels: bool = False
    covariates: list[dict] = field(default_factory=list)
    #: Pixel entries already built and verified, by size key and record: ``pixels`` does not check them again.
    pixel_keys: dict[Any, dict[int, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def spatial_dims(self) -> int:
        return len(self.shapes[0]) - 1 if self.shapes else 2

    def subset(self, mask: np.ndarray) -> ImageStore:
        idx = np.flatnonzero(mask)
        import dataclasses

        return dataclasses.replace(
            self, frames=[self.frames[i] for i in idx], labels=self.labels[idx], splits=self.splits[idx],
            groups=self.groups[idx], names=[self.names[i] for i in idx], modalities=[self.modalities[i] for i in idx],
            hashes=[self.hashes[i] for i in idx], shapes=[self.shapes[i] for i in idx])

    def missing_classes(self, chosen: np.ndarray) -> list[str]:
        counts = np.bincount(self.labels[chosen], minlength=self.num_classes)
        return [self.label_names[i] for i in np.flatnonzero(counts == 0)]

    def content_hashes(self) -> list[str]:
        """The same SHA-256 per image as ``ImageSet.content_hashes``, from the metadata."""
        return list(self.hashes)

    def image_hashes(self) -> list[str]:
        return self.content_hashes()

    def validate(self) -> ImageStore:
        """``ImageSet.validate``'s checks, on the labels alone (the images are not needed for them)."""
        ImageSet(range(len(self)), self.labels, self.label_names, self.splits, self.groups, self.names,
                 self.modalities, self.source, partial_labels=self.partial_labels).validate()
        return self

    def in_memory_gb(self, image_size: int | None) -> float:
        """What the in-memory path would hold: every decoded image (float32) and its copy at the input size."""
        native = sum(4 * int(np.prod(s)) for s in self.shapes)
        side = image_size or 224
        resized = sum(4 * s[0] * side ** (len(s) - 1) for s in self.shapes)
        return (native + resized) / 2 ** 30

    def to_memory(self) -> ImageSet:
        """The images decoded into an ``ImageSet`` (the in-memory path, for sets that fit)."""
        return from_files(self.source, self.records, self.label_names, window=self.window, slices=self.slices,
                          skip_bad=True, steps=self.steps).validate()

    # -- pixels ---------------------------------------------------------------------------------------------------
    def _build(self, size: int | tuple[int, ...] | None, only: list[int] | None = None):
        """Decode the records (those at ``only``) into the cache, pixels at ``size`` when given (one side: every
        axis)."""
        cache = self.cache or CaseCache()
        size = _size_key(size)
        picked = range(len(self.records)) if only is None else only
        jobs = [(str(self.records[k][0]), self.records[k][4] if len(self.records[k]) > 4 else None, self.window,
                 self.slices, self.steps, size if size is None or isinstance(size, int) else list(size),
                 str(cache.root), self.source)
                for k in picked]
        start = time.perf_counter()
        results = _run(jobs, self.workers, f"caching {Path(self.source).name}", self.quiet)
        self.decoded = sum(1 for r in results if r[3])
        if size is not None:
            self.pixel_keys.setdefault(size, {}).update(
                {k: r[2] for k, r in zip(picked, results, strict=True) if r[0] is not None})
        log.info("%d file(s) of %s in the cache %s, %d decoded now (%.1f s)", len(jobs), self.source, cache.root,
                 self.decoded, time.perf_counter() - start)
        return results

    def pixels(self, size: tuple[int, ...], channels: int) -> CachedImages:
        """The images at ``size`` with ``channels``, read from the cache on indexing; files not yet stored at that
        size are decoded now (in parallel)."""
        cache = self.cache or CaseCache()
        key = _size_key(tuple(size))
        built = self.pixel_keys.get(key, {})
        missing = sorted({k for k, _ in self.frames} - set(built))
        if missing:  # built (or verified) at the listing when the run's size was known then: not read again
            for k, (mkey, reason, _pkey, _) in zip(missing, self._build(tuple(size), missing), strict=True):
                if mkey is None:
                    raise DataError(f"{self.records[k][0]}: {reason} (it was readable when the source was listed)")
        keys = self.pixel_keys.get(key, {})
        return CachedImages([(cache.folder(keys[k]), j) for k, j in self.frames], tuple(size), channels)


class CachedImages:
    """Images (N, C, …) at the network's size, in [0, 1], read from memory-mapped cache entries when indexed: an
    index array, tensor or slice gives a float32 tensor of just those images, as indexing a tensor would. With a
    ``Preprocessing`` given (``normalized``) the images come normalised."""

    def __init__(self, frames: list[tuple[Path, int]], size: tuple[int, ...], channels: int, spec: Any = None):
        self.frames, self.size, self.channels, self.spec = frames, tuple(size), channels, spec

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), self.channels, *self.size)

    @property
    def ndim(self) -> int:
        return 2 + len(self.size)

    def normalized(self, spec: Any) -> CachedImages:
        return CachedImages(self.frames, self.size, self.channels, spec)

    def part(self, idx) -> CachedImages:
        """The images at ``idx`` as a smaller ``CachedImages`` (nothing read)."""
        return CachedImages([self.frames[i] for i in _indices(idx, len(self))], self.size, self.channels, self.spec)

    def __getitem__(self, idx):
        import torch

        from lepton.data.transforms.preprocessing import Preprocessing

        picked = _indices(idx, len(self))
        out = np.empty((len(picked), *self.shape[1:]), np.float32)
        opened: dict[Path, np.ndarray] = {}
        by_channels: dict[int, list[int]] = {}
        raw: list[np.ndarray] = []
        for n, i in enumerate(picked):
            folder, j = self.frames[i]
            if folder not in opened:
                opened[folder] = np.load(folder / "pixels.npy", mmap_mode="r", allow_pickle=False)
            arr = opened[folder][j]
            img = arr.astype(np.float32) / 255 if arr.dtype == np.uint8 else arr.astype(np.float32)
            raw.append(img)
            by_channels.setdefault(img.shape[0], []).append(n)
        opened.clear()
        for c, rows in by_channels.items():
            batch = torch.from_numpy(np.stack([raw[n] for n in rows]))
            if c != self.channels:
                batch = Preprocessing(self.size, self.channels, [0.5] * self.channels,
                                      [0.5] * self.channels).convert_channels(batch)
            out[rows] = batch.numpy()
        x = torch.from_numpy(out)
        if isinstance(idx, int):
            x = x[0]
        return self.spec.normalize(x) if self.spec is not None else x

    def chunks(self, size: int | None = None):
        """The images in order, ``size`` at a time (default ``chunk_size``)."""
        size = size or chunk_size(int(np.prod(self.shape[1:])))
        for start in range(0, len(self), size):
            yield self[start:start + size]

    def image_means(self) -> np.ndarray:
        """Each image's mean over channels and pixels (read in chunks)."""
        return np.concatenate([c.mean(dim=tuple(range(1, c.ndim))).numpy() for c in self.chunks()] or [np.zeros(0)])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and (unbiased) standard deviation over every pixel (``channel_stats``)."""
        return channel_stats(self.chunks())


def chunk_size(values_per_image: int) -> int:
    """Images per chunk when a set is read through in order: 256, fewer for large images (about 16 M values)."""
    return max(1, min(256, (1 << 24) // max(1, values_per_image)))


def channel_stats(batches) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) standard deviation over every pixel of batches (N, C, …) in float64, batch
    by batch: the in-memory path (its tensor in chunks of ``chunk_size``) and the cache path
    (``CachedImages.chunks``) give the same numbers to the last bit, so the two train alike."""
    total = squares = None
    count = 0.0
    for batch in batches:
        axes = (0, *range(2, batch.ndim))
        x = batch.double()
        total = x.sum(dim=axes).numpy() + (0 if total is None else total)
        squares = (x * x).sum(dim=axes).numpy() + (0 if squares is None else squares)
        count += x.numel() / x.shape[1]
    if total is None:
        raise ValueError("no images to compute statistics on")
    mean = total / count
    var = np.maximum(squares - count * mean ** 2, 0.0) / max(count - 1, 1)
    return mean.tolist(), np.sqrt(var).tolist()


def _size_key(size: int | tuple[int, ...] | None) -> int | tuple[int, ...] | None:
    """One key for a square (cube) size whichever way it was asked for: its side."""
    if size is not None and not isinstance(size, int) and len(set(size)) == 1:
        return int(size[0])
    return size


def _indices(idx, n: int) -> list[int]:
    if isinstance(idx, slice):
        return list(range(n))[idx]
    if isinstance(idx, int):
        return [idx]
    arr = idx.numpy() if hasattr(idx, "numpy") else np.asarray(idx)
    if arr.dtype == bool:
        arr = np.flatnonzero(arr)
    return [int(i) for i in arr.reshape(-1)]


def estimate_memory_gb(source: str | Path, *, window: str | None, slices: str, steps: list[dict] | None,
                       image_size: int | None) -> tuple[float, int] | None:
    """What the in-memory path would hold for a source, from ``ESTIMATE_SAMPLE`` files spread over it decoded here
    (every decoded image as float32 and its copy at the input size), and how many files it listed; None for a
    source held in memory as it is."""
    from lepton.data.readers.io import read_image

    listed = image_records(source)
    if listed is None:
        return None
    _, records, _ = listed
    if not records:
        return 0.0, 0
    picks = np.unique(np.linspace(0, len(records) - 1, min(ESTIMATE_SAMPLE, len(records))).astype(int))
    sizes = []
    for k in picks:
        record = records[k]
        try:
            frames = read_image(record[0], window=window, slices=slices, steps=steps,
                                series=record[4] if len(record) > 4 else None)
        except DataError:
            continue
        side = image_size or 224
        sizes.append(sum(4 * f.pixels.size + 4 * f.pixels.shape[0] * side ** (f.pixels.ndim - 1) for f in frames))
    per_file = float(np.mean(sizes)) if sizes else 0.0
    return per_file * len(records) / 2 ** 30, len(records)
