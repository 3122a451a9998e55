"""Classification out of core: image folders decoded once into the case cache and read per batch — the same split,
fingerprint and statistics as the in-memory path, hits and invalidation, uint8/float16 storage, the auto engine's
choice, and training from the cache scoring as training from memory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lepton.config import TrainConfig
from lepton.data import load_dataset
from lepton.data.index.cache import CaseCache
from lepton.data.index.imagecache import ImageStore, cache_images
from lepton.data.index.splits import assign_splits
from lepton.data.tools.synthetic import write_png_classes
from lepton.data.transforms.preprocessing import Preprocessing
from lepton.tasks import get_task
from lepton.train.data import choose_engine, data_fingerprint


@pytest.fixture
def pngs(tmp_path) -> Path:
    return write_png_classes(tmp_path / "pngs", n=40, size=24, seed=2)


def test_the_store_splits_and_fingerprints_as_the_image_set(pngs, tmp_path):
    memory = load_dataset(pngs)
    store = cache_images(pngs, cache=CaseCache(tmp_path / "cache"), workers=1)
    assert isinstance(store, ImageStore) and store.decoded == 40 and len(store) == 40
    assert store.content_hashes() == memory.content_hashes() and store.names == memory.names
    assert (store.labels == memory.labels).all() and (store.groups == memory.groups).all()
    a, b = (assign_splits(d, val_fraction=0.2, test_fraction=0.2, seed=5) for d in (memory, store))
    assert (a == b).all()
    assert data_fingerprint(memory, a) == data_fingerprint(store, b)
    # pixels at the network's size, read per index, as the in-memory path resizes them (8-bit PNGs: uint8 entries)
    spec = Preprocessing((16, 16), 3, [0.5] * 3, [0.5] * 3)
    cached = store.subset(a == "train").pixels(spec.size, spec.channels)
    expected = spec.resize(memory.subset(a == "train").images)
    got = cached[torch.arange(len(cached))]
    assert got.shape == expected.shape == cached.shape
    assert float((got - expected).abs().max()) <= 1 / 510 + 1e-6
    mean, std = cached.channel_stats()
    np.testing.assert_allclose(mean, expected.mean(dim=(0, 2, 3)).numpy(), atol=2e-3)
    np.testing.assert_allclose(std, expected.std(dim=(0, 2, 3)).numpy(), atol=2e-3)
    np.testing.assert_allclose(cached.image_means(), expected.mean(dim=(1, 2, 3)).numpy(), atol=2e-3)
    norm = cached.normalized(spec)
    assert torch.allclose(norm[2:5], spec.normalize(got[2:5]))
    metas = [e.meta for e in CaseCache(tmp_path / "cache").entries() if "dtype" in e.meta]
    assert {m["dtype"] for m in metas} == {"uint8"} and max(m["max_error"] for m in metas) <= 1 / 510 + 1e-6


def test_hits_and_invalidation(pngs, tmp_path):
    cache = CaseCache(tmp_path / "cache")
    store = cache_images(pngs, cache=cache, workers=1, image_size=16)
    assert store.decoded == 40
    again = cache_images(pngs, cache=cache, workers=1, image_size=16)
    assert again.decoded == 0
    again.pixels((16, 16), 1)  # stored in the first pass: nothing decoded
    assert again.decoded == 0
    first = sorted((pngs / "normal").iterdir())[0]
    Image.fromarray(np.full((24, 24), 7, np.uint8)).save(first)  # a changed file is decoded again, alone
    changed = cache_images(pngs, cache=cache, workers=1, image_size=16)
    assert changed.decoded == 1 and changed.content_hashes() != store.content_hashes()
    changed.pixels((20, 20), 1)  # another input size: new pixel entries
    assert changed.decoded == 40
    cache_images(pngs, cache=cache, workers=1, window="lung")  # another decoding option: new entries
    assert len(cache.entries()) == 40 * 2 + 2 + 40 + 40  # (meta + pixels) + the changed file + size 20 + lung


def test_float16_where_the_source_is_not_8_bit(tmp_path):
    rng = np.random.default_rng(0)
    for k, name in enumerate(("a", "b")):
        (tmp_path / "npy" / name).mkdir(parents=True)
        for i in range(4):
            np.save(tmp_path / "npy" / name / f"{i}.npy", rng.random((1, 12, 12)).astype(np.float32) * (0.5 + k / 2))
    store = cache_images(tmp_path / "npy", cache=CaseCache(tmp_path / "cache"), workers=1)
    memory = load_dataset(tmp_path / "npy")
    cached = store.pixels((12, 12), 1)
    exact = torch.from_numpy(np.stack(memory.images).astype(np.float32))
    error = float((cached[torch.arange(8)] - exact).abs().max())
    assert 0 < error <= 2 ** -11
    assert {e.meta.get("dtype") for e in CaseCache(tmp_path / "cache").entries()} == {None, "float16"}


def test_auto_keeps_small_sets_in_memory_and_says_why(pngs, tmp_path):
    task = get_task("classification")
    base = {"data": str(pngs), "cache_dir": str(tmp_path / "cache"), "workers": 1, "image_size": 16}
    data, engine, reason = choose_engine(TrainConfig(**base, memory_limit_gb=1.0), task, quiet=True)
    assert engine == "memory" and "limit 1 GB" in reason and not (tmp_path / "cache").exists()
    assert data.content_hashes() == load_dataset(pngs).content_hashes()
    data, engine, reason = choose_engine(TrainConfig(**base, memory_limit_gb=1e-5), task, quiet=True)
    assert engine == "cache" and isinstance(data, ImageStore) and "would take about" in reason
    data, engine, _ = choose_engine(TrainConfig(**base, data_engine="cache"), task, quiet=True)
    assert engine == "cache"
    npz = tmp_path / "x.npz"
    from lepton.data.tools.synthetic import write_synthetic_npz

    write_synthetic_npz(npz, n=30, size=16)
    data, engine, reason = choose_engine(TrainConfig(**{**base, "data": str(npz)}), task, quiet=True)
    assert engine == "memory" and "reads its data into memory" in reason
    with pytest.raises(Exception, match="data_engine=cache is for sources"):
        choose_engine(TrainConfig(**{**base, "data": str(npz), "data_engine": "cache"}), task, quiet=True)


@pytest.mark.slow
def test_training_from_the_cache_matches_the_in_memory_path(tmp_path, one_thread, caplog, monkeypatch):
    from lepton.evaluate import evaluate
    from lepton.tasks.classification import Classification
    from lepton.train import train

    root = write_png_classes(tmp_path / "pngs", n=64, size=16, seed=4)
    runs = {}
    for engine, loader in (("memory", 0), ("cache", 1)):
        with caplog.at_level(logging.INFO, logger="lepton.train"):
            train(str(root), data_engine=engine, epochs=2, time_budget_s=0, batch_size=16, image_size=16,
                  output_dir=str(tmp_path / "runs"), name=engine, quiet=True, workers=1, loader_workers=loader,
                  cache_dir=str(tmp_path / "cache"), model="lepton_cnn_tiny", tta=False)
        assert f"data engine: {engine}" in caplog.text
        folder = tmp_path / "runs" / engine
        runs[engine] = {f: json.loads((folder / f).read_text()) for f in ("data.json", "run.json",
                                                                          "preprocessing.json")}
    mem, cached = runs["memory"], runs["cache"]
    assert mem["data.json"]["sha256"] == cached["data.json"]["sha256"]  # same images, same split
    assert mem["data.json"]["counts"] == cached["data.json"]["counts"] and cached["data.json"]["engine"] == "cache"
    mem_spec, cached_spec = mem["preprocessing.json"], cached["preprocessing.json"]
    for key in ("mean", "std"):  # summed in float64 from the cache, in float32 over the tensor in memory
        np.testing.assert_allclose(mem_spec.pop(key), cached_spec.pop(key), rtol=1e-5)
    assert mem_spec == cached_spec
    # 8-bit PNGs at their own size are stored exactly, and read in workers with the same batches and random draws:
    # the two runs train alike
    assert mem["run.json"]["val_auc"] == pytest.approx(cached["run.json"]["val_auc"], abs=1e-6)
    # the test split evaluated: from memory, and — never reading the source whole — from the cache, alike
    reports = {"memory": evaluate(tmp_path / "runs" / "memory", n_bootstrap=0, plots=False)}

    def whole(*args, **kwargs):
        raise AssertionError("the cached run's evaluation read the source into memory")

    monkeypatch.setattr(Classification, "load", whole)
    reports["cache"] = evaluate(tmp_path / "runs" / "cache", n_bootstrap=0, plots=False)
    assert reports["memory"]["images"] == reports["cache"]["images"] > 0
    mem_m, cached_m = (r["metrics"][r["primary_threshold"]] for r in (reports["memory"], reports["cache"]))
    assert mem_m["auc"] == pytest.approx(cached_m["auc"], abs=1e-6) and mem_m["acc"] == cached_m["acc"]
