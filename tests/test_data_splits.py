import numpy as np
import pytest

from lepton.data.index.dataset import ImageSet
from lepton.data.index.splits import assign_splits
from lepton.errors import DataError


def _set(labels, splits=None):
    n = len(labels)
    return ImageSet(images=np.zeros((n, 1, 2, 2), np.float32), labels=np.asarray(labels),
                    label_names=["a", "b"], splits=np.asarray(splits or [""] * n, dtype=object),
                    groups=np.asarray([f"g{i}" for i in range(n)], dtype=object), names=[""] * n,
                    modalities=["npz"] * n, source="mem")


def test_stratified_seeded_split():
    labels = np.array([0] * 300 + [1] * 100)
    data = _set(labels)
    a = assign_splits(data, val_fraction=0.15, test_fraction=0.15, seed=7)
    b = assign_splits(data, val_fraction=0.15, test_fraction=0.15, seed=7)
    c = assign_splits(data, val_fraction=0.15, test_fraction=0.15, seed=8)
    assert (a == b).all() and not (a == c).all()
    for split in ("train", "val", "test"):
        frac_pos = labels[a == split].mean()
        assert abs(frac_pos - 0.25) < 0.03, split
    assert abs((a == "test").mean() - 0.15) < 0.02 and abs((a == "val").mean() - 0.15) < 0.02


def test_existing_split_is_kept_and_val_carved_from_train():
    labels = np.array([0, 1] * 50)
    splits = ["train"] * 80 + ["test"] * 20
    out = assign_splits(_set(labels, splits), val_fraction=0.25, seed=0)
    assert (out[80:] == "test").all()
    assert (out[:80] == "val").sum() == 20


def test_train_must_hold_every_class():
    with pytest.raises(DataError, match="no images of class"):
        assign_splits(_set([0, 0, 1, 1], ["train", "train", "val", "val"]))


def test_evaluation_only_source_untouched():
    out = assign_splits(_set([0, 1, 0, 1], ["test"] * 4))
    assert out.tolist() == ["test"] * 4
