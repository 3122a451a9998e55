"""Segmentation end to end, 2-D and 3-D: data -> train -> evaluate -> predict (label maps, DICOM SEG) -> export ->
register -> serve (native uploads and OIP v2 with tritonclient), on data this test makes."""

from __future__ import annotations

import base64
import gzip
import io
import json
import subprocess
import zipfile
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import auth, lepton_cmd, running

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    import lepton
    from lepton.data.tools.synthetic import write_segmentation_cases

    root = write_segmentation_cases(tmp_path_factory.mktemp("seg2d") / "cases", n=60, dims=2, seed=0)
    run = lepton.train(root, task="segmentation", epochs=20, batch_size=8, time_budget_s=0, quiet=True,
                       output_dir=str(tmp_path_factory.mktemp("runs")), name="seg2d")
    return run, root


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    import lepton
    from lepton.data.tools.synthetic import write_segmentation_cases

    root = write_segmentation_cases(tmp_path_factory.mktemp("seg3d") / "cases", n=40, dims=3, seed=1)
    # a spacing step: predictions are made on 1.5 mm voxels and returned on each input's own grid
    run = lepton.train(root, task="segmentation", epochs=30, batch_size=4, time_budget_s=0, quiet=True,
                       window="-1000,1400", preprocess=[{"name": "spacing", "mm": [1.5, 1.5, 2.0]}],
                       output_dir=str(tmp_path_factory.mktemp("runs")), name="seg3d")
    return run, root


def test_2d_training_evaluation_and_prediction(flat_run, tmp_path):
    import lepton

    run, root = flat_run
    assert run.task.name == "segmentation" and run.config.model == "unet" and run.preprocessing.fit == "pad"
    assert run.info["val_dice"] > 0.6
    report = lepton.evaluate(run, split="test", n_bootstrap=200)
    opacity = report["per_class"]["opacity"]
    assert report["images"] == 9 and opacity["dice"] > 0.6 and opacity["dice_ci95"][0] <= opacity["dice"]
    assert len(report["cases"]) == 9 and {"opacity/dice", "opacity/hd95"} <= set(report["cases"][0])
    assert report["detection"]["true_lesions"] > 0 and 0 <= report["ece"] <= 1
    assert all(Path(p).is_file() for p in report["plots"])  # best/median/worst montage, reliability, FROC
    (row,) = run.predict([root / "images" / "case000.png"], output=tmp_path)
    label_map = np.asarray(Image.open(row["label_map"]))
    assert label_map.shape == (64, 64) and set(np.unique(label_map)) <= {0, 1}
    assert row["voxels"]["opacity"] == int(label_map.sum()) and row["lesions"][0]["class"] == "opacity"
    truth = np.asarray(Image.open(root / "masks" / "case000.png")) > 0
    assert 2 * (truth & (label_map > 0)).sum() / (truth.sum() + label_map.sum()) > 0.6
    from lepton.robustness import robustness

    stress = robustness(run, split="test", corruptions=("gaussian_noise",), severities=(1, 5), epsilons=(8 / 255,),
                        attacks=("fgsm",), output=tmp_path / "robust")
    assert set(stress["clean"]) == {"dice"} and stress["clean"]["dice"] > 0.6
    assert [r["severity"] for r in stress["corruptions"]["gaussian_noise"]] == [1, 5]
    assert all(0 <= r["dice"] <= 1 for r in stress["corruptions"]["gaussian_noise"])
    assert stress["adversarial"]["fgsm"][0]["dice"] < stress["clean"]["dice"]


def test_a_classifier_network_is_refused_for_segmentation(flat_run, tmp_path):
    import lepton
    from lepton.errors import ConfigError

    _, root = flat_run
    with pytest.raises(ConfigError, match="lepton_cnn is an image → vector network.*unet"):
        lepton.train(root, task="segmentation", model="lepton_cnn", epochs=1, quiet=True, output_dir=str(tmp_path))


