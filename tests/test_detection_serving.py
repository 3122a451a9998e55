"""Serving a 3-D box detector as ``lepton predict`` answers: OIP v2 infers a volume on its own grid (sliding windows at
the scale of training, not resized), and a version served with ONNX Runtime answers through the run's own anchors,
window stitching and NMS around the exported head maps."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from conftest import auth, running

AXES = ("z0", "y0", "x0", "z1", "y1", "x1")


@pytest.fixture(scope="module")
def volume_model(tmp_path_factory):
    """A one-epoch 3-D detector registered (with its ONNX graph) to answer its ten best boxes on a volume twice the
    training size in-plane, that volume and the offline answer for it."""
    import nibabel as nib

    from lepton.data.tools.synthetic import nodule_phantom, write_detection_cases
    from lepton.registry import Registry
    from lepton.train import train

    root = tmp_path_factory.mktemp("det3d_serving")
    csv_path = write_detection_cases(root / "vol", 8, dims=3, seed=2)
    run = train(csv_path, name="nodules", output_dir=str(root / "runs"), epochs=1, batch_size=4, time_budget_s=0,
                quiet=True, seed=0, tta=False)
    hu, _ = nodule_phantom(np.random.default_rng(4), (16, 64, 64), count=3)
    big = root / "big.nii.gz"
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).copy(), np.diag([-0.5, -0.5, 2.0, 1.0])), big)
    run.info["threshold"] = 0.0
    (every,) = run.predict([big])
    scores = [b["score"] for b in every["boxes"]]
    assert len(scores) > 10
    run.info["threshold"] = (scores[9] + scores[10]) / 2  # ten boxes, the threshold well away from any score
    (run.path / "run.json").write_text(json.dumps(run.info))
    (offline,) = run.predict([big])
    assert offline["count"] == 10 and offline["windows"] > 1  # slid over at the training scale, not shrunk
    reg = Registry.open(root / "reg")
    reg.register_run(run.path, "nodules", onnx=True)
    return {"run": run, "registry": str(root / "reg"), "key": reg.create_key("clinic"), "big": big,
            "offline": offline}


def _boxes(answer, key="box", axes=AXES) -> np.ndarray:
    return np.array([[b[key][a] for a in axes] for b in answer["boxes"]])


@pytest.mark.slow
def test_oip_infers_a_volume_on_its_own_grid_as_offline(volume_model):
    from lepton.data.readers.io import read_image
    from lepton.serve import ServeConfig

    run, offline, key = volume_model["run"], volume_model["offline"], volume_model["key"]
    pixels = read_image(volume_model["big"], window=run.preprocessing.window, slices="volume")[0].pixels
    with running(ServeConfig(models=["nodules"], registry=volume_model["registry"], rate_limit=0)) as url:
        meta = httpx.get(f"{url}/v2/models/nodules", headers=auth(key)).json()
        assert meta["inputs"][0]["shape"] == [-1, 1, -1, -1, -1]  # any volume, answered on its own grid
        assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [("boxes", [-1, 100, -1]), ("scores", [-1, 100]),
                                                                      ("labels", [-1, 100])]
        body = {"inputs": [{"name": "input", "shape": [1, *pixels.shape], "datatype": "FP32",
                            "data": pixels.ravel().tolist()}]}
        r = httpx.post(f"{url}/v2/models/nodules/infer", json=body, headers=auth(key), timeout=120)
        assert r.status_code == 200, r.text
        out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
        wrong = {"inputs": [{**body["inputs"][0], "shape": [1, 2, 16, 64, 32]}]}  # two channels for a one-channel model
        r = httpx.post(f"{url}/v2/models/nodules/infer", json=wrong, headers=auth(key), timeout=60)
        assert r.status_code == 400 and "[N, 1, any, any, any]" in r.text, r.text
    assert out["boxes"].shape == (1, 100, 6)
    kept = out["labels"][0] >= 0
    assert int(kept.sum()) == offline["count"]  # the rows past the answer's boxes are padding
    # the offline answer's boxes, scores and classes, to its rounding: fractions of the volume's axes, voxels
    boxes = out["boxes"][0][kept]
    np.testing.assert_array_equal(np.round(boxes, 5), _boxes(offline))
    np.testing.assert_array_equal(np.round(boxes * np.tile(pixels.shape[1:], 2), 3), _boxes(offline, "voxels"))
    assert np.round(out["scores"][0][kept], 5).tolist() == [b["score"] for b in offline["boxes"]]
    assert [run.label_names[c] for c in out["labels"][0][kept]] == [b["label"] for b in offline["boxes"]]


@pytest.mark.slow
def test_onnx_runtime_answers_a_volume_through_the_runs_decoding(volume_model):
    from lepton.serve import ServeConfig

    offline, key = volume_model["offline"], volume_model["key"]
    upload = {"file": ("big.nii.gz", volume_model["big"].read_bytes())}
    config = ServeConfig(models=["nodules"], registry=volume_model["registry"], rate_limit=0, backend="onnx")
    with running(config) as url:
        r = httpx.post(f"{url}/v1/models/nodules/predict", files=upload, headers=auth(key), timeout=120)
        assert r.status_code == 200, r.text
        served = r.json()
        explained = httpx.post(f"{url}/v1/models/nodules/predict?explain=gradcam", files=upload, headers=auth(key),
                               timeout=60)
        assert explained.status_code == 422 and "PyTorch backend" in explained.text
        meta = httpx.get(f"{url}/v2/models/nodules", headers=auth(key)).json()
    assert meta["platform"] == "onnxruntime_onnx" and meta["inputs"][0]["shape"] == [-1, 1, -1, -1, -1]
    assert "resized_to" not in served and served["windows"] == offline["windows"]
    assert [b["label"] for b in served["boxes"]] == [b["label"] for b in offline["boxes"]]
    # ONNX Runtime's fp32 convolutions sum in another order than PyTorch's: head maps within ~1e-5, decoded boxes
    # within ~1e-6 of an axis; the answers round to 1e-5 (fractions, scores) and 1e-3 (voxels, mm)
    np.testing.assert_allclose(_boxes(served), _boxes(offline), atol=1e-4)
    np.testing.assert_allclose(_boxes(served, "voxels"), _boxes(offline, "voxels"), atol=1e-2)
    world = ("x0", "y0", "z0", "x1", "y1", "z1")
    np.testing.assert_allclose(_boxes(served, "world", world), _boxes(offline, "world", world), atol=2e-2)
    np.testing.assert_allclose([b["score"] for b in served["boxes"]], [b["score"] for b in offline["boxes"]],
                               atol=1e-4)
