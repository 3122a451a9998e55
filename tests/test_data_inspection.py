import numpy as np
from PIL import Image

from lepton.data.index.inspection import inspect_source


def test_inspect_reports_counts_duplicates_and_unreadable(tmp_path):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (10, 12)).astype(np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    leaked = rng.integers(0, 255, (10, 12)).astype(np.uint8)
    Image.fromarray(leaked).save(tmp_path / "train" / "a" / "leak.png")
    Image.fromarray(leaked).save(tmp_path / "test" / "a" / "leak_copy.png")
    (tmp_path / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    r = inspect_source(str(tmp_path))
    assert r["images"] == 14 and r["classes"] == ["a", "b"]
    assert r["counts"]["train"] == {"a": 4, "b": 3} and r["counts"]["test"] == {"a": 4, "b": 3}
    assert r["sizes"] == {"10x12": 14} and r["modalities"] == {"png": 14}
    assert r["duplicates"]["across_splits"] == 1
    assert any("leak.png" in n for n in r["duplicates"]["examples"][0])
    assert [u["path"].endswith("broken.png") for u in r["unreadable"]] == [True]
    assert any("leakage" in p for p in r["problems"])
    assert 0 <= r["intensity"]["mean"] <= 1


def test_inspect_clean_npz(synthetic_npz):
    r = inspect_source(str(synthetic_npz))
    assert r["problems"] == [] and r["images"] == 240
    assert set(r["counts"]) == {"train", "val", "test"}