def test_3d_run_predicts_series_and_nifti_on_their_own_grid(volume_run, tmp_path):
    import lepton
    from lepton.data.readers.dicomseg import read_seg
    from lepton.data.readers.series import read_series
    from lepton.data.readers.volume import network_affine, network_order
    from lepton.data.tools.synthetic import nodule_phantom, write_dicom_series

    run, _ = volume_run
    assert run.preprocessing.steps and run.info["val_dice"] > 0.5
    report = lepton.evaluate(run, split="test", n_bootstrap=100)
    assert report["per_class"]["nodule"]["dice"] > 0.5 and report["detection"]["sensitivity"] > 0.5
    hu, truth = nodule_phantom(np.random.default_rng(77), (16, 32, 32), count=2)
    write_dicom_series(tmp_path / "series", hu, spacing=(1.0, 1.0, 2.0), origin=(-20, 10, 40))
    (row,) = run.predict([tmp_path / "series"], output=tmp_path / "out", dicom_seg=True)
    (volume,) = read_series(tmp_path / "series")
    written = nib.load(row["label_map"])
    assert written.shape == (16, 32, 32)  # the series' own grid, although the network saw 1.5 mm voxels
    np.testing.assert_allclose(written.affine, network_affine(volume.affine, volume.shape), atol=1e-4)
    true_net = network_order(truth.transpose(2, 1, 0)[::-1, ::-1, :])
    pred = np.asarray(written.dataobj)
    # the map lies on the truth's grid: one unseen phantom's Dice (the model's quality is the test split's, above);
    # a map shifted or flipped by a voxel-order mistake overlaps 5 mm nodules hardly at all
    assert 2 * ((pred > 0) & (true_net > 0)).sum() / ((pred > 0).sum() + (true_net > 0).sum()) > 0.3
    seg, _ = read_seg(row["dicom_seg"])
    np.testing.assert_array_equal(seg[0], pred)  # the DICOM SEG says what the NIfTI says
    assert row["volume_ml"]["nodule"] == pytest.approx(pred.sum() * 2.0 / 1000, abs=1e-3)
    centroids = [les["centroid_mm"] for les in row["lesions"]]
    assert all(len(c) == 3 for c in centroids) and row["lesions"][0]["max_probability"] > 0.5


def test_export_register_and_serve_both_kinds(flat_run, volume_run, tmp_path):
    import tritonclient.http as triton

    from lepton.export import export_run
    from lepton.registry import Registry
    from lepton.serve import ServeConfig

    run2, root2 = flat_run
    run3, root3 = volume_run
    report = export_run(run3, output=tmp_path / "export", repeats=1)
    onnx = next(r for r in report["variants"] if r["variant"] == "onnx-fp32")
    assert onnx["max_abs_prob_diff"] < 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"))
    other = session.run(None, {"input": np.zeros((1, 1, 32, 48, 32), np.float32)})[0]  # another size: dynamic axes
    assert other.shape == (1, 2, 32, 48, 32)
    reg = Registry.open(tmp_path / "reg")
    reg.register_run(run2.path, "opacity", onnx=True)
    reg.register_run(run3.path, "nodules", onnx=True)
    key = reg.create_key("clinic")
    png = (root2 / "images" / "case001.png").read_bytes()
    nifti = (root3 / "imagesTr" / "case001.nii.gz").read_bytes()
    expected2 = run2.predict([root2 / "images" / "case001.png"])[0]
    expected3 = run3.predict([root3 / "imagesTr" / "case001.nii.gz"])[0]
    for backend in ("auto", "onnx"):
        config = ServeConfig(models=["opacity", "nodules"], registry=str(tmp_path / "reg"), rate_limit=0,
                             backend=backend)
        with running(config) as url:
            r = httpx.post(f"{url}/v1/models/opacity/predict", content=png, headers=auth(key), timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["label_map"]["data"]))))
            assert body["label_map"]["format"] == "png" and mask.shape == (64, 64)
            assert abs(body["voxels"]["opacity"] - expected2["voxels"]["opacity"]) <= 2
            r = httpx.post(f"{url}/v1/models/nodules/predict", content=nifti, timeout=60,
                           headers={**auth(key), "x-filename": "case.nii.gz"})
            assert r.status_code == 200, r.text
            body = r.json()
            label_map = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(body["label_map"]["data"])))
            assert label_map.shape == (16, 32, 32) and body["lesions"] is not None
            assert abs(body["volume_ml"]["nodule"] - expected3["volume_ml"]["nodule"]) < 0.01
            refused = httpx.post(f"{url}/v1/models/nodules/predict?explain=gradcam", content=nifti, timeout=60,
                                 headers={**auth(key), "x-filename": "case.nii.gz"})
            assert refused.status_code == 422 and "explain is for classifiers" in refused.text
            series = tmp_path / f"series-{backend}"
            from lepton.data.tools.synthetic import nodule_phantom, write_dicom_series

            write_dicom_series(series, nodule_phantom(np.random.default_rng(5), (16, 32, 32), count=1)[0],
                               spacing=(1.0, 1.0, 2.0))
            z = httpx.post(f"{url}/v1/models/nodules/predict?dicom_seg=true", headers=auth(key), timeout=60,
                           files={"file": ("s.zip", series_zip(series))})
            assert z.status_code == 200, z.text
            (tmp_path / "seg.dcm").write_bytes(base64.b64decode(z.json()["dicom_seg"]["data"]))
            from lepton.data.readers.dicomseg import read_seg

            seg, _ = read_seg(tmp_path / "seg.dcm")
            sent = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(z.json()["label_map"]["data"])))
            np.testing.assert_array_equal(seg[0], np.asarray(sent.dataobj))  # the SEG says what the NIfTI says
            no_series = httpx.post(f"{url}/v1/models/nodules/predict?dicom_seg=true", content=nifti, timeout=60,
                                   headers={**auth(key), "x-filename": "case.nii.gz"})
            assert no_series.status_code == 422 and "upload the series as a zip" in no_series.text
            flat = httpx.post(f"{url}/v1/models/nodules/predict", content=png, headers=auth(key), timeout=60)
            assert flat.status_code == 422  # an image sent to a volume model
            meta = httpx.get(f"{url}/v2/models/opacity", headers=auth(key)).json()
            assert meta["outputs"][1] == {"name": "label_map", "datatype": "UINT8", "shape": [-1, 64, 64]}
            client = triton.InferenceServerClient(url.removeprefix("http://"))
            inp = triton.InferInput("input", [1, 1, 64, 64], "FP32")
            inp.set_data_from_numpy(np.asarray(Image.open(io.BytesIO(png)), np.float32)[None, None] / 255)
            result = client.infer("opacity", [inp], headers=auth(key))
            assert result.as_numpy("probabilities").shape == (1, 2, 64, 64)
            assert result.as_numpy("label_map").dtype == np.uint8
            client.close()


