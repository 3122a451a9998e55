"""Semi-supervised training: the unlabelled pool never holds a val/test image or patient, FixMatch and Mean Teacher
steps learn from it, and validation sees labelled images only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lepton.config import make_config
from lepton.data.readers.unlabelled import load_unlabelled
from lepton.data.tools.synthetic import write_synthetic_npz
from lepton.errors import ConfigError, DataError
from lepton.tasks import get_task
from lepton.train.data import prepare_data
from lepton.train.semi import SemiTrainer, make_trainer


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one PyTorch thread (conftest's ``one_thread``)."""


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A labelled .npz with 24 training images, and unlabelled pools: the other training images, and the same with
    three val images slipped in."""
    root = tmp_path_factory.mktemp("semi")
    z = dict(np.load(write_synthetic_npz(root / "all.npz", n=160, size=16, seed=2)))
    labelled = {**z, "train_images": z["train_images"][:24], "train_labels": z["train_labels"][:24]}
    np.savez(root / "labelled.npz", **labelled)
    np.savez(root / "pool.npz", images=z["train_images"][24:])
    np.savez(root / "leaky.npz", images=np.concatenate([z["train_images"][24:40], z["val_images"][:3]]))
    return root


def config(root, pool, semi="fixmatch", **extra):
    return make_config("default", data=str(root / "labelled.npz"), unlabelled=str(pool), semi=semi, epochs=1,
                       batch_size=8, semi_threshold=0.6, output_dir=str(root / "runs"), **extra)


def test_a_pool_holding_val_images_is_refused(sets):
    with pytest.raises(DataError, match=r"3 unlabelled image\(s\) are val/test images.*remove them"):
        prepare_data(config(sets, sets / "leaky.npz"), quiet=True)


def test_a_pool_sharing_a_patient_with_val_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["path,label,patient_id,split"]
    for i in range(12):
        name = f"l{i}.png"
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(tmp_path / name)
        rows.append(f"{name},{i % 2},P{i},{'val' if i >= 8 else 'train'}")
    (tmp_path / "labelled.csv").write_text("\n".join(rows) + "\n")
    pool_rows = ["path,patient_id"]
    for i in range(4):  # new images, but the last one is patient P9's, who is in val
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(tmp_path / f"u{i}.png")
        pool_rows.append(f"u{i}.png,{'P9' if i == 3 else f'Q{i}'}")
    (tmp_path / "pool.csv").write_text("\n".join(pool_rows) + "\n")
    cfg = make_config("default", data=str(tmp_path / "labelled.csv"), unlabelled=str(tmp_path / "pool.csv"),
                      semi="fixmatch", epochs=1, batch_size=4)
    with pytest.raises(DataError, match=r"1 unlabelled case\(s\) belong to patients in the val/test.*u3.png"):
        prepare_data(cfg, quiet=True)
    pool = load_unlabelled(tmp_path / "pool.csv")
    assert len(pool) == 4
    spec = prepare_data(make_config("default", data=str(tmp_path / "labelled.csv"), epochs=1), quiet=True).spec
    x = pool.batch([0, 3], spec)  # decoded and sized, in [0, 1]: the steps augment, then normalise
    assert x.shape == (2, 1, 12, 12) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.5


def test_semi_needs_both_settings_and_a_known_method(sets):
    with pytest.raises(ConfigError, match="needs both unlabelled"):
        make_config("default", data=str(sets / "labelled.npz"), semi="fixmatch")
    with pytest.raises(ConfigError, match="not one of mean-teacher, fixmatch"):
        make_config("default", data=str(sets / "labelled.npz"), unlabelled="x.npz", semi="pseudo")


@pytest.mark.parametrize("method", ["fixmatch", "mean-teacher"])
def test_semi_steps_learn_from_the_pool_and_validate_on_labels_only(sets, method):
    cfg = config(sets, sets / "pool.npz", method)
    prepared = prepare_data(cfg, quiet=True)
    assert prepared.fingerprint["unlabelled"]["images"] == len(prepared.unlabelled) == 112 - 24
    trainer = make_trainer(cfg, get_task("classification"), prepared, "cpu")
    assert isinstance(trainer, SemiTrainer)
    assert trainer.steps_per_epoch == len(prepared.unlabelled) // (cfg.batch_size * cfg.semi_ratio)
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    row = trainer.train_epoch(1)
    assert row["seen"] == trainer.steps_per_epoch * cfg.batch_size  # labelled images cycle beside the pool
    assert row["unsup_loss"] >= 0 and 0.0 <= row["pseudo_fraction"] <= 1.0
    if method == "mean-teacher":
        assert row["pseudo_fraction"] == 1.0 and trainer.teacher is not None
        assert "teacher" in trainer.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in trainer.module.state_dict().items())
    metrics = trainer.validate()
    assert len(prepared.y_val) == 24 and 0.0 <= metrics["val_auc"] <= 1.0  # the labelled val split, nothing else


# -- segmentation: voxel-wise consistency on unlabelled cases ---------------------------------------------------
@pytest.fixture(scope="module")
def seg_sets(tmp_path_factory):
    """Twelve labelled 2-D cases (32 px, paired folders) and unlabelled pools of eight: other generated images, the
    same count of different images, and one that holds the labelled cases' own images (val among them)."""
    import shutil

    from lepton.data.tools.synthetic import write_segmentation_cases

    root = tmp_path_factory.mktemp("semi-seg")
    labelled = write_segmentation_cases(root / "labelled", n=12, dims=2, seed=0, shape=(32,))
    other = write_segmentation_cases(root / "other", n=16, dims=2, seed=1, shape=(32,))
    for name, picks in (("pool", range(8)), ("pool_b", range(8, 16))):
        (root / name).mkdir()
        for i in picks:
            shutil.copy(other / "images" / f"case{i:03d}.png", root / name / f"u{i:03d}.png")
    shutil.copytree(labelled / "images", root / "leaky")
    return root


