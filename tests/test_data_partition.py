"""`lepton data partition`: a data set shared between sites (iid, label skew, by patient), written as manifests
that load like any source, reproducible from a seed, refused when the source changed."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import lepton_cmd
from lepton.data import load_dataset
from lepton.data.index.partition import partition_indices, write_partition
from lepton.errors import DataError


@pytest.fixture(scope="module")
def data(synthetic_npz):
    return load_dataset(synthetic_npz)


def _check_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n  # disjoint, every sample once


def test_iid_gives_equal_shares_of_every_split_and_repeats_from_its_seed(data):
    parts = partition_indices(data, 4, "iid", seed=7)
    _check_cover(parts, len(data))
    for split in ("train", "val", "test"):
        sizes = [int((data.splits[p] == split).sum()) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    again = partition_indices(data, 4, "iid", seed=7)
    other = partition_indices(data, 4, "iid", seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def _class_share(data, parts, split="train"):
    """Per site, the share of its images in its most common class."""
    out = []
    for p in parts:
        labels = data.labels[p][data.splits[p] == split]
        out.append(np.bincount(labels, minlength=data.num_classes).max() / max(1, len(labels)))
    return np.array(out)


def test_label_skew_follows_alpha_and_a_site_keeps_its_skew_in_val(data):
    skewed = partition_indices(data, 3, "label-skew", alpha=0.1, seed=1)
    even = partition_indices(data, 3, "label-skew", alpha=1000.0, seed=1)
    _check_cover(skewed, len(data))
    _check_cover(even, len(data))
    assert _class_share(data, skewed).mean() > 0.8 > _class_share(data, even).max()
    train, val = _class_share(data, skewed, "train"), _class_share(data, skewed, "val")
    assert np.abs(train - val).max() < 0.25  # the same Dirichlet shares for every split


def test_by_patient_keeps_each_patient_on_one_site(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rows = ["path,label,patient_id"]
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / f"img{i}.png")
        rows.append(f"img{i}.png,{'sick' if (i // 4) % 2 else 'well'},MRN{i // 4}")
    manifest = root / "labels.csv"
    manifest.write_text("\n".join(rows) + "\n")
    data = load_dataset(manifest)
    parts = partition_indices(data, 3, "by-patient", seed=0)
    _check_cover(parts, len(data))
    owners: dict[str, set[int]] = {}
    for k, p in enumerate(parts):
        for g in data.groups[p]:
            owners.setdefault(g, set()).add(k)
    assert all(len(sites) == 1 for sites in owners.values())
    assert max(map(len, parts)) - min(map(len, parts)) <= 4  # balanced to within one patient's images


def test_bad_requests_are_refused_with_the_fix(data):
    with pytest.raises(DataError, match="patient ids"):
        partition_indices(data, 2, "by-patient")  # an .npz has no patient ids
    with pytest.raises(DataError, match="not one of"):
        partition_indices(data, 2, "random")
    with pytest.raises(DataError, match="between 2 and"):
        partition_indices(data, 1)
    with pytest.raises(DataError, match="fewer than 2 training images"):
        partition_indices(data, 200)
    for alpha in (0, -1.0, float("nan"), float("inf"), 1e7):
        with pytest.raises(DataError, match="--alpha must be a number above 0"):
            partition_indices(data, 2, "label-skew", alpha=alpha)
    for seed in (-1, 2**32, 1.5, True):
        with pytest.raises(DataError, match="--seed must be a whole number"):
            partition_indices(data, 2, seed=seed)


@pytest.mark.parametrize("indices", ["[0, 1.5]", "[0, true]", '[0, "1"]', "[0, Infinity]", "[0, NaN]", "[1e300]",
                                     '"zero"', "[[0]]"])
def test_a_site_manifest_with_indices_that_are_not_whole_numbers_is_refused(data, synthetic_npz, tmp_path, indices):
    paths = write_partition(data, str(synthetic_npz), tmp_path / "sites", 2, "iid", seed=2)
    spec = json.loads(paths[0].read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**spec, "indices": "@"}).replace('"@"', indices))
    with pytest.raises(DataError, match="whole numbers"):
        load_dataset(bad)
    floats = json.dumps([float(i) for i in spec["indices"]])  # 3.0 is a whole number, as JSON Schema has it
    bad.write_text(json.dumps({**spec, "indices": "@"}).replace('"@"', floats))
    assert len(load_dataset(bad)) == len(spec["indices"])


def test_a_site_manifest_loads_as_a_source_and_a_changed_source_is_refused(synthetic_npz, data, tmp_path):
    source = tmp_path / "source.npz"
    source.write_bytes(synthetic_npz.read_bytes())
    paths = write_partition(data, str(source), tmp_path / "sites", 3, "iid", seed=2)
    spec = json.loads(paths[1].read_text())
    site = load_dataset(paths[1])
    assert len(site) == spec["images"] == len(spec["indices"])
    assert site.label_names == data.label_names and "site 1 of 3" in site.source
    assert np.array_equal(site.labels, data.labels[spec["indices"]])
    with np.load(source) as z:  # one label changed at the source
        arrays = {k: z[k] for k in z.files}
    arrays["train_labels"] = arrays["train_labels"].copy()
    arrays["train_labels"][0] = 1 - arrays["train_labels"][0]
    np.savez(source, **arrays)
    with pytest.raises(DataError, match="changed since the partition was written"):
        load_dataset(paths[1])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**spec, "indices": "zero"}))
    with pytest.raises(DataError):
        load_dataset(bad)


def test_cli_partitions_and_a_site_trains(synthetic_npz, tmp_path):
    done = subprocess.run(lepton_cmd("data", "partition", str(synthetic_npz), "--sites", "2", "--scheme",
                                     "label-skew", "--alpha", "5", "--seed", "3", "--out", str(tmp_path / "sites")),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "site-0.json" in done.stdout and "site-1.json" in done.stdout
    spec = json.loads((tmp_path / "sites" / "site-0.json").read_text())
    assert spec["scheme"] == "label-skew" and spec["alpha"] == 5 and spec["seed"] == 3
    trained = subprocess.run(lepton_cmd("train", str(tmp_path / "sites" / "site-0.json"), "--preset", "default",
                                        "--epochs", "1", "--batch-size", "16", "--output-dir", str(tmp_path / "runs"),
                                        "--name", "site0", "--quiet"),
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    info = json.loads((tmp_path / "runs" / "site0" / "run.json").read_text())
    assert info["train_images"] == sum(spec["counts"]["train"].values())


def test_a_site_without_some_class_still_loads_with_the_whole_label_set(synthetic_npz, data, tmp_path):
    paths = write_partition(data, str(synthetic_npz), tmp_path / "skew", 3, "label-skew", alpha=0.05, seed=0)
    lacking = [p for p in paths if 0 in json.loads(p.read_text())["counts"]["train"].values()]
    assert lacking, "alpha 0.05 should leave some site without a class"
    site = load_dataset(lacking[0])
    assert site.label_names == data.label_names and site.partial_labels
    assert len(np.unique(site.labels[site.splits == "train"])) < data.num_classes
    from lepton.data.index.splits import assign_splits

    assign_splits(site, val_fraction=0.15, test_fraction=0.0, seed=0)  # no "class missing from train" error
    with pytest.raises(DataError, match="have no images"):  # a whole source without a class is still refused
        data.subset(data.labels == 0).validate()
