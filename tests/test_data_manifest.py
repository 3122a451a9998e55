import numpy as np
import pytest
from PIL import Image

from lepton.data import load_dataset
from lepton.data.index.splits import assign_splits
from lepton.errors import DataError


def _images(tmp_path, n):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8)).astype(np.uint8)).save(tmp_path / f"img{i}.png")


def test_manifest_with_patients_keeps_each_patient_in_one_split(tmp_path):
    _images(tmp_path, 60)
    rows = ["path,label,patient_id"] + [f"img{i}.png,{'sick' if (i // 3) % 2 else 'well'},MRN{i // 3}"
                                        for i in range(60)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset(tmp_path / "m.csv")
    assert data.label_names == ["sick", "well"] and data.has_patient_ids
    assert not any("MRN" in g for g in data.groups.tolist())
    splits = assign_splits(data, val_fraction=0.2, test_fraction=0.2, seed=0)
    for g in set(data.groups.tolist()):
        assert len(set(splits[data.groups == g].tolist())) == 1


def test_manifest_split_column_is_respected(tmp_path):
    _images(tmp_path, 8)
    split = ["train", "train", "train", "train", "val", "val", "test", "test"]
    rows = ["path,label,split"] + [f"img{i}.png,{i % 2},{split[i]}" for i in range(8)]
    (tmp_path / "m.csv").write_text("\n".join(rows))
    data = load_dataset(tmp_path / "m.csv")
    assert data.splits.tolist() == split and data.label_names == ["0", "1"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("file,label\nimg0.png,a\n", "missing column"),
        ("path,label\nimg0.png,\n", "empty label"),
        ("path,label,split\nimg0.png,a,training\n", "training"),
        ("path,label,split\nimg0.png,a,train\nimg1.png,b,\n", "every row or on none"),
        ("path,label\n", "lists no images"),
        ("path,label\nmissing.png,a\nimg1.png,b\n", "missing.png"),
    ],
)
def test_bad_manifests(tmp_path, text, message):
    _images(tmp_path, 2)
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path / "m.csv")
