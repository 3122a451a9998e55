"""The case cache: hits, misses and invalidation; a killed build resumes; a corrupt entry is rebuilt, never used; two
processes build one cache; training from the cache matches the in-memory path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import lepton_cmd
from lepton.data.index.cache import CaseCache
from lepton.data.index.cases import cache_segmentation
from lepton.data.readers.masks import load_segmentation
from lepton.data.tools.synthetic import write_segmentation_cases


@pytest.fixture
def cases(tmp_path) -> Path:
    return write_segmentation_cases(tmp_path / "nodules", n=6, dims=3)


def test_hit_miss_and_invalidation(cases, tmp_path):
    cache = CaseCache(tmp_path / "cache")
    first = cache_segmentation(cases, cache=cache, workers=1)
    assert first.decoded == 6 and len(cache.entries()) == 6
    again = cache_segmentation(cases, cache=cache, workers=1)
    assert again.decoded == 0 and again.content_hashes() == first.content_hashes()
    memory = load_segmentation(cases)
    assert first.content_hashes() == memory.content_hashes()  # the same decoded arrays as the in-memory reader
    assert first.image_hashes() == memory.image_hashes()
    held = first.to_memory()  # the auto engine's in-memory copy keys on the decoding, not on the stored steps
    assert held.content_hashes() == memory.content_hashes() and held.image_hashes() == memory.image_hashes()
    assert held.subset(np.arange(6) % 2 == 1).image_hashes() == memory.image_hashes()[1::2]
    # stored as uint16 steps of 1/65535 (half of float32 on disk), read back within half a step
    assert first.entries[2].array("image").dtype == np.uint16
    np.testing.assert_allclose(first.image(2), memory.images[2], rtol=0, atol=0.5 / 65535 + 1e-7)
    assert first.image(2).dtype == np.float32 and np.abs(first.image(2) - memory.images[2]).max() > 0
    np.testing.assert_array_equal(first.mask(2), memory.masks[2])
    # a changed mask file: that case alone is decoded again
    mask_path = cases / "labelsTr" / "case003.nii.gz"
    img = nib.load(str(mask_path))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(data, img.affine), mask_path)
    changed = cache_segmentation(cases, cache=cache, workers=1)
    assert changed.decoded == 1 and changed.content_hashes()[3] != first.content_hashes()[3]
    # a different preprocessing option: every case is decoded for it, the old entries stay for the old option
    windowed = cache_segmentation(cases, cache=cache, workers=1, window="-1000,1400")
    assert windowed.decoded == 6 and len(cache.entries()) == 13


def test_a_corrupt_entry_is_detected_and_rebuilt(cases, tmp_path, caplog):
    cache = CaseCache(tmp_path / "cache")
    store = cache_segmentation(cases, cache=cache, workers=1)
    target = store.entries[1].path / "image.npy"
    raw = bytearray(target.read_bytes())
    raw[-7] ^= 0xFF  # one flipped byte in the pixels: same size, same header
    target.write_bytes(bytes(raw))
    assert not store.entries[1].verify()
    rebuilt = cache_segmentation(cases, cache=cache, workers=1)
    assert rebuilt.decoded == 1 and "corrupt" in caplog.text
    assert rebuilt.entries[1].verify()
    np.testing.assert_allclose(rebuilt.image(1), load_segmentation(cases).images[1], rtol=0, atol=0.5 / 65535 + 1e-7)
    (rebuilt.entries[4].path / "meta.json").write_text("{not json")
    assert cache_segmentation(cases, cache=cache, workers=1).decoded == 1


def test_a_killed_build_resumes(tmp_path):
    cases = write_segmentation_cases(tmp_path / "many", n=40, dims=3, shape=(24, 48, 48))
    env = {**os.environ, "LEPTON_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(lepton_cmd("data", "cache", "build", str(cases), "--workers", "1"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = CaseCache(tmp_path / "cache" / "cases")
    deadline = time.monotonic() + 120
    while len(cache.entries()) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = len(cache.entries())
    assert 3 <= done < 40, f"the build was not interrupted mid-way ({done} entries)"
    resumed = cache_segmentation(cases, cache=cache, workers=1)
    assert resumed.decoded == 40 - done and len(cache.entries()) == 40
    assert all(e.verify() for e in cache.entries())
    assert cache.prune()["removed"] == 0 and not list(cache.root.glob("??/.*.tmp"))


def test_two_processes_build_one_cache(cases, tmp_path):
    env = {**os.environ, "LEPTON_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen(lepton_cmd("data", "cache", "build", str(cases), "--workers", "1"), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    cache = CaseCache(tmp_path / "cache" / "cases")
    assert len(cache.entries()) == 6 and all(e.verify() for e in cache.entries())
    assert not list(cache.root.glob("??/.*.tmp"))
    assert cache_segmentation(cases, cache=cache, workers=1).decoded == 0


def test_patches_read_only_their_region(cases, tmp_path):
    store = cache_segmentation(cases, cache=CaseCache(tmp_path / "cache"), workers=1)
    x, y = store.patches((8, 16, 16), torch.Generator().manual_seed(0), fg_share=1.0)
    assert x.shape == (6, 1, 8, 16, 16) and y.dtype == torch.int64
    with_fg = [i for i in range(len(store)) if sum(store.entries[i].meta["class_counts"][1:]) > 0]
    assert all(y[i].any() for i in with_fg)  # foreground-centred patches hold foreground
    big, _ = store[np.array([0])].patches((32, 48, 48), torch.Generator().manual_seed(1))
    image = store.image(0)
    assert big.shape == (1, 1, 32, 48, 48) and float(big.sum()) == pytest.approx(float(image.sum()), rel=1e-5)


def test_cache_cli_show_and_prune(cases, tmp_path):
    env = {**os.environ, "LEPTON_CACHE": str(tmp_path / "cache")}
    run = lambda *a: subprocess.run(lepton_cmd(*a), env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    assert run("data", "cache", "build", str(cases)).returncode == 0
    shown = json.loads(run("data", "cache", "show", "--json").stdout)
    assert shown["entries"] == 6 and shown["bytes"] > 0 and shown["sources"] == [str(cases)]
    entry = CaseCache(tmp_path / "cache" / "cases").entries()[0]
    (entry.path / "mask.npy").write_bytes(b"\x93NUMPY broken")
    out = run("data", "cache", "prune", "--verify")
    assert out.returncode == 0 and "removed 1 entry" in out.stdout
    out = run("data", "cache", "prune", "--source", str(cases))
    assert "removed 5 entries" in out.stdout and json.loads(run("data", "cache", "show", "--json").stdout)[
        "entries"] == 0


@pytest.mark.slow
def test_training_from_the_cache_matches_the_in_memory_path(cases, tmp_path):
    env = {**os.environ, "LEPTON_CACHE": str(tmp_path / "cache")}
    runs = {}
    for engine in ("memory", "cache"):
        out = subprocess.run(lepton_cmd("train", str(cases), "--epochs", "3", "--time-budget", "0", "--batch-size",
                                        "2", "--data-engine", engine, "--output-dir", str(tmp_path / "runs"),
                                        "--name", engine, "--quiet"),
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        assert f"data engine: {engine}" in out.stderr
        root = tmp_path / "runs" / engine
        runs[engine] = {"data": json.loads((root / "data.json").read_text()),
                        "spec": json.loads((root / "preprocessing.json").read_text()),
                        "run": json.loads((root / "run.json").read_text())}
    mem, cached = runs["memory"], runs["cache"]
    assert mem["data"]["sha256"] == cached["data"]["sha256"]  # same cases, same split
    assert mem["data"]["counts"] == cached["data"]["counts"]
    np.testing.assert_allclose(mem["spec"]["mean"], cached["spec"]["mean"], rtol=1e-5)
    np.testing.assert_allclose(mem["spec"]["std"], cached["spec"]["std"], rtol=1e-4)
    assert mem["spec"]["size"] == cached["spec"]["size"]
    assert cached["run"]["val_images"] == mem["run"]["val_images"] and 0 <= cached["run"]["val_dice"] <= 1


def test_images_in_the_unit_range_are_stored_as_uint16_and_others_as_float32():
    from lepton.data.index.cases import compact

    unit = np.linspace(0, 1, 1001, dtype=np.float32).reshape(1, 7, 11, 13)
    stored, scale = compact(unit)
    assert stored.dtype == np.uint16 and stored.max() == 65535 and stored.min() == 0
    assert np.abs(stored * np.float32(scale) - unit).max() <= 0.5 / 65535 + 1e-7
    hu = np.array([[-1000.0, 40.0, 3000.0]], np.float32)
    assert compact(hu)[0] is hu and compact(hu)[1] == 1.0
    assert compact(np.array([[0.5, 1.0001]], np.float32))[0].dtype == np.float32


def test_unchanged_entries_are_not_read_again_and_changed_ones_are(cases, tmp_path, monkeypatch):
    from lepton.data.index import cache as cache_module

    cache = CaseCache(tmp_path / "cache")
    entry = cache_segmentation(cases, cache=cache, workers=1).entries[0]
    old = time.time_ns() - 10 * 10**9  # past the 2 s in which a rewrite could keep size and time
    for path in entry.path.glob("*.npy"):
        os.utime(path, ns=(old, old))
    read = []
    crc = cache_module._crc32
    monkeypatch.setattr(cache_module, "_crc32", lambda path: read.append(path) or crc(path))
    files = len(entry.meta["crc32"])
    assert cache.get(entry.key) is not None and len(read) == files  # checked in full, then stamped
    assert cache.get(entry.key) is not None and len(read) == files  # unchanged since: not read again
    assert entry.verify() and len(read) == 2 * files  # prune --verify reads every byte regardless
    target = entry.path / "image.npy"
    raw = bytearray(target.read_bytes())
    raw[-7] ^= 0xFF  # same size, new modification time
    target.write_bytes(bytes(raw))
    assert cache.get(entry.key) is None and not entry.path.exists()  # read again, caught, removed