def seg_config(root, pool, semi="fixmatch", **extra):
    return make_config("segmentation", data=str(root / "labelled"), unlabelled=str(root / pool), semi=semi,
                       epochs=1, batch_size=2, semi_ratio=2, semi_threshold=0.5, image_size=32, val_fraction=0.25,
                       test_fraction=0.0, augment="none", ema_decay=0.0, seed=0, threads=1,
                       output_dir=str(root / "runs"), **extra)


def test_a_segmentation_pool_holding_val_images_is_refused(seg_sets):
    with pytest.raises(DataError, match=r"unlabelled image\(s\) are val/test images.*remove them"):
        prepare_data(seg_config(seg_sets, "leaky"), quiet=True)


def test_segmentation_views_share_one_grid():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16)
    weak, strong = get_task("segmentation").unlabelled_views(x, {"hflip": 1.0}, {"vflip": 1.0, "rotate": 30.0},
                                                             gen)
    assert torch.allclose(weak, torch.flip(x, dims=[-1]), atol=1e-5)  # the weak view's geometry ...
    assert torch.equal(strong, weak)  # ... and the strong view's geometry dropped: only its intensity changes count


def _trained(cfg):
    prepared = prepare_data(cfg, quiet=True)
    torch.manual_seed(0)
    trainer = make_trainer(cfg, get_task("segmentation"), prepared, "cpu")
    return prepared, trainer, trainer.train_epoch(1)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixmatch", "mean-teacher"])
def test_semi_segmentation_learns_from_the_unlabelled_cases(seg_sets, method):
    prepared, trainer, row = _trained(seg_config(seg_sets, "pool", method))
    assert isinstance(trainer, SemiTrainer) and len(prepared.unlabelled) == 8
    assert trainer.steps_per_epoch == 2 and row["seen"] == 4
    assert row["unsup_loss"] > 0 and 0.0 < row["pseudo_fraction"] <= 1.0
    assert len(prepared.x_val) == 3 and prepared.fingerprint["counts"]["val"]["cases"] == 3  # labelled val only
    assert 0.0 <= trainer.validate()["val_dice"] <= 1.0
    if method == "fixmatch":  # the same steps over different unlabelled images end elsewhere: the pool is used
        _, other, _ = _trained(seg_config(seg_sets, "pool_b", method))
        mine, theirs = trainer.module.state_dict(), other.module.state_dict()
        assert any(not torch.equal(mine[k], theirs[k]) for k in mine)


def test_semi_refuses_a_task_without_unlabelled_learning(seg_sets):
    from lepton.train.data import unlabelled_pool

    cfg = seg_config(seg_sets, "pool")
    with pytest.raises(ConfigError, match="built for classification and segmentation; the detection task"):
        unlabelled_pool(cfg, get_task("detection"), None, np.array([]), [], quiet=True)
