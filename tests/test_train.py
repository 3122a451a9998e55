import csv
import json

import pytest
import torch

from conftest import kill_after_epochs, lepton_cmd, resume_and_rerun
from lepton.config import TrainConfig, make_config
from lepton.errors import ConfigError, RunError
from lepton.train import train


def test_run_directory_contents(tiny_run):
    d = tiny_run.path
    for name in ("config.yaml", "best.pt", "last.pt", "history.csv", "curves.png", "labels.json",
                 "preprocessing.json", "data.json", "run.json"):
        assert (d / name).is_file(), name
    rows = list(csv.DictReader((d / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    info = json.loads((d / "run.json").read_text())
    assert info["status"] == "complete" and 0.0 <= info["threshold"] <= 1.0
    assert info["val_auc"] > 0.7, info  # the synthetic opacities are learnable within three epochs
    fp = json.loads((d / "data.json").read_text())
    assert len(fp["sha256"]) == 64 and fp["counts"]["train"]["opacity"] > 0
    cfg = TrainConfig.from_yaml(d / "config.yaml")
    assert cfg.epochs == 3 and cfg.model == "lepton_cnn"
    assert not list(d.glob(".*.tmp")), "atomic writes left temporary files"


def test_existing_run_is_not_overwritten(tiny_run):
    with pytest.raises(RunError, match="already holds a run"):
        train(tiny_run.config.data, name="tiny", output_dir=str(tiny_run.path.parent), epochs=1, quiet=True)


def test_config_validation():
    with pytest.raises(ConfigError, match="schedule"):
        make_config(data="x", schedule="linear")
    with pytest.raises(ConfigError, match="unknown preset"):
        make_config("best", data="x")
    with pytest.raises(ConfigError, match="unknown config field"):
        TrainConfig.from_dict({"data": "x", "learning_rate": 1})
    with pytest.raises(ConfigError, match="data is empty"):
        make_config()
    with pytest.raises(ConfigError, match="time_budget_s"):
        make_config(data="x", time_budget_s=-1)


def test_time_budget_stops_before_overrunning_and_saves_the_plan(tmp_path, synthetic_npz):
    run = train(synthetic_npz, preset="default", name="budget", output_dir=str(tmp_path), epochs=6,
                model="lepton_cnn", time_budget_s=1e-3, quiet=True)
    assert run.info["epochs"] == 1 and len((run.path / "history.csv").read_text().splitlines()) == 2
    saved = TrainConfig.from_yaml(run.path / "config.yaml")
    assert saved.epochs == 1 and saved.time_budget_s == 1e-3  # a resume keeps the shortened plan
    roomy = train(synthetic_npz, preset="default", name="roomy", output_dir=str(tmp_path), epochs=2,
                  model="lepton_cnn", time_budget_s=3600, quiet=True)
    assert roomy.info["epochs"] == 2


def test_fit_to_budget_rescales_the_schedule(tmp_path):
    from lepton.train.budget import fit_to_budget
    from lepton.train.optim import lr_lambda
    from lepton.train.progress import Reporter

    config = make_config("default", data="x.npz", epochs=40, time_budget_s=100.0, warmup_epochs=1)
    factor = lr_lambda(config, steps_per_epoch=10)
    before = factor(200)  # halfway through 40 epochs: the cosine is at its middle
    fit_to_budget(config, elapsed=20.0, epoch_s=10.0, run_dir=tmp_path, reporter=Reporter(True, 40, 10))
    assert config.epochs == 10  # 2 done + 8 more fit in the 80 s left
    assert TrainConfig.from_yaml(tmp_path / "config.yaml").epochs == 10
    assert factor(200) < before and factor(99) > factor(200)  # step 200 is now past the shortened run's end


def test_spare_budget_goes_to_ensemble_members(tmp_path):
    from lepton.train.budget import fit_to_budget

    config = make_config("default", data="x.npz", epochs=10, time_budget_s=100.0, ensemble=5)
    fit_to_budget(config, elapsed=2.0, epoch_s=1.0, run_dir=tmp_path)  # 100 epochs fit: 5 members of 10
    assert (config.epochs, config.ensemble) == (10, 5)
    config = make_config("default", data="x.npz", epochs=10, time_budget_s=100.0, ensemble=5)
    fit_to_budget(config, elapsed=8.0, epoch_s=4.0, run_dir=tmp_path)  # 25 epochs fit: 2 members
    assert (config.epochs, config.ensemble) == (10, 2)
    assert TrainConfig.from_yaml(tmp_path / "config.yaml").ensemble == 2  # a resume keeps the plan
    config = make_config("default", data="x.npz", epochs=10, time_budget_s=30.0, ensemble=5)
    fit_to_budget(config, elapsed=8.0, epoch_s=4.0, run_dir=tmp_path)  # not even one: shortened, one member
    assert (config.epochs, config.ensemble) == (7, 1)
    with pytest.raises(ConfigError, match="ensemble must be a whole number from 1 to 16"):
        make_config(data="x", ensemble=0)


def test_explicit_epochs_train_one_network_under_a_budget_filling_preset(caplog):
    """`lepton train DATA --epochs 1` on a MedMNIST file once trained the preset's 5 members quietly: explicit epochs
    are one network's schedule unless --ensemble asks for members too; the log says so, and says it up front."""
    from lepton.train.budget import announce_members

    preset = make_config("auto", data="x.npz")
    assert (preset.preset, preset.ensemble, preset.time_budget_s > 0) == ("medmnist", 5, True)
    with caplog.at_level("WARNING", logger="lepton.config"):
        one = make_config("auto", data="x.npz", epochs=1)
    assert (one.epochs, one.ensemble) == (1, 1) and "--ensemble 5" in caplog.text
    assert make_config("auto", data="x.npz", epochs=1, ensemble=3).ensemble == 3
    assert announce_members(one) is None
    text = announce_members(preset)
    assert "up to 5 ensemble members of 40 epochs" in text and "time budget of 580 s" in text
    assert "up to 10 forward passes (5 members x 2 TTA view(s))" in text and "--ensemble 1" in text


@pytest.mark.slow
def test_ensemble_members_are_trained_and_chosen_on_val(tmp_path, synthetic_npz):
    """Three members from three seeds: the ensemble is kept exactly when its val AUC is at least the members'
    mean, and it predicts and exports like any model."""
    import numpy as np

    from lepton.export import export_onnx
    from lepton.models.networks import Ensemble

    run = train(synthetic_npz, preset="default", name="ens", output_dir=str(tmp_path), epochs=3, batch_size=32,
                lr=2e-3, quiet=True, ensemble=3)
    info = run.info
    rows = (run.path / "history.csv").read_text().splitlines()
    assert len(rows) == 1 + 9 and info["epochs"] == 9 and info["members_trained"] == 3
    assert {r.split(",")[3] for r in rows[1:]} == {"1", "2", "3"}  # the member column
    assert sorted(p.name for p in (run.path / "members").iterdir()) == ["1.pt", "2.pt", "3.pt"]
    kept = info["ensemble_val"] >= sum(info["member_val"]) / 3
    assert info["members"] == (3 if kept else 1)
    assert isinstance(run.model, Ensemble) == kept
    assert info["val_auc"] == pytest.approx(info["ensemble_val"] if kept else max(info["member_val"]))
    images = [np.random.default_rng(0).random((1, 32, 32), dtype=np.float32)]
    probs = run.predict_proba(images)
    assert probs.shape == (1, 2) and probs.sum() == pytest.approx(1, abs=1e-5)
    # an ensemble of these very members answers their mean probabilities, in PyTorch and in ONNX Runtime
    import onnxruntime as ort

    members = []
    for k in (1, 2, 3):
        ckpt = torch.load(run.path / "members" / f"{k}.pt", weights_only=True)
        from lepton.models import create_model

        m = create_model(**ckpt["spec"])
        m.load_state_dict(ckpt["model"])
        members.append(m.eval())
    ensemble = Ensemble(members).eval()
    x = run.preprocessing(images)
    with torch.no_grad():
        mean = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
        torch.testing.assert_close(torch.softmax(ensemble(x), 1), mean, atol=1e-6, rtol=0)
    path = export_onnx(ensemble, (1, 32, 32), tmp_path / "ens.onnx")
    out = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, mean.numpy(), atol=1e-5)
    # Grad-CAM of an ensemble: the mean of its members' maps
    from lepton.explain import saliency_maps

    run.model = ensemble
    maps, _ = saliency_maps(run, images)
    assert maps.shape == (1, 32, 32) and np.isfinite(maps).all() and maps.max() > 0


@pytest.mark.slow
def test_kill_and_resume_inside_a_later_member(tmp_path):
    """SIGKILL during the second member: the resumed run trains the same members as an uninterrupted one."""
    from lepton.data.tools.synthetic import write_synthetic_npz

    data = write_synthetic_npz(tmp_path / "d.npz", n=300, size=32, seed=3)
    args = ["train", str(data), "--epochs", "3", "--batch-size", "32", "--output-dir", str(tmp_path),
            "--seed", "2", "--quiet", "--ensemble", "2"]
    kill_after_epochs(lepton_cmd(*args, "--name", "killed"), tmp_path / "killed", epochs=4)
    assert (tmp_path / "killed" / "members" / "1.pt").exists()
    killed_rows, clean_rows = resume_and_rerun(args, tmp_path)
    assert [(r["member"], r["epoch"]) for r in killed_rows] == [(m, e) for m in "12" for e in "123"]
    for a, b in zip(killed_rows, clean_rows, strict=True):
        for key in ("train_loss", "val_loss", "val_auc"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-3), (a["member"], a["epoch"], key)
    info_k = json.loads((tmp_path / "killed" / "run.json").read_text())
    info_c = json.loads((tmp_path / "clean" / "run.json").read_text())
    assert info_k["members"] == info_c["members"] and info_k["member_val"] == pytest.approx(info_c["member_val"],
                                                                                            abs=2e-3)


@pytest.mark.slow
def test_freeze_backbone_and_balanced_sampling(tmp_path, synthetic_npz):
    run = train(synthetic_npz, name="frozen", output_dir=str(tmp_path), epochs=1, model="lepton_cnn",
                freeze_backbone=True, imbalance="balanced", quiet=True, ema_decay=0.9, ensemble=1)
    ckpt = torch.load(run.path / "last.pt", weights_only=False)
    from lepton.models import create_model
    from lepton.train.loop import seed_epoch

    seed_epoch(0, 0)  # training seeds this way before it builds the network
    fresh = create_model("lepton_cnn", 1, 2, image_size=32)
    torch.testing.assert_close(ckpt["model"]["features.0.weight"], fresh.state_dict()["features.0.weight"])
    assert not torch.equal(ckpt["model"]["fc.weight"], fresh.state_dict()["fc.weight"])


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path):
    """Kill a real training process mid-run with SIGKILL, resume it, compare with a clean run."""
    from lepton.data.tools.synthetic import write_synthetic_npz

    data = write_synthetic_npz(tmp_path / "d.npz", n=500, size=40, seed=3)
    # (the medmnist preset, which fills its budget with members: --epochs alone now means one network)
    args = ["train", str(data), "--epochs", "5", "--batch-size", "32", "--output-dir", str(tmp_path),
            "--seed", "5", "--quiet", "--augment", "xray"]
    kill_after_epochs(lepton_cmd(*args, "--name", "killed"), tmp_path / "killed")
    history = tmp_path / "killed" / "history.csv"
    done = len(history.read_text().splitlines()) - 1
    assert 2 <= done < 5
    assert not (tmp_path / "killed" / "run.json").exists()

    killed_rows, clean_rows = resume_and_rerun(args, tmp_path)
    assert [int(r["epoch"]) for r in killed_rows] == [1, 2, 3, 4, 5]
    for a, b in zip(killed_rows, clean_rows, strict=True):
        for key in ("train_loss", "val_loss", "val_auc", "val_acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-3), (a["epoch"], key)
    info_k = json.loads((tmp_path / "killed" / "run.json").read_text())
    info_c = json.loads((tmp_path / "clean" / "run.json").read_text())
    assert info_k["best_epoch"] == info_c["best_epoch"]
    assert info_k["val_auc"] == pytest.approx(info_c["val_auc"], abs=2e-3)


def test_resume_of_nothing(tmp_path):
    with pytest.raises(RunError, match="nothing to resume"):
        train(resume=tmp_path)
