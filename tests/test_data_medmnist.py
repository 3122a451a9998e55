import numpy as np
import pytest

from lepton.data import load_dataset
from lepton.errors import DataError


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_pneumoniamnist_layout_and_names(tmp_path):
    rng = np.random.default_rng(0)
    path = _write(tmp_path / "pneumoniamnist.npz",
                  train_images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
                  train_labels=np.array([[0], [1]] * 5, dtype=np.uint8),
                  val_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
                  val_labels=np.array([[0], [1]] * 2, dtype=np.uint8),
                  test_images=rng.integers(0, 255, (6, 28, 28), dtype=np.uint8),
                  test_labels=np.array([[0], [1]] * 3, dtype=np.uint8))
    data = load_dataset(path)
    assert data.label_names == ["normal", "pneumonia"]
    assert len(data) == 20 and data.images.shape == (20, 1, 28, 28)
    assert sorted(set(data.splits.tolist())) == ["test", "train", "val"]
    assert (data.splits == "test").sum() == 6


def test_rgb_any_size(tmp_path):
    rng = np.random.default_rng(0)
    path = _write(tmp_path / "x.npz", train_images=rng.integers(0, 255, (6, 64, 64, 3), dtype=np.uint8),
                  train_labels=np.array([0, 1, 2, 0, 1, 2]))
    data = load_dataset(path)
    assert data.images.shape == (6, 3, 64, 64) and data.label_names == ["0", "1", "2"]


def test_medmnist_cache_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    _write(tmp_path / "breastmnist.npz", train_images=np.zeros((4, 28, 28), np.uint8),
           train_labels=np.array([[0], [1], [0], [1]]))
    data = load_dataset("medmnist:breastmnist")
    assert data.label_names == ["malignant", "normal, benign"]
    with pytest.raises(DataError, match="not found"):
        load_dataset("medmnist:organmnist3d")


@pytest.mark.parametrize(
    "arrays,message",
    [
        (dict(train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros(3, np.int64)), "4 images but"),
        (dict(train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((4, 3), np.int64)),
         "multi-label"),
        (dict(train_images=np.zeros((4, 8, 8), np.uint8)), "no train_labels"),
        (dict(images=np.zeros((4, 8, 8), np.uint8)), "no MedMNIST arrays"),
        (dict(train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros(4, np.int64)), "only one class"),
        (dict(train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.array([0, 1, -1, 1])), "labels must lie"),
        (dict(train_images=np.zeros((4, 8), np.uint8), train_labels=np.array([0, 1, 0, 1])), "shape"),
    ],
)
def test_bad_npz_is_a_clear_error(tmp_path, arrays, message):
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(path)


def test_not_a_zip(tmp_path):
    path = tmp_path / "fake.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(path)
