"""Semi-supervised training: the unlabelled pool never holds a val/test image or patient, FixMatch and Mean Teacher
steps learn from it, and validation sees labelled images only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lepton.config import make_config
from lepton.data.synthetic import write_synthetic_npz
from lepton.data.unlabelled import load_unlabelled
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
