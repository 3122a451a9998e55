"""Distillation (lepton.distill): an ensemble with flip TTA taught to one network that is a run like any other —
resumable after a SIGKILL, evaluated beside its teacher, registered with its teacher named, served through OIP; a
segmentation ensemble's soft masks (cached per case on disk) taught to one network and compared by Dice."""

import csv
import json
import sys

import numpy as np
import pytest
import torch

from conftest import kill_after_epochs
from lepton.errors import ConfigError, RunError

EPOCHS = 3


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, synthetic_npz):
    """Two members with flip TTA: four forward passes per image."""
    from lepton.train import train

    return train(synthetic_npz, preset="default", name="teacher", output_dir=str(tmp_path_factory.mktemp("t")),
                 epochs=2, batch_size=32, lr=2e-3, ensemble=2, tta=True, quiet=True, seed=0)


def _distill_args(teacher, out, name: str) -> dict:
    return {"epochs": EPOCHS, "name": name, "output_dir": str(out), "n_bootstrap": 20, "quiet": True,
            "temperature": 3.0, "alpha": 0.8}


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    from lepton.distill import distill

    out = tmp_path_factory.mktemp("s")
    return distill(teacher.path, **_distill_args(teacher, out, "student"))


@pytest.fixture(scope="module")
def seg_teacher(tmp_path_factory):
    """A 2-D segmentation ensemble of two U-Nets with flip TTA (one epoch each) on 10 generated 32-px cases."""
    import lepton
    from lepton.data.tools.synthetic import write_segmentation_cases

    root = tmp_path_factory.mktemp("seg-teacher")
    cases = write_segmentation_cases(root / "cases", n=10, dims=2, seed=0, shape=(32,))
    return lepton.train(cases, task="segmentation", epochs=1, batch_size=4, ensemble=2, tta=True, time_budget_s=0,
                        quiet=True, output_dir=str(root), name="teacher", seed=0)


@pytest.fixture(scope="module")
def seg_student(seg_teacher, tmp_path_factory):
    from lepton.distill import distill

    return distill(seg_teacher.path, **{**_distill_args(seg_teacher, tmp_path_factory.mktemp("seg-s"), "student"),
                                        "epochs": 1})


def test_soft_targets_and_the_loss():
    from lepton.distill import kd_loss, soft_targets

    p = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    torch.testing.assert_close(soft_targets(p, 1.0), p)
    warm = soft_targets(p, 4.0)
    assert (warm[:, 0] - 0.5).abs().lt((p[:, 0] - 0.5).abs()).all()  # a higher temperature softens
    hard = torch.nn.functional.cross_entropy
    logits = torch.log(p)
    target = torch.cat([soft_targets(p, 2.0), torch.tensor([[0.0], [-1.0]])], dim=1)  # row 2 unlabelled
    assert kd_loss(hard, 2.0, 1.0)(logits, target).item() == pytest.approx(0.0, abs=1e-6)  # student = teacher
    only_hard = kd_loss(hard, 2.0, 0.0)(logits, target)
    assert only_hard.item() == pytest.approx(hard(logits[:1], torch.tensor([0])).item(), rel=1e-6)
    wrong = torch.log(p.flip(1))
    assert kd_loss(hard, 2.0, 1.0)(wrong, target).item() > 0.1


