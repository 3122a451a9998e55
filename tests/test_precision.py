"""Precision: the hardware rule of ``auto``, training in bf16 and fp32, and serving precisions checked on the
version's stored val set (records, thresholds, int8 graphs, refusals) through a real server — classifiers on val AUC,
segmentation on mean Dice over stored val cases."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest

from conftest import png_bytes, running
from lepton.errors import ConfigError
from lepton.models import precision as mp


@pytest.fixture
def flags(monkeypatch):
    """Pretend the CPU has the given flags."""
    def use(*names: str) -> None:
        monkeypatch.setattr(mp, "cpu_flags", lambda: frozenset(names))
    return use


def test_auto_follows_the_cpus_matrix_units(flags):
    flags("avx2", "fma")
    assert mp.resolve_precision("auto", "cpu") == "fp32"
    flags("avx2", "avx512f", "avx512_bf16")
    assert mp.resolve_precision("auto", "cpu") == "bf16"
    assert mp.resolve_precision("auto", "cpu", spatial_dims=3) == "fp32"  # volumes stay fp32 (see the docstring)
    flags("avx2", "avx512f", "amx_bf16", "amx_tile")
    assert mp.resolve_precision("auto", "cpu") == "bf16"
    assert mp.resolve_precision("fp32", "cpu") == "fp32"
    flags("avx2")
    assert mp.resolve_precision("bf16", "cpu") == "bf16"  # asked for: correct, only slower without the units


def test_fp16_on_a_cpu_and_unknown_precisions_are_refused():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        mp.resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="precision='fp8'"):
        mp.resolve_precision("fp8", "cpu")
    from lepton.config import TrainConfig

    with pytest.raises(ConfigError, match="precision='half'"):
        TrainConfig(data="x.npz", precision="half").validate()


@pytest.mark.slow
def test_training_in_each_precision_learns_and_is_recorded(synthetic_npz, tmp_path):
    """bf16 autocast trains correctly on every CPU (slowly where it has no bf16 units) and ends near fp32; run.json
    says which precision ran and on which CPU flags."""
    from lepton.train import train

    aucs = {}
    for precision in ("fp32", "bf16"):
        run = train(synthetic_npz, preset="default", name=f"p-{precision}", output_dir=str(tmp_path), epochs=4,
                    batch_size=32, lr=2e-3, quiet=True, seed=0, precision=precision)
        info = json.loads((run.path / "run.json").read_text())
        assert info["precision"] == precision
        assert info["cpu"]["flags"] == mp.matrix_flags()
        aucs[precision] = info["val_auc"]
        with np.load(run.path / "val_set.npz") as z:  # the val set that serving precisions are checked on
            assert len(z["y_val"]) == info["val_images"]
            assert z["x_val"].shape[1:] == (1, 32, 32) and z["x_calib"].shape[0] > 0
            assert z["x_val"].min() >= 0.0 and z["x_val"].max() <= 1.0
    assert aucs["fp32"] > 0.8 and abs(aucs["bf16"] - aucs["fp32"]) < 0.05, aucs


@pytest.fixture(scope="module")
def registry(tiny_run, tmp_path_factory):
    from lepton.registry import Registry

    root = tmp_path_factory.mktemp("precision")
    shutil.copytree(tiny_run.path, root / "run")
    reg = Registry.open(root / "reg")
    reg.register_run(root / "run", "cxr")
    return reg


@pytest.mark.slow
def test_each_precision_is_checked_on_the_stored_val_set(registry):
    from lepton.precision import check_precision
    from lepton.tasks.classification import Classification

    MAX_AUC_DROP = Classification.precision_tolerance
    records = {p: check_precision(registry, "cxr@1", p) for p in ("fp32", "bf16", "int8")}
    v = registry.get("cxr@1")
    assert set(v.metrics["precisions"]) == {"fp32", "bf16", "int8"}
    assert "onnx_int8" in v.artifacts and "val_set" in v.artifacts
    assert records["fp32"]["auc_delta"] == 0 and records["fp32"]["threshold"] == v.threshold
    for p in ("bf16", "int8"):
        r = records[p]
        assert r["accepted"] == (r["fp32_val_auc"] - r["val_auc"] <= MAX_AUC_DROP)
        assert 0 < r["max_prob_diff"] < 0.1  # a lower precision, not another model
        assert 0.0 < r["threshold"] < 1.0 and r["images_per_s"] > 0
        assert r["cpu"]["flags"] == mp.matrix_flags()


@pytest.mark.slow
def test_a_refused_precision_names_both_aucs(registry, monkeypatch):
    import lepton.precision as lp
    from lepton.tasks.classification import Classification

    # demands a gain of a whole AUC point: every check fails
    monkeypatch.setattr(Classification, "precision_tolerance", -1.0)
    for p in ("bf16", "int8"):
        assert lp.check_precision(registry, "cxr@1", p)["accepted"] is False
    with pytest.raises(lp.PrecisionError, match=r"cxr@1 in bf16: val AUC 0\.\d{4} against fp32 0\.\d{4}"):
        lp.choose_precision(registry, "cxr@1", "bf16")
    assert registry.get("cxr@1").metrics["precisions"]["bf16"]["accepted"] is False
    # auto never refuses: it falls back to fp32 when no lower precision passes
    assert lp.choose_precision(registry, "cxr@1", "auto")[0] == "fp32"
    with pytest.raises(ConfigError, match="bf16 runs on PyTorch"):
        lp.choose_precision(registry, "cxr@1", "bf16", backend="onnx")


def test_a_version_without_a_val_set_cannot_be_checked(tiny_run, tmp_path):
    from lepton.precision import PrecisionError, choose_precision
    from lepton.registry import Registry

    shutil.copytree(tiny_run.path, tmp_path / "run")
    (tmp_path / "run" / "val_set.npz").unlink()  # a run trained before val sets were kept
    reg = Registry.open(tmp_path / "reg")
    reg.register_run(tmp_path / "run", "old")
    with pytest.raises(PrecisionError, match="has no stored val set"):
        choose_precision(reg, "old@1", "int8")
    assert choose_precision(reg, "old@1", "auto") == ("fp32", None)


@pytest.mark.slow
def test_the_server_runs_each_precision_with_its_own_threshold(registry):
    """A real server per precision: /v1/models says the precision and its val-selected threshold, answers stay
    close to fp32's and label by that threshold; a stale refusal in the registry stops the version loading."""
    from lepton.precision import PrecisionError, check_precision
    from lepton.serve import ServeConfig
    from lepton.serve.adapters import make_adapter

    refused = {**check_precision(registry, "cxr@1", "bf16"), "val_auc": 0.5, "accepted": False}
    registry.set_precision("cxr@1", "bf16", refused)
    with pytest.raises(PrecisionError, match="val AUC 0.5000 against fp32"):
        make_adapter(registry, "cxr@1", "auto", "bf16")
    accepted = {p: check_precision(registry, "cxr@1", p)["accepted"] for p in ("bf16", "int8")}  # real figures
    body = png_bytes(3)
    answers = {}
    for precision in ("fp32", "bf16", "int8", "auto"):
        if not accepted.get(precision, True):  # refused on this CPU's figures: the version is not loaded in it
            with pytest.raises(PrecisionError, match=f"cxr@1 in {precision}: val AUC"):
                make_adapter(registry, "cxr@1", "auto", precision)
            continue
        config = ServeConfig(models=["cxr"], registry=str(registry.store.root.parent), auth=False, rate_limit=0,
                             precision=precision)
        with running(config) as base:
            info = httpx.get(f"{base}/v1/models/cxr").json()
            if precision != "auto":
                assert info["precision"] == precision
            record = registry.get("cxr@1").metrics["precisions"].get(info["precision"])
            threshold = record["threshold"] if record else registry.get("cxr@1").threshold  # fp32: the run's
            assert info["threshold"] == threshold
            r = httpx.post(f"{base}/v1/models/cxr/predict", content=body, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            answer = r.json()
            p1 = list(answer["probabilities"].values())[1]
            assert answer["label"] == info["labels"][int(p1 >= threshold)]
            answers[precision] = np.array(list(answer["probabilities"].values()))
    for p in answers.keys() - {"fp32", "auto"}:
        assert 0 < np.abs(answers[p] - answers["fp32"]).max() < 0.1


@pytest.mark.slow
def test_cli_registers_with_precisions_and_checks_them_again(tiny_run, tmp_path):
    import subprocess

    from conftest import lepton_cmd

    reg = str(tmp_path / "reg")
    out = subprocess.run(lepton_cmd("models", "register", str(tiny_run.path), "--name", "cxr", "--registry", reg,
                                    "--precision", "int8"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cxr@1 int8: val AUC" in out.stdout and "accepted" in out.stdout
    out = subprocess.run(lepton_cmd("models", "precision", "cxr@1", "--precision", "bf16", "--registry", reg),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    from lepton.registry import Registry

    assert set(Registry.open(reg).get("cxr@1").metrics["precisions"]) == {"int8", "bf16"}
    bad = subprocess.run(lepton_cmd("models", "precision", "cxr@1", "--precision", "fp8", "--registry", reg),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "fp8" in bad.stderr and "fp32, bf16, int8" in bad.stderr


# -- segmentation: the same check on mean foreground Dice ----------------------------------------------------------
@pytest.fixture(scope="module")
def seg_registry(seg_run, tmp_path_factory):
    from lepton.registry import Registry

    run, _ = seg_run
    root = tmp_path_factory.mktemp("seg-precision")
    shutil.copytree(run.path, root / "run")
    reg = Registry.open(root / "reg")
    reg.register_run(root / "run", "seg")
    return reg


def test_a_segmentation_run_keeps_a_bounded_val_set(seg_run):
    """Training stores the val cases (flat, with their shapes) and calibration windows of the network's size."""
    from lepton.tasks.segmentation import PRECISION_CASES, PRECISION_VOXELS

    run, _ = seg_run
    with np.load(run.path / "val_set.npz") as z:
        shapes = z["x_shapes"]
        assert 0 < len(shapes) <= min(PRECISION_CASES, run.info["val_images"])
        assert len(z["x_val"]) == int(np.prod(shapes, axis=1).sum()) <= PRECISION_VOXELS
        assert len(z["y_val"]) == int(np.prod(shapes[:, 1:], axis=1).sum()) and z["y_val"].dtype == np.uint8
        assert set(np.unique(z["y_val"])) <= set(range(len(run.label_names))) and z["y_val"].any()
        spec = run.preprocessing
        assert z["x_calib"].shape[1:] == (spec.channels, *spec.size) and len(z["x_calib"]) > 0


@pytest.mark.slow
def test_segmentation_precisions_are_checked_on_val_dice(seg_registry, seg_run, monkeypatch):
    """bf16 and int8 get Dice records (fp32's Dice on the stored cases is the run's val Dice) and, once accepted, the
    served windows run in them; a tolerance no precision can meet refuses bf16, naming both Dice values."""
    import lepton.precision as lp
    from lepton.serve.adapters import make_adapter
    from lepton.tasks.segmentation import Segmentation

    run, _ = seg_run
    r = lp.check_precision(seg_registry, "seg@1", "bf16")
    assert r["metric"] == "val_dice" and r["max_dice_drop"] == Segmentation.precision_tolerance
    assert abs(r["fp32_val_dice"] - run.info["val_dice"]) < 1e-3  # the same cases, windows as served
    assert r["accepted"] == (r["fp32_val_dice"] - r["val_dice"] <= Segmentation.precision_tolerance)
    assert r["threshold"] is None and 0 < r["max_prob_diff"] < 0.2 and r["images_per_s"] > 0
    assert seg_registry.get("seg@1").metrics["precisions"]["bf16"]["val_dice"] == r["val_dice"]
    q = lp.check_precision(seg_registry, "seg@1", "int8")  # the U-Net's graph at its window size, quantized
    assert q["metric"] == "val_dice" and q["accepted"] == (q["fp32_val_dice"] - q["val_dice"] <= 0.01)
    assert "onnx_int8" in seg_registry.get("seg@1").artifacts and 0 < q["max_prob_diff"] < 0.2
    # served windows run in each accepted precision: close to fp32, not identical
    windows = np.random.default_rng(0).random((2, 1, *run.preprocessing.size), dtype=np.float32)
    outs = {}
    for p in ("fp32", *(p for p, rec in (("bf16", r), ("int8", q)) if rec["accepted"])):
        adapter = make_adapter(seg_registry, "seg@1", "auto", p)
        adapter.setup()
        assert adapter.precision == p
        outs[p] = adapter.predict_windows(windows)
    for p in outs.keys() - {"fp32"}:
        assert 0 < np.abs(outs[p] - outs["fp32"]).max() < 0.1, p
    monkeypatch.setattr(Segmentation, "precision_tolerance", -1.0)
    assert lp.check_precision(seg_registry, "seg@1", "bf16")["accepted"] is False
    with pytest.raises(lp.PrecisionError, match=r"seg@1 in bf16: val Dice 0\.\d{4} against fp32 0\.\d{4}"):
        lp.choose_precision(seg_registry, "seg@1", "bf16")
