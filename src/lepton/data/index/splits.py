"""Stratified, seeded, patient-grouped train/val/test splits."""

from __future__ import annotations

import numpy as np

from lepton.data.index.dataset import ImageSet
from lepton.errors import DataError


def assign_splits(
    data: ImageSet, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> np.ndarray:
    """Return a split name per image, respecting any split the source already defines.

    A source with train/val(/test) is kept as is; one with only train (and test) gets a val split
    carved from train. Without splits, test and then val are drawn from everything. Draws are
    stratified by label and grouped by patient (or source volume), so no group spans two splits.
    """
    splits = data.splits.copy()
    present = set(splits.tolist()) - {""}
    if "" in set(splits.tolist()) and present:
        raise DataError(f"{data.source}: some images have a split and others do not")
    if not present:
        splits[:] = "train"
        if test_fraction > 0:
            test = _draw(data.labels, data.groups, np.ones(len(splits), bool), test_fraction, seed)
            splits[test] = "test"
        if val_fraction > 0:
            pool = splits == "train"
            frac = val_fraction / (1.0 - test_fraction)
            val = _draw(data.labels, data.groups, pool, frac, seed + 1)
            splits[val] = "val"
    elif "train" not in present:
        # An evaluation-only source (e.g. a test file): nothing to carve.
        return splits
    elif "val" not in present and val_fraction > 0:
        val = _draw(data.labels, data.groups, splits == "train", val_fraction, seed + 1)
        splits[val] = "val"
    check_splits(data, splits)
    return splits


def _draw(labels: np.ndarray, groups: np.ndarray, pool: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of about ``fraction`` of ``pool``, stratified by label and whole groups."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    idx = np.flatnonzero(pool)
    out = np.zeros(len(labels), bool)
    if len(idx) < 2:
        return out
    y, g = labels[idx], groups[idx]
    _, group_codes = np.unique(g.astype(str), return_inverse=True)
    if group_codes.max() + 1 == len(idx):
        counts = np.bincount(y)
        stratify = y if counts[counts > 0].min() >= 2 else None
        n_draw = max(1, round(fraction * len(idx)))
        if stratify is not None:
            n_draw = max(n_draw, int((counts > 0).sum()))
        if n_draw >= len(idx):
            return out
        _, chosen = train_test_split(idx, test_size=n_draw, stratify=stratify, random_state=seed)
        out[chosen] = True
        return out
    n_splits = max(2, min(round(1.0 / fraction), group_codes.max() + 1))
    folder = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, chosen = next(folder.split(idx, y, group_codes))
    out[idx[chosen]] = True
    return out


def check_splits(data: ImageSet, splits: np.ndarray) -> None:
    """Every class must be in train (except in a site's share under label skew), and no patient group may span
    two splits."""
    train = splits == "train"
    missing = data.missing_classes(train)
    if missing and not data.partial_labels:
        raise DataError(f"{data.source}: the train split has no images of class(es) {', '.join(missing)}")
    if data.has_patient_ids:
        seen: dict[str, str] = {}
        for group, split in zip(data.groups.tolist(), splits.tolist(), strict=True):
            if seen.setdefault(group, split) != split:
                raise DataError(
                    f"{data.source}: a patient appears in both {seen[group]} and {split}; "
                    "fix the split column so each patient_id stays in one split"
                )
