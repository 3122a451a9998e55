"""Self-supervised pretraining: a killed run resumes to the same backbone; the backbone loads into the network it was
pretrained as and is refused, with the fix, where it does not fit."""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import lepton_cmd
from lepton.errors import ModelError, RunError
from lepton.models import create_model
from lepton.pretrain import nt_xent, patch_mask, pretrain

OPTS = {"epochs": 3, "batch_size": 8, "image_size": 16, "lr": 1e-3}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one PyTorch thread (conftest's ``one_thread``)."""


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("pool") / "pool.npz"
    np.savez(path, images=(rng.random((32, 16, 16)) * 255).astype(np.uint8))
    return path


@pytest.mark.slow
def test_killed_pretraining_resumes_to_the_same_backbone(pool, tmp_path):
    out = tmp_path / "killed"
    args = ["pretrain", str(pool), "-o", str(out), "--method", "contrastive", "--quiet", "--threads", "1",
            *(f"--{k.replace('_', '-')}={v}" for k, v in OPTS.items())]
    proc = subprocess.Popen(lepton_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not (out / "history.csv").exists():
        time.sleep(0.05)
    assert proc.poll() is None, f"pretraining ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "backbone.pt").exists() and (out / "last.pt").is_file()
    pretrain(pool, out, method="contrastive", quiet=True, **OPTS)  # the same options: resumes from last.pt
    clean = pretrain(pool, tmp_path / "clean", method="contrastive", quiet=True, **OPTS)
    resumed_rows = list(csv.DictReader((out / "history.csv").open()))
    clean_rows = list(csv.DictReader((tmp_path / "clean" / "history.csv").open()))
    assert [r["epoch"] for r in resumed_rows] == ["1", "2", "3"]
    assert [float(r["loss"]) for r in resumed_rows] == pytest.approx([float(r["loss"]) for r in clean_rows], rel=1e-5)
    a, b = (torch.load(p, weights_only=True)["model"] for p in (out / "backbone.pt", clean))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    with pytest.raises(RunError, match="other settings.*epochs"):  # another configuration never overwrites it
        pretrain(pool, out, method="contrastive", quiet=True, **{**OPTS, "epochs": 4})


def test_backbone_loads_where_it_fits_and_is_refused_clearly_elsewhere(pool, tmp_path):
    backbone = pretrain(pool, tmp_path / "masked", method="masked", quiet=True, **{**OPTS, "epochs": 1})
    state = torch.load(backbone, weights_only=True)["model"]
    model = create_model("lepton_cnn", in_channels=1, num_classes=3, image_size=16, pretrained=backbone)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())  # every backbone weight, the head fresh
    assert loaded["fc.weight"].shape == (3, 256) and "fc.weight" not in state
    with pytest.raises(ModelError, match="lepton_cnn backbone.*this run builds resnet18: train with --model "
                                         "lepton_cnn"):
        create_model("resnet18", in_channels=1, num_classes=2, image_size=16, pretrained=backbone)
    with pytest.raises(ModelError, match="3 channel.*--channels 1"):
        create_model("lepton_cnn", in_channels=3, num_classes=2, image_size=16, pretrained=backbone)
    with pytest.raises(ModelError, match="2-D lepton_cnn.*3-D"):
        create_model("lepton_cnn", in_channels=1, num_classes=2, image_size=16, spatial_dims=3, pretrained=backbone)


@pytest.mark.slow
def test_3d_and_encoder_decoder_backbones(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "vols.npz", images=(rng.random((8, 16, 16, 16)) * 255).astype(np.uint8))
    vol = pretrain(tmp_path / "vols.npz", tmp_path / "v", model="lepton_cnn", method="contrastive", quiet=True,
                   epochs=1, batch_size=4, image_size=16)
    model = create_model("lepton_cnn", in_channels=1, num_classes=2, image_size=16, spatial_dims=3, pretrained=vol)
    assert model(torch.rand(2, 1, 16, 16, 16)).shape == (2, 2)
    np.savez(tmp_path / "imgs.npz", images=(rng.random((8, 16, 16)) * 255).astype(np.uint8))
    unet = pretrain(tmp_path / "imgs.npz", tmp_path / "u", model="unet", method="masked", quiet=True, epochs=1,
                    batch_size=4, image_size=32)  # four halvings leave 2x2 for instance norm
    seg = create_model("unet", in_channels=1, num_classes=3, image_size=32, pretrained=unet)
    assert seg(torch.rand(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(ModelError, match="unet backbone.*segresnet"):
        create_model("segresnet", in_channels=1, num_classes=3, image_size=32, pretrained=unet)


def test_patch_mask_blanks_about_the_ratio():
    mask = patch_mask((64, 1, 32, 32), 0.6, torch.Generator().manual_seed(0))
    assert mask.shape == (64, 1, 32, 32) and 0.5 < float(mask.mean()) < 0.7
    assert set(mask.unique().tolist()) == {0.0, 1.0}


def test_nt_xent_is_monais_contrastive_loss():
    from monai.losses import ContrastiveLoss

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 8, generator=gen, requires_grad=True), torch.randn(16, 8, generator=gen)
    ours, monai = nt_xent(a, b, 0.2), ContrastiveLoss(temperature=0.2)(a, b)
    assert float(ours.detach()) == pytest.approx(float(monai), rel=1e-5)
    (g_ours,) = torch.autograd.grad(ours, a)
    (g_monai,) = torch.autograd.grad(ContrastiveLoss(temperature=0.2)(a, b), a)
    assert torch.allclose(g_ours, g_monai, atol=1e-5)


@pytest.mark.slow
def test_a_registered_backbone_trains_by_name_and_is_refused_where_it_does_not_fit(pool, tmp_path):
    from typer.testing import CliRunner

    from lepton.cli import app
    from lepton.data.tools.synthetic import write_synthetic_npz
    from lepton.errors import RegistryError
    from lepton.registry import Registry

    out = tmp_path / "ssl"
    backbone = pretrain(pool, out, method="masked", quiet=True, model="lepton_cnn_tiny", **{**OPTS, "epochs": 1})
    reg = Registry.open(tmp_path / "reg")
    v = reg.register_backbone(out, "ssl")
    assert v.format == "backbone" and v.config["model"] == "lepton_cnn_tiny" and v.preprocessing["channels"] == 1
    reg.promote("ssl", v.version, "production")
    assert "A pretrained backbone" in reg.card("ssl@production")
    path = reg.backbone_file("ssl@production")
    assert path.read_bytes() == backbone.read_bytes()  # the very file, verified
    model = create_model("lepton_cnn_tiny", in_channels=1, num_classes=2, image_size=16, pretrained=path)
    state = torch.load(backbone, weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], w) for k, w in state.items())

    data = write_synthetic_npz(tmp_path / "data.npz", n=48, size=16, seed=0)
    common = ["train", str(data), "--registry", str(tmp_path / "reg"), "--epochs", "1", "--batch-size", "16",
              "--threads", "1", "--output-dir", str(tmp_path / "runs"), "--quiet"]
    done = CliRunner().invoke(app, [*common, "--model", "lepton_cnn_tiny", "--pretrained", "ssl@production",
                                    "--name", "fits"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "runs" / "fits" / "config.yaml").read_text().count(str(path)) == 1
    refused = CliRunner().invoke(app, [*common, "--model", "resnet18", "--pretrained", "ssl@production",
                                       "--name", "other"])
    assert isinstance(refused.exception, ModelError)
    assert str(refused.exception).startswith("the registered backbone ssl@production: ")
    assert "train with --model lepton_cnn_tiny" in str(refused.exception)
    missing = CliRunner().invoke(app, [*common, "--pretrained", "nosuch@1", "--name", "x"])
    assert isinstance(missing.exception, RegistryError) and "nosuch" in str(missing.exception)
    reg.register_run(tmp_path / "runs" / "fits", "classifier")
    with pytest.raises(RegistryError, match="classifier@1 is a pytorch model, not a pretrained backbone"):
        reg.backbone_file("classifier@1")
