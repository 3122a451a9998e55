import numpy as np
import pytest
from PIL import Image

from lepton.data import load_dataset
from lepton.errors import DataError


def test_class_folders(png_folder):
    data = load_dataset(png_folder)
    assert data.label_names == ["normal", "pneumonia"]
    assert len(data) == 24 and set(data.splits.tolist()) == {""}
    assert np.bincount(data.labels).tolist() == [12, 12]


def test_split_layout(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), i * 10, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset(tmp_path)
    assert data.label_names == ["a", "b"]
    assert (data.splits == "val").sum() == 4 and (data.splits == "train").sum() == 8


def test_bad_files_are_all_listed_or_skipped(png_folder):
    (png_folder / "normal" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    (png_folder / "pneumonia" / "empty.jpg").write_bytes(b"")
    (png_folder / "pneumonia" / ".DS_Store").write_bytes(b"hidden files are ignored")
    with pytest.raises(DataError) as info:
        load_dataset(png_folder)
    text = str(info.value)
    assert "2 file(s)" in text and "corrupt.png" in text and "empty.jpg" in text and "--skip-bad" in text
    data = load_dataset(png_folder, skip_bad=True)
    assert len(data) == 24 and len(data.bad_files) == 2


def test_empty_class_and_single_class(tmp_path, png_folder):
    (png_folder / "covid").mkdir()
    with pytest.raises(DataError, match="covid"):
        load_dataset(png_folder)
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "one" / "only" / "x.png")
    with pytest.raises(DataError, match="only one class"):
        load_dataset(tmp_path / "one")


def test_flat_folder_is_explained(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(DataError, match="one sub-folder per class"):
        load_dataset(tmp_path)


def test_missing_source():
    with pytest.raises(DataError, match="no such file"):
        load_dataset("/nonexistent/data")
