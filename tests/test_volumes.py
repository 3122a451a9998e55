"""Volumes through the classification path: MedMNIST-3D files, 3-D networks, volume preprocessing and
augmentation, training, evaluation and prediction — on volumes this test makes, and on the shared
AdrenalMNIST3D when it is there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lepton.data import load_dataset
from lepton.data.transforms.preprocessing import Preprocessing, augment_batch, augment_options
from lepton.errors import DataError, ModelError
from lepton.models import create_model
from lepton.models.layout import fast_layout, model_layout

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def spheres(n: int, side: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, D, H, W) uint8 noise volumes; label 1 holds a bright ball somewhere inside."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, side, side, side)).astype(np.uint8)
    y = rng.integers(0, 2, n)
    zz, yy, xx = np.mgrid[:side, :side, :side]
    for i in np.flatnonzero(y):
        c = rng.integers(side // 3, 2 * side // 3, 3)
        x[i][((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= 9] = 220
    return x, y[:, None]


@pytest.fixture(scope="module")
def volume_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vol") / "spheres3d.npz"
    (tr, trl), (va, val), (te, tel) = spheres(160, seed=1), spheres(48, seed=2), spheres(48, seed=3)
    np.savez(path, train_images=tr, train_labels=trl, val_images=va, val_labels=val, test_images=te,
             test_labels=tel)
    return path


def test_medmnist3d_files_load_as_volumes(volume_npz):
    data = load_dataset(volume_npz)
    assert data.images.shape == (256, 1, 16, 16, 16) and data.spatial_dims == 3
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0


@pytest.mark.parametrize("name", ["lepton_cnn", "resnet18", "densenet121"])
def test_3d_networks(name):
    model = model_layout(create_model(name, in_channels=1, num_classes=3, image_size=16, spatial_dims=3)).eval()
    with torch.no_grad():
        assert model(fast_layout(torch.rand(2, 1, 16, 16, 16))).shape == (2, 3)


def test_networks_without_a_3d_version_say_which_have_one(tmp_path):
    with pytest.raises(ModelError, match="no 3-D version.*lepton_cnn"):
        create_model("efficientnet_b0", spatial_dims=3)
    torch.save(create_model("resnet18").state_dict(), tmp_path / "weights.pt")  # a 2-D (ImageNet-style) state dict
    with pytest.raises(ModelError, match="pretrained weights are 2-D"):
        create_model("resnet18", spatial_dims=3, pretrained=tmp_path / "weights.pt")


def test_volume_preprocessing_and_augmentation():
    spec = Preprocessing((8, 12, 12), 1, [0.5], [0.25])
    x = spec.resize([np.random.default_rng(0).random((1, 16, 24, 24), dtype=np.float32)])
    assert x.shape == (1, 1, 8, 12, 12) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert spec.normalize(torch.full((1, 1, 2, 2, 2), 0.75)).unique().tolist() == [1.0]
    with pytest.raises(DataError, match="expected volumes"):
        spec.resize([np.zeros((1, 24, 24), np.float32)])
    vol = torch.zeros(4, 1, 8, 8, 8)
    vol[:, :, :, :, :2] = 1.0  # a bright slab on the left (low W index)
    flipped = augment_batch(vol, {"hflip": 1.0}, torch.Generator().manual_seed(0))
    assert torch.allclose(flipped, torch.flip(vol, dims=[-1]), atol=1e-5)  # an exact left-right mirror
    moved = augment_batch(vol.clone(), augment_options("strong"), torch.Generator().manual_seed(0))
    assert moved.shape == vol.shape and float(moved.min()) >= 0 and float(moved.max()) <= 1
    assert not torch.equal(moved, vol)


@pytest.mark.slow
def test_train_evaluate_and_predict_volumes(volume_npz, tmp_path):
    import lepton

    run = lepton.train(volume_npz, preset="default", model="lepton_cnn", epochs=4, batch_size=16,
                       output_dir=str(tmp_path), name="v", quiet=True, augment="light", tta=True)
    assert run.preprocessing.size == (16, 16, 16) and run.info["val_auc"] > 0.9
    report = lepton.evaluate(run, split="test", n_bootstrap=50)
    assert report["images"] == 48 and report["metrics"]["val_youden"]["auc"] > 0.9
    x, _ = spheres(2, seed=9)
    probs = run.predict_proba(x[:, None].astype(np.float32) / 255)
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    reloaded = lepton.load_run(run.path)
    np.testing.assert_allclose(reloaded.predict_proba(x[:, None] / 255.0), probs, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "adrenalmnist3d.npz").is_file(), reason="the shared AdrenalMNIST3D is not here")
def test_shared_adrenalmnist3d_learns(tmp_path):
    """A short run on a class-balanced slice of the real AdrenalMNIST3D train/val data: the network learns."""
    import lepton

    with np.load(SHARED / "adrenalmnist3d.npz") as npz:
        rng = np.random.default_rng(0)
        pick = {s: rng.permutation(len(npz[f"{s}_labels"]))[:n] for s, n in (("train", 400), ("val", 98))}
        np.savez(tmp_path / "adrenal.npz", **{f"{s}_{k}": npz[f"{s}_{k}"][idx] for s, idx in pick.items()
                                             for k in ("images", "labels")})
    run = lepton.train(tmp_path / "adrenal.npz", preset="default", model="lepton_cnn", epochs=4, batch_size=32,
                       output_dir=str(tmp_path), name="adrenal", quiet=True, augment="light")
    assert run.preprocessing.size == (28, 28, 28) and run.info["val_auc"] > 0.65


def test_corruptions_act_on_volumes_slice_by_slice():
    from lepton.data.transforms.corruptions import CORRUPTIONS, corrupt

    vol = torch.rand(2, 1, 4, 16, 16)
    for name in CORRUPTIONS:
        out = corrupt(vol, name, 3, seed=1)
        assert out.shape == vol.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    layered = torch.zeros(1, 1, 2, 16, 16)
    layered[:, :, 1] = 1.0  # a dark slice above a bright one
    blurred = corrupt(layered, "gaussian_blur", 5)
    assert float(blurred[:, :, 0].max()) == 0.0 and float(blurred[:, :, 1].min()) > 0.9999  # in-plane only


@pytest.mark.slow
def test_a_2_5d_run_trains_explains_and_exports(volume_npz, tmp_path):
    """``slab=True``: a 2-D network over the volumes' slices as channels, still a volume model everywhere."""
    import lepton
    from lepton.explain import saliency_maps
    from lepton.export import export_run

    run = lepton.train(volume_npz, preset="default", model="lepton_cnn", slab=True, epochs=4, batch_size=16,
                       output_dir=str(tmp_path), name="slab", quiet=True, augment="light")
    assert run.model.depth == 16 and run.info["val_auc"] > 0.9
    reloaded = lepton.load_run(run.path)
    x, _ = spheres(2, seed=9)
    volumes = x[:, None].astype(np.float32) / 255
    np.testing.assert_allclose(reloaded.predict_proba(volumes), run.predict_proba(volumes), atol=1e-5)
    maps, _ = saliency_maps(run, volumes)
    assert maps.shape == (2, 16, 16, 16) and np.allclose(maps[:, 0], maps[:, 7])  # one in-plane map per slice
    report = export_run(run, output=tmp_path / "export", repeats=1)
    assert next(r for r in report["variants"] if r["variant"] == "onnx-fp32")["max_abs_prob_diff"] < 1e-4
