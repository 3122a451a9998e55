"""``lepton data inspect``: what is in a source, and what is wrong with it."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import DataError


def inspect_source(source: str, *, window: str | None = None, slices: str = "middle",
                   series: bool | None = None) -> dict[str, Any]:
    """Summarise a data source: counts per split and class, sizes, modalities, intensities,
    exact duplicates (within and across splits, by content hash) and unreadable files.

    A folder of DICOM series (``series=True``, or a folder of files without sub-folders) is reported per
    series instead: slice count, size, spacing, orientation, tilt and what is wrong with each.
    Problems are reported in the result rather than raised, except when nothing can be read.
    """
    from lepton.data.index.sources import load_dataset

    path = Path(source)
    if series or (series is None and path.is_dir() and not any(p.is_dir() for p in path.iterdir())):
        from lepton.data.readers.series import inspect_series

        found = inspect_series(path)
        return {"source": source, "series": found,
                "problems": [p for row in found for p in row["problems"] if not row["ok"]]}

    data = load_dataset(source, window=window, slices=slices, skip_bad=True, validate=False)
    problems: list[str] = []
    try:
        data.validate()
    except DataError as exc:
        problems.append(str(exc))
    splits = [s or "unsplit" for s in data.splits.tolist()]
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for split in sorted(set(splits)):
        mask = np.array([s == split for s in splits])
        per = np.bincount(data.labels[mask], minlength=data.num_classes)
        counts[split] = {name: int(c) for name, c in zip(data.label_names, per, strict=False)}
    sizes = Counter("x".join(str(d) for d in np.shape(img)[1:]) for img in data.images)
    channels = Counter(int(np.shape(img)[0]) for img in data.images)
    flat = (np.concatenate([np.ravel(img) for img in data.images])
            if isinstance(data.images, list) else np.ravel(data.images))
    stats = {}
    if flat.size:
        stats = {"mean": float(flat.mean()), "std": float(flat.std()), "min": float(flat.min()),
                 "max": float(flat.max()), "p1": float(np.percentile(flat, 1)),
                 "p99": float(np.percentile(flat, 99))}
    dup_groups, cross = _duplicates(data.content_hashes(), splits)
    if cross:
        problems.append(
            f"{len(cross)} image(s) appear in more than one split (leakage): "
            + "; ".join(" = ".join(f"{data.names[i]} [{splits[i]}]" for i in idx[:3]) for idx in cross[:5])
        )
    conflicting = [idx for idx in dup_groups if len({int(data.labels[i]) for i in idx}) > 1]
    if conflicting:
        problems.append(f"{len(conflicting)} duplicate image group(s) carry different labels")
    if data.bad_files:
        problems.append(f"{len(data.bad_files)} unreadable file(s)")
    return {
        "source": source,
        "images": len(data),
        "classes": data.label_names,
        "counts": dict(counts),
        "sizes": dict(sizes.most_common(10)),
        "channels": {str(k): v for k, v in channels.items()},
        "modalities": dict(Counter(data.modalities)),
        "patient_grouped": data.has_patient_ids,
        "intensity": stats,
        "duplicates": {
            "groups": len(dup_groups),
            "images": sum(len(g) for g in dup_groups),
            "across_splits": len(cross),
            "examples": [[data.names[i] for i in idx[:4]] for idx in cross[:5]],
        },
        "unreadable": [{"path": p, "reason": r} for p, r in data.bad_files],
        "problems": problems,
    }


def inspect_segmentation(source: str, *, window: str | None = None) -> dict[str, Any]:
    """Summarise an image + mask source: cases per split, the label names, how many cases show each class and its
    share of the voxels, sizes, spacing, modalities, exact duplicates and unreadable pairs."""
    from lepton.data.readers.masks import load_segmentation

    data = load_segmentation(source, window=window, skip_bad=True, validate=False)
    problems: list[str] = []
    try:
        data.validate()
    except DataError as exc:
        problems.append(str(exc))
    splits = [s or "unsplit" for s in data.splits.tolist()]
    voxels = np.zeros(data.num_classes, np.int64)
    present = np.zeros(data.num_classes, np.int64)
    for mask in data.masks:
        counts = np.bincount(mask.ravel(), minlength=data.num_classes)[: data.num_classes]
        voxels += counts
        present += counts > 0
    total = max(int(voxels.sum()), 1)
    classes = {name: {"cases": int(present[k]), "voxel_share": float(voxels[k] / total)}
               for k, name in enumerate(data.label_names)}
    spacings = [np.linalg.norm(a[:3, :3], axis=0) for a in data.affines if a is not None]
    spacing = {}
    if spacings:
        arr = np.stack(spacings)
        spacing = {"median": np.round(np.median(arr, axis=0), 3).tolist(),
                   "min": np.round(arr.min(axis=0), 3).tolist(), "max": np.round(arr.max(axis=0), 3).tolist()}
    dup_groups, cross = _duplicates(data.content_hashes(), splits)
    if cross:
        problems.append(f"{len(cross)} case(s) appear in more than one split (leakage)")
    if data.bad_files:
        problems.append(f"{len(data.bad_files)} unreadable case(s)")
    return {
        "source": source,
        "cases": len(data),
        "labels": data.label_names,
        "counts": {split: n for split, n in sorted(Counter(splits).items())},
        "classes": classes,
        "sizes": dict(Counter("x".join(str(d) for d in np.shape(im)[1:]) for im in data.images).most_common(10)),
        "spacing_mm": spacing,
        "modalities": dict(Counter(data.modalities)),
        "patient_grouped": data.has_patient_ids,
        "duplicates": {"groups": len(dup_groups), "cases": sum(len(g) for g in dup_groups),
                       "across_splits": len(cross),
                       "examples": [[data.names[i] for i in idx[:4]] for idx in cross[:5]]},
        "unreadable": [{"path": p, "reason": r} for p, r in data.bad_files],
        "problems": problems,
    }


def _duplicates(hashes: list[str], splits: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Groups of items with the same content hash, and those of them that span more than one split (leakage)."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        by_hash[h].append(i)
    groups = [idx for idx in by_hash.values() if len(idx) > 1]
    return groups, [idx for idx in groups if len({splits[i] for i in idx}) > 1]