def test_the_student_is_a_run_that_names_its_teacher(teacher, student, tmp_path, monkeypatch):
    t_info, s_info = teacher.info, student.info
    assert t_info["members"] == 2 and t_info["cost"]["forward_passes_per_image"] == 4
    assert (student.config.tta, student.config.ensemble, student.config.seed) == (False, 1, teacher.config.seed)
    assert s_info["status"] == "complete" and s_info["epochs"] == EPOCHS and 0 <= s_info["threshold"] <= 1
    assert s_info["cost"]["forward_passes_per_image"] == 1
    t = s_info["teacher"]
    assert t["run"] == str(teacher.path.resolve()) and (t["members"], t["tta_views"], t["forward_passes_per_image"]) \
        == (2, 2, 4) and t["temperature"] == 3.0
    # the student's val split is the teacher's: the same images, side by side in one report
    report = json.loads((student.path / "distill_report.json").read_text())
    assert report["teacher"]["images"] == report["student"]["images"] == s_info["val_images"]
    for who in ("teacher", "student"):
        row = report[who]
        assert len(row["auc_ci95"]) == 2 and 0 <= row["ece"] <= 1 and row["ms_per_image_b1"] > 0
    assert (report["teacher"]["forward_passes_per_image"], report["student"]["forward_passes_per_image"]) == (4, 1)
    assert report["student"]["val_auc"] == pytest.approx(
        json.loads((student.path / "eval" / "val" / "report.json").read_text())["metrics"]["val_youden"]["auc"])
    assert "| teacher |" in (student.path / "distill_report.md").read_text()
    # the teacher's outputs are cached: read back, never computed twice
    from lepton import distill as mod

    cached = np.load(student.path / mod.TEACHER_FILE)["probs"]
    assert cached.shape == (s_info["train_images"], 2) and np.allclose(cached.sum(1), 1, atol=1e-4)
    monkeypatch.setattr("lepton.runs.predict_outputs", lambda *a, **k: pytest.fail("teacher recomputed"))
    key = str(np.load(student.path / mod.TEACHER_FILE)["key"])
    np.testing.assert_array_equal(mod.teacher_outputs(teacher, np.zeros((len(cached), 1, 32, 32), np.float32),
                                                      student.path, key, quiet=True), cached)
    monkeypatch.undo()
    # registered as a version whose card names its teacher and what each answer costs
    from lepton.registry import Registry

    reg = Registry.open(tmp_path / "reg")
    reg.register_run(teacher.path, "cxr")
    v = reg.register_run(student.path, "cxr")
    card = reg.card(v.ref)
    assert f"Distilled from teacher `{teacher.path.resolve()}`" in card and "4 forward passes per image" in card
    assert "Forward passes per image: 1 (1 member(s) × 1 TTA view(s))" in card
    assert v.metrics["eval/val"]["images"] == s_info["val_images"]  # evaluated like any run
    # exported like any run
    from lepton.export import export_run

    exported = export_run(student, quantize="int8", output=tmp_path / "export", repeats=2)
    assert [r["variant"] for r in exported["variants"]] == ["pytorch-fp32", "onnx-fp32", "onnx-int8"]


def test_a_student_served_through_oip_answers_as_offline(student, tmp_path):
    import httpx

    from conftest import running
    from lepton.registry import Registry
    from lepton.serve import ServeConfig

    reg = Registry.open(tmp_path / "reg")
    reg.register_run(student.path, "student")
    key = {"Authorization": f"Bearer {reg.create_key('clinic')}"}
    x = np.random.default_rng(4).random((3, 1, 32, 32)).astype(np.float32)
    expected = student.predict_proba(list(x))
    with running(ServeConfig(models=["student"], registry=str(tmp_path / "reg"), rate_limit=0)) as base:
        meta = httpx.get(f"{base}/v2/models/student", headers=key, timeout=30).json()
        assert meta["parameters"]["cost"]["forward_passes_per_image"] == 1
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        out = httpx.post(f"{base}/v2/models/student/infer", json=body, headers=key, timeout=60).json()
    probs = next(o for o in out["outputs"] if o["name"] == "probabilities")
    np.testing.assert_allclose(np.asarray(probs["data"], np.float32).reshape(probs["shape"]), expected, atol=1e-5)


@pytest.mark.slow
def test_distillation_resumes_after_a_kill(teacher, student, tmp_path):
    """SIGKILL a distillation in its own process after two epochs; the resumed run repeats the uninterrupted one,
    reading the teacher's outputs from its cache. (A segmentation student resumes through the same epochs and
    checkpoints; its per-case soft-mask cache picking up after a kill is tested below without a process.)"""
    from lepton.distill import TEACHER_FILE, distill

    args = _distill_args(teacher, tmp_path, "killed")
    code = f"from lepton.distill import distill; distill({str(teacher.path)!r}, **{args!r})"
    kill_after_epochs([sys.executable, "-c", code], tmp_path / "killed", epochs=2)
    killed = tmp_path / "killed"
    assert not (killed / "run.json").exists() and (killed / "last.pt").exists()
    cached = (killed / TEACHER_FILE).stat().st_mtime_ns
    resumed = distill(resume=killed, n_bootstrap=20, quiet=True)
    assert (killed / TEACHER_FILE).stat().st_mtime_ns == cached
    rows = [list(csv.DictReader((d / "history.csv").open())) for d in (killed, student.path)]
    assert [int(r["epoch"]) for r in rows[0]] == list(range(1, EPOCHS + 1))
    for a, b in zip(*rows, strict=True):
        for key in ("train_loss", "val_loss", "val_auc"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-3), (a["epoch"], key)
    assert resumed.info["val_auc"] == pytest.approx(student.info["val_auc"], abs=2e-3)


