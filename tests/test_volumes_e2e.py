"""A DICOM series and a NIfTI volume through the whole path: data -> train -> evaluate -> explain -> export ->
register -> serve (native uploads: NIfTI, a zip of a DICOM series, NPY; OIP v2 tensors [N, C, D, H, W])."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import auth, running

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    from lepton.data.tools.synthetic import write_ct_cases

    return write_ct_cases(tmp_path_factory.mktemp("ct"), n=48, seed=0)


@pytest.fixture(scope="module")
def volume_run(cases, tmp_path_factory):
    from lepton.train import train

    # 1.5 mm in-plane voxels (from 1 mm) and a centre crop: steps saved with the run, applied by predict and serve
    return train(cases, preset="default", slices="volume", window="-300,1400", model="lepton_cnn", epochs=8,
                 batch_size=8, lr=2e-3, augment="light", output_dir=str(tmp_path_factory.mktemp("runs")),
                 name="ct3d", quiet=True, preprocess=[{"name": "spacing", "mm": [1.5, 1.5, 2.0]},
                                                      {"name": "crop_or_pad", "size": [16, 20, 20]}])


def series_zip(folder: Path, members: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"series/{f.name}")
        for name, data in (members or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_manifest_of_series_and_nifti_files_loads_as_volumes(cases):
    from lepton.data import load_dataset

    data = load_dataset(cases, slices="volume", window="-300,1400")
    assert len(data) == 48 and data.spatial_dims == 3 and data.has_patient_ids
    assert {np.shape(im) for im in data.images} == {(1, 16, 32, 32)}  # series and NIfTI land on one grid
    assert {m for m in data.modalities} == {"CT", "nifti"}


def test_train_evaluate_explain(volume_run, cases, tmp_path):
    from lepton.data.readers.series import read_series
    from lepton.data.readers.volume import network_affine
    from lepton.evaluate import evaluate
    from lepton.explain import explain

    assert volume_run.preprocessing.size == (16, 20, 20) and volume_run.info["val_auc"] >= 0.8
    assert [s["name"] for s in volume_run.preprocessing.steps] == ["spacing", "crop_or_pad"]
    report = evaluate(volume_run, split="test", n_bootstrap=100)
    assert report["images"] == 6 and report["metrics"]["val_youden"]["auc"] >= 0.8  # 3 cases per class
    series = cases.parent / "case000"
    (row,) = explain(volume_run, [series], output=tmp_path)
    import nibabel as nib

    heat = nib.load(row["nifti"])
    (volume,) = read_series(series)
    assert heat.shape == (16, 20, 20)  # the preprocessed input's grid, placed in the scan's millimetres
    source = network_affine(volume.affine, volume.shape)
    np.testing.assert_allclose(heat.affine[:3, :3], source[:3, :3] * [2.0 / 2.0, 1.5, 1.5], atol=1e-4)
    centre = lambda aff, shape: (aff @ [*(np.array(shape) - 1) / 2, 1])[:3]  # noqa: E731
    np.testing.assert_allclose(centre(heat.affine, heat.shape), centre(source, (16, 32, 32)), atol=1.6)
    assert heat.get_fdata().min() >= 0 and heat.get_fdata().max() <= 1.0 + 1e-6
    assert Path(row["overlay"]).read_bytes().startswith(b"\x89PNG")


def test_export_register_and_serve(volume_run, cases, tmp_path):
    from lepton.export import export_run
    from lepton.registry import Registry
    from lepton.serve import ServeConfig

    report = export_run(volume_run, output=tmp_path / "export", repeats=2)
    onnx = next(r for r in report["variants"] if r["variant"] == "onnx-fp32")
    assert onnx["max_abs_prob_diff"] < 1e-4
    reg = Registry.open(tmp_path / "reg")
    reg.register_run(volume_run.path, "ct", onnx=True)
    key = reg.create_key("clinic")
    root = cases.parent
    nifti = (root / "case001.nii.gz").read_bytes()
    expected = {"case001.nii.gz": volume_run.predict([root / "case001.nii.gz"])[0],
                "case000": volume_run.predict([root / "case000"])[0]}
    for backend in ("auto", "onnx"):
        config = ServeConfig(models=["ct"], registry=str(tmp_path / "reg"), rate_limit=0, backend=backend)
        with running(config) as url:
            r = httpx.post(f"{url}/v1/models/ct/predict", content=nifti, timeout=60,
                           headers={**auth(key), "x-filename": "a.nii.gz"})
            bare = httpx.post(f"{url}/v1/models/ct/predict", content=nifti, timeout=60, headers=auth(key))
            for response in (r, bare):  # `curl --data-binary @a.nii.gz` sends no name: the content says NIfTI
                assert response.status_code == 200, response.text
                assert response.json()["label"] == expected["case001.nii.gz"]["label"]
                np.testing.assert_allclose(list(response.json()["probabilities"].values()),
                                           list(expected["case001.nii.gz"]["probabilities"].values()), atol=1e-4)
            z = httpx.post(f"{url}/v1/models/ct/predict", files={"file": ("s.zip", series_zip(root / "case000"))},
                           headers=auth(key), timeout=60)
            assert z.status_code == 200 and z.json()["label"] == expected["case000"]["label"], z.text
            meta = httpx.get(f"{url}/v2/models/ct", headers=auth(key)).json()
            assert meta["inputs"][0]["shape"] == [-1, 1, 16, 20, 20]
            x = np.full((1, 1, 16, 20, 20), 0.5, np.float32)
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 16, 20, 20],
                                "data": x.ravel().tolist()}]}
            out = httpx.post(f"{url}/v2/models/ct/infer", json=body, headers=auth(key), timeout=60)
            assert out.status_code == 200 and out.json()["outputs"][0]["shape"] == [1, 2], out.text
            buf = io.BytesIO()
            np.save(buf, np.zeros((16, 32, 32), np.float32))
            npy = httpx.post(f"{url}/v1/models/ct/predict", content=buf.getvalue(), headers=auth(key))
            # a bare array has no millimetres for the run's spacing step: a clear 422, not a guess
            assert npy.status_code == 422 and "no voxel geometry" in npy.json()["error"]["message"], npy.text
            flat = io.BytesIO()
            from PIL import Image

            Image.new("L", (32, 32)).save(flat, format="PNG")
            refused = httpx.post(f"{url}/v1/models/ct/predict", content=flat.getvalue(), headers=auth(key))
            assert refused.status_code == 422 and "not a volume" in refused.json()["error"]["message"]
            for name, members in (("traversal", {"../../etc/evil.dcm": b"x"}), ("absolute", {"/tmp/evil.dcm": b"x"})):
                bad = httpx.post(f"{url}/v1/models/ct/predict", headers=auth(key),
                                 files={"file": ("s.zip", series_zip(root / "case000", members))})
                assert bad.status_code == 422 and "refused member" in bad.json()["error"]["message"], name
            bomb = io.BytesIO()
            with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.writestr("a.dcm", b"\0" * (300 << 20))
            boom = httpx.post(f"{url}/v1/models/ct/predict", content=bomb.getvalue(), headers=auth(key), timeout=60)
            assert boom.status_code == 422 and "zip bomb" in boom.json()["error"]["message"]


def test_volume_demo(tmp_path):
    import json
    import subprocess

    from conftest import lepton_cmd

    out = subprocess.run(lepton_cmd("demo", "--volumes", "--quick", "--output-dir", str(tmp_path)),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[:out.stdout.rindex("}") + 1])
    assert result["test_auc"] >= 0.8 and len(result["predictions"]) == 2
    assert Path(result["explanation"]["nifti"]).is_file() and Path(result["report"]).is_file()


def test_robustness_report_on_volumes(volume_run, tmp_path):
    from lepton.robustness import robustness

    report = robustness(volume_run, split="val", corruptions=("gaussian_noise", "gaussian_blur", "contrast"),
                        severities=(1, 5), epsilons=(2 / 255,), attacks=("fgsm",), output=tmp_path)
    assert set(report["clean"]) == {"acc", "auc"} and len(report["corruptions"]["gaussian_blur"]) == 2
    assert (tmp_path / "robustness.md").is_file() and (tmp_path / "robustness.png").is_file()
