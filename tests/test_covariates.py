"""Clinical covariates on the plain classification task: a 2-D image manifest whose extra columns are declared as
covariates trains a classifier that fuses them (late or FiLM), predicts with them, and is served with them — native
predict and OIP v2 named inputs answering as offline inference does; declarations and values are checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lepton.errors import ConfigError, DataError

COVARIATES = "age:numeric:years,sex:categorical"


def write_manifest(root: Path, n: int = 32, seed: int = 0) -> Path:
    """``n`` noisy 16 px PNGs whose class ("old"/"young") shows only in the age column: the image is noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    lines = ["path,label,patient_id,age,sex"]
    for i in range(n):
        age = int(rng.integers(20, 90))
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{'old' if age >= 55 else 'young'},p{i},{age},{'F' if i % 2 else 'M'}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    """lepton_cnn_tiny with late-fused age and sex, trained through the CLI (the layout picks classification)."""
    from typer.testing import CliRunner

    from lepton.cli import app
    from lepton.runs import load_run

    root = tmp_path_factory.mktemp("fused")
    manifest = write_manifest(root / "data")
    result = CliRunner().invoke(app, [
        "train", str(manifest), "--model", "lepton_cnn_tiny", "--epochs", "4", "--batch-size", "8",
        "--image-size", "16", "--output-dir", str(root / "runs"), "--name", "fused", "--precision", "fp32",
        "--covariates", COVARIATES, "--augment", "none", "--lr", "0.01"])
    assert result.exit_code == 0, result.output
    return load_run(root / "runs" / "fused"), manifest


@pytest.mark.slow
def test_classifier_fuses_covariates_and_predicts_with_them(fused_run):
    from lepton.models.fusion import ImageCovariateNet

    run, manifest = fused_run
    assert run.config.task == "classification" and isinstance(run.model, ImageCovariateNet)
    assert [c["name"] for c in run.preprocessing.options["covariates"]["columns"]] == ["age", "sex"]
    image = manifest.parent / "img" / "0.png"
    old = run.predict([image], covariates=[{"age": 88, "sex": "F"}])[0]
    young = run.predict([image], covariates=[{"age": 21, "sex": "F"}])[0]
    # the image is noise: only the covariates can tell the classes apart, and they do
    assert old["probabilities"]["old"] > young["probabilities"]["old"]
    with pytest.raises(DataError, match="unknown covariate.*bmi"):
        run.predict([image], covariates=[{"age": 30, "sex": "F", "bmi": 22}])
    with pytest.raises(DataError, match="age is missing"):
        run.predict([image], covariates=[{"sex": "F"}])
    from lepton.explain import explain

    with pytest.raises(ConfigError, match="fuses clinical covariates"):
        explain(run, [image], output=manifest.parent / "maps")


@pytest.mark.slow
def test_served_classifier_with_covariates_equals_offline(fused_run, tmp_path):
    import httpx

    from conftest import running
    from lepton.registry import Registry
    from lepton.serve import ServeConfig

    run, manifest = fused_run
    reg = Registry.open(tmp_path / "reg")
    reg.register_run(run.path, "cxr")
    key = reg.create_key("clinic")
    image = manifest.parent / "img" / "3.png"
    covariates = {"age": 71, "sex": "M"}
    offline = run.predict([image], covariates=[covariates])[0]["probabilities"]
    pixels = run.task.read(image, run.preprocessing)[0][1]
    with running(ServeConfig(models=["cxr"], registry=str(tmp_path / "reg"), rate_limit=0)) as base, \
            httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        assert [c["name"] for c in client.get("/v1/models/cxr").json()["covariates"]] == ["age", "sex"]
        answer = client.post("/v1/models/cxr/predict", files={"file": ("x.png", image.read_bytes())},
                             data={"covariates": json.dumps(covariates)})
        assert answer.status_code == 200, answer.text
        assert answer.json()["probabilities"]["old"] == pytest.approx(offline["old"], abs=1e-4)
        missing = client.post("/v1/models/cxr/predict", files={"file": ("x.png", image.read_bytes())})
        assert missing.status_code == 422 and "age is missing" in missing.text
        assert [i["name"] for i in client.get("/v2/models/cxr").json()["inputs"]] == ["input", "age", "sex"]
        infer = client.post("/v2/models/cxr/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, *pixels.shape], "data": pixels.ravel().tolist()},
            {"name": "age", "datatype": "FP32", "shape": [1, 1], "data": [71.0]},
            {"name": "sex", "datatype": "BYTES", "shape": [1, 1], "data": ["M"]}]})
        assert infer.status_code == 200, infer.text
        probs = {o["name"]: o for o in infer.json()["outputs"]}["probabilities"]["data"]
        assert probs[0] == pytest.approx(offline["old"], abs=1e-4)


def test_covariate_declarations_are_checked_for_classification(tmp_path):
    from lepton.models import create_model, head_parameters
    from lepton.tasks import get_task

    manifest = write_manifest(tmp_path, n=6)
    task = get_task("classification", {"covariates": "weight:numeric:kg"})
    with pytest.raises(DataError, match="covariate column.*weight.*not in the manifest.*age, sex"):
        task.load(manifest, window=None, slices="middle", steps=None, skip_bad=False)
    data = get_task("classification", {"covariates": COVARIATES}).load(
        manifest, window=None, slices="middle", steps=None, skip_bad=False)
    assert len(data.covariates) == 6 and data.subset(np.arange(6) < 2).covariates == data.covariates[:2]
    with pytest.raises(DataError, match="covariates .* are read from a CSV manifest"):
        get_task("classification", {"covariates": COVARIATES}).load(
            tmp_path / "img", window=None, slices="middle", steps=None, skip_bad=False)
    with pytest.raises(ConfigError, match="unknown key.*fps.*classification"):
        get_task("classification", {"fps": 8}).load(manifest, window=None, slices="middle", steps=None,
                                                     skip_bad=False)
    with pytest.raises(ConfigError, match="fusion='mid'"):
        get_task("classification", {"covariates": COVARIATES, "fusion": "mid"}).load(
            manifest, window=None, slices="middle", steps=None, skip_bad=False)
    model = create_model("lepton_cnn_tiny", 1, 2, image_size=16, covariates=3, fusion="film")
    import torch

    assert model(torch.rand(2, 1, 16, 16), torch.rand(2, 3)).shape == (2, 2)
    backbone, head = head_parameters(model, "lepton_cnn_tiny")
    assert head and backbone and len(head) + len(backbone) == len(list(model.parameters()))