def test_refusals(teacher, tmp_path):
    from lepton.distill import distill

    with pytest.raises(ConfigError, match="temperature"):
        distill(teacher.path, temperature=0.0, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="unet is an image → map network"):
        distill(teacher.path, student="unet", output_dir=str(tmp_path), name="seg")
    with pytest.raises(RunError, match="not a distillation"):
        distill(resume=teacher.path)


def test_cli_distils_and_registers_with_the_teachers_version(teacher, tmp_path):
    from typer.testing import CliRunner

    from lepton.cli import app
    from lepton.registry import Registry

    reg = Registry.open(tmp_path / "reg")
    reg.register_run(teacher.path, "cxr")
    result = CliRunner().invoke(app, ["distill", str(teacher.path), "--epochs", "1", "--name", "cli", "--output-dir",
                                      str(tmp_path), "--register", "cxr", "--registry", str(tmp_path / "reg"),
                                      "--bootstrap", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "| student |" in result.output and '"forward_passes_per_image": 1' in result.output
    assert "(registered as cxr@1)" in Registry.open(tmp_path / "reg").card("cxr@2")
    refused = CliRunner().invoke(app, ["distill"])
    assert refused.exit_code != 0 and "--resume" in refused.output


def test_unlabelled_images_are_read_at_the_teachers_size(tmp_path, png_folder):
    from lepton.data.transforms.preprocessing import Preprocessing
    from lepton.distill import _unlabelled_images
    from lepton.errors import DataError

    spec = Preprocessing((16, 16), 1, [0.5], [0.5], None, "middle", [], "resize")
    x = _unlabelled_images(str(png_folder), spec)  # class folders or not: every image file, labels ignored
    assert tuple(x.shape) == (24, 1, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    np.savez(tmp_path / "pool.npz", train_images=np.zeros((5, 20, 20), np.uint8),
             test_images=np.zeros((3, 20, 20), np.uint8))
    assert tuple(_unlabelled_images(str(tmp_path / "pool.npz"), spec).shape) == (5, 1, 16, 16)  # never test_*
    with pytest.raises(DataError, match="folder of image files"):
        _unlabelled_images(str(tmp_path / "missing"), spec)


def test_segmentation_losses_and_consistent_targets():
    """Voxel-wise KL + soft Dice against the teacher's masks, mixed with the labels' Dice + CE; a batch's targets take
    the teacher's outputs on that batch (consistent teaching) for both tasks."""
    from lepton.tasks import get_task
    from lepton.tasks.distillation import soft_mask_loss

    seg, cls = get_task("segmentation"), get_task("classification")
    gen = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(2, 3, 8, 8, generator=gen) * 3
    probs = torch.softmax(teacher_logits, 1)
    label = probs.argmax(1, keepdim=True).float()
    target = torch.cat([label, probs], 1)
    kd_only = soft_mask_loss(seg.loss, 2.0, 1.0)
    same, other = kd_only(teacher_logits, target), kd_only(-teacher_logits, target)
    assert float(other) > float(same) + 0.5
    # at alpha = 1 only the teacher counts: the KL part vanishes when the student is the teacher
    kl_only = soft_mask_loss(lambda logits, y: logits.sum() * 0, 2.0, 1.0)
    from monai.losses import DiceLoss

    dice = DiceLoss(include_background=False, softmax=True, batch=True)(teacher_logits, probs)
    assert float(kl_only(teacher_logits, target)) == pytest.approx(float(dice), abs=1e-5)
    # alpha = 0: the task's own loss on the label channel alone
    assert float(soft_mask_loss(seg.loss, 2.0, 0.0)(teacher_logits, target)) == pytest.approx(
        float(seg.loss(teacher_logits, label.long())), rel=1e-5)
    # voxels moved in from outside the case (all channels 0) count as background, not as NaN
    outside = target.clone()
    outside[:, :, :2] = 0
    assert torch.isfinite(kd_only(teacher_logits, outside))
    fresh = torch.softmax(torch.randn(2, 3, 8, 8, generator=gen), 1)
    torch.testing.assert_close(seg.distill_batch(target, fresh, 2.0), torch.cat([label, fresh], 1))
    rows = torch.tensor([[0.6, 0.4, 1.0], [0.5, 0.5, -1.0]])
    moved = cls.distill_batch(rows, torch.tensor([[0.1, 0.9], [0.8, 0.2]]), 1.0)
    torch.testing.assert_close(moved, torch.tensor([[0.1, 0.9, 1.0], [0.8, 0.2, -1.0]]))
    with pytest.raises(ConfigError, match="no distillation"):
        get_task("detection").distill_loss(seg.loss, 2.0, 0.5)


def test_consistent_teaching_asks_the_teacher_on_each_batch(teacher):
    """With consistent teaching a step's soft targets are the teacher's answers (members, TTA) on the batch the
    student trains on, not the cached ones."""
    from types import SimpleNamespace

    from lepton.distill import _teach_on_each_batch
    from lepton.runs import predict_outputs

    seen = []
    trainer = SimpleNamespace(task=teacher.task, device="cpu", step=lambda xb, yb, epoch, weight=1.0, extras=None:
                              seen.append(yb) or 0.0)
    _teach_on_each_batch(trainer, teacher, 2.0)
    xb = teacher.preprocessing.normalize(torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)))
    cached = torch.tensor([[0.5, 0.5, 1.0]] * 4)
    trainer.step(xb, cached, 1)
    expected = predict_outputs(teacher.model, xb, teacher.task.activate, tta=True)
    from lepton.tasks.distillation import soft_targets

    torch.testing.assert_close(seen[0][:, :2], soft_targets(torch.from_numpy(expected), 2.0))
    assert seen[0][:, 2].tolist() == [1.0] * 4


@pytest.mark.slow
def test_a_segmentation_ensemble_is_distilled_by_its_soft_masks(seg_teacher, seg_student, tmp_path, monkeypatch):
    """One network from a 2-member, 2-view segmentation teacher: its soft masks cached per case as uint8 on disk and
    read a batch at a time, the student evaluated by Dice beside it and registered with the teacher named."""
    from lepton import distill as mod

    t_cost, s_info = seg_teacher.info["cost"], seg_student.info
    assert t_cost["forward_passes_per_image"] == 2 * seg_teacher.info.get("members", 1) >= 2
    assert (seg_student.config.tta, seg_student.config.ensemble, s_info["cost"]["forward_passes_per_image"]) == \
        (False, 1, 1)
    assert s_info["teacher"]["run"] == str(seg_teacher.path.resolve()) and "val_dice" in s_info["teacher"]
    report = json.loads((seg_student.path / "distill_report.json").read_text())
    assert report["metric"] == "dice" and report["teacher"]["images"] == report["student"]["images"] == 2
    assert report["dice_delta"] == pytest.approx(report["student"]["val_dice"] - report["teacher"]["val_dice"])
    assert report["student"]["val_dice"] == pytest.approx(
        json.loads((seg_student.path / "eval" / "val" / "report.json").read_text())["mean_dice"])
    assert "| teacher |" in (seg_student.path / "distill_report.md").read_text()
    # one compressed uint8 file per training case, probabilities on the padded case grid
    folder = seg_student.path / mod.TEACHER_MASKS
    files = sorted(folder.iterdir())
    assert len(files) == s_info["train_images"]
    with np.load(files[0]) as z:
        q = z["probs"]
    assert q.dtype == np.uint8 and q.shape[0] == 2 and np.abs(q.sum(0).astype(int) - 255).max() <= 2
    # read per batch: only the cases asked for, the label map first
    targets = seg_student.task.distill_targets(torch.zeros((len(files), 1, *q.shape[1:])), folder, 4.0)
    batch = targets[torch.tensor([0, 2])]
    assert tuple(batch.shape) == (2, 3, *q.shape[1:])
    np.testing.assert_allclose(batch[0, 1:].numpy(), q / q.sum(0, keepdims=True), atol=1e-6)
    # the cache is per case: a torn file and a missing one are computed again, the rest read back
    files[0].write_bytes(b"torn")
    files[1].unlink()
    key = str(np.load(files[2])["key"])
    calls = []
    real = mod.write_soft_mask
    monkeypatch.setattr(mod, "write_soft_mask", lambda f, i, p, k: calls.append(i) or real(f, i, p, k))
    x = torch.rand(len(files), 1, *q.shape[1:])
    mod.teacher_masks(seg_teacher, x, seg_student.path, key, quiet=True)
    assert calls == [0, 1]
    # registered as a version whose card names its teacher; export takes it like any run
    from lepton.registry import Registry

    reg = Registry.open(tmp_path / "reg")
    reg.register_run(seg_teacher.path, "seg")
    card = reg.card(reg.register_run(seg_student.path, "seg").ref)
    assert f"Distilled from teacher `{seg_teacher.path.resolve()}`" in card and "Dice" in card
    with pytest.raises(ConfigError, match="unlabelled images are taken for classifiers"):
        mod.distill(seg_teacher.path, unlabelled=str(tmp_path), output_dir=str(tmp_path), name="u")