def series_zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"s/{f.name}")
    return buf.getvalue()


def test_cli_train_predict_and_demo(flat_run, tmp_path):
    _, root = flat_run
    out = subprocess.run(lepton_cmd("train", str(root), "--task", "segmentation", "--epochs", "2", "--name", "cli",
                                    "--output-dir", str(tmp_path), "--quiet", "--time-budget", "0"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    pred = subprocess.run(lepton_cmd("predict", str(tmp_path / "cli"), str(root / "images" / "case002.png"),
                                     "--output", str(tmp_path / "maps")), capture_output=True, text=True, timeout=300)
    assert pred.returncode == 0, pred.stderr[-2000:]
    row = json.loads(pred.stdout.splitlines()[0])
    assert Path(row["label_map"]).is_file() and "lesions" in row
    demo = subprocess.run(lepton_cmd("demo", "--task", "segmentation", "--quick", "--output-dir", str(tmp_path / "d")),
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    result = json.loads(demo.stdout[:demo.stdout.rindex("}") + 1])
    new = result["new_case"]
    assert new["dicom_seg_matches_nifti"] and Path(new["prediction"]["dicom_seg"]).is_file()
    assert result["test_dice"] > 0.3


def test_patches_and_kill_and_resume_match_an_uninterrupted_run(flat_run, tmp_path):
    """Patches of 32 px from 64 px cases (a third centred on foreground), SIGKILL mid-run, resume: the history
    matches a run that was never interrupted."""
    from conftest import kill_after_epochs, resume_and_rerun

    _, root = flat_run
    args = ["train", str(root), "--task", "segmentation", "--image-size", "32", "--epochs", "5", "--batch-size", "8",
            "--time-budget", "0", "--output-dir", str(tmp_path), "--seed", "3", "--quiet"]
    kill_after_epochs(lepton_cmd(*args, "--name", "killed"), tmp_path / "killed")
    killed_rows, clean_rows = resume_and_rerun(args, tmp_path)
    assert [int(r["epoch"]) for r in killed_rows] == [1, 2, 3, 4, 5]
    for a, b in zip(killed_rows, clean_rows, strict=True):
        for key in ("train_loss", "val_loss", "val_dice"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-3), (a["epoch"], key)
    spec = json.loads((tmp_path / "clean" / "preprocessing.json").read_text())
    assert spec["size"] == [32, 32] and spec["fit"] == "pad"
