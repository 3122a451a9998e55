"""The task seam: classification runs through it, and a second task defined only here — regression of a
severity grade — trains, evaluates, predicts, registers and serves with no change anywhere else."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import auth, running
from lepton.errors import ConfigError
from lepton.tasks import Task, get_task, list_tasks, register_task

GRADES = 5


@register_task
class Grade(Task):
    """A toy regression task: predict a numeric grade (the class folder or manifest label) as one scalar."""

    name = "toy_grade"
    selection_metric = "val_mae"
    higher_is_better = False

    def num_outputs(self, label_names: list[str]) -> int:
        return 1

    def targets(self, data) -> np.ndarray:
        return np.asarray([float(data.label_names[k]) for k in data.labels], dtype=np.float32)

    def loss(self, logits, y):
        import torch.nn.functional as F

        return F.mse_loss(logits[:, 0].float(), y)

    def val_metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        err = outputs[:, 0] - y
        return {"val_loss": float((err**2).mean()), "val_mae": float(np.abs(err).mean())}

    def decide(self, outputs: np.ndarray, info) -> np.ndarray:
        return outputs[:, 0]

    def encode(self, row: np.ndarray, labels: list[str], info) -> dict[str, Any]:
        return {"grade": round(float(row[0]), 4)}

    def scores(self, y, outputs, info) -> dict[str, float]:
        err = outputs[:, 0] - y
        return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean()))}

    def report(self, y, outputs, labels, info, *, n_bootstrap, plots):
        body = {"metrics": self.scores(y, outputs, info)}
        body["summary"] = [f"MAE {body['metrics']['mae']:.3f}"]
        return body, [f"| MAE | {body['metrics']['mae']:.4f} |"]

    def oip_outputs(self, labels: list[str], size: list[int] | None = None) -> list[dict[str, Any]]:
        return [{"name": "grade", "datatype": "FP32", "shape": [-1, 1]}]

    def oip_tensors(self, outputs, labels, info) -> dict[str, Any]:
        return {"grade": ("FP32", outputs[:, :1].astype(np.float32))}


def graded_image(grade: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """Brightness rises with the grade, with noise: a network can learn the grade from the pixels."""
    return np.clip(rng.normal(30 + 45 * grade, 12, (size, size)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def grade_manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grades")
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        for grade in range(GRADES):
            for i in range(n):
                path = root / f"{split}_{grade}_{i}.png"
                Image.fromarray(graded_image(grade, rng)).save(path)
                rows.append({"path": path.name, "label": str(grade), "split": split})
    with open(root / "grades.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "grades.csv"


@pytest.fixture(scope="module")
def grade_run(grade_manifest, tmp_path_factory):
    from lepton.train import train

    return train(grade_manifest, task="toy_grade", preset="default", name="grade", epochs=6, batch_size=32,
                 lr=3e-3, augment="none", tta=False, output_dir=str(tmp_path_factory.mktemp("runs")), quiet=True)


def test_tasks_are_found_by_name():
    assert {"classification", "toy_grade"} <= set(list_tasks())
    assert get_task(None).name == "classification"  # runs written before tasks existed
    with pytest.raises(ConfigError, match="unknown task 'segmentation-x'"):
        get_task("segmentation-x")


def test_classification_runs_through_the_seam(tiny_run):
    assert tiny_run.task.name == "classification" and tiny_run.info["task"] == "classification"
    outputs = tiny_run.predict_proba(np.zeros((3, 1, 32, 32), np.float32))
    assert outputs.shape == (3, 2) and np.allclose(outputs.sum(1), 1, atol=1e-5)
    assert (tiny_run.decide(outputs) == tiny_run.task.decide(outputs, tiny_run.info)).all()


@pytest.mark.slow
def test_a_second_task_trains_evaluates_and_predicts(grade_run, grade_manifest):
    from lepton.evaluate import evaluate

    assert grade_run.info["task"] == "toy_grade" and "val_mae" in grade_run.info
    header = (grade_run.path / "history.csv").read_text().splitlines()[0]
    assert header == "epoch,lr,train_loss,val_loss,val_mae,images_per_s,seconds"
    report = evaluate(grade_run, split="test", n_bootstrap=0)
    # Better than always answering the middle grade (MAE 1.2 on balanced grades 0-4): the network learned.
    assert report["task"] == "toy_grade" and report["images"] == 40 and report["metrics"]["mae"] < 0.8
    assert "| MAE |" in (Path(report["output"]) / "report.md").read_text()
    image = grade_manifest.parent / "test_4_0.png"
    (row,) = grade_run.predict([image])
    assert set(row) == {"path", "grade"} and row["grade"] > 2.0


@pytest.mark.slow
def test_a_second_task_registers_and_serves(grade_run, tmp_path):
    from lepton.registry import Registry
    from lepton.serve import ServeConfig

    reg = Registry.open(tmp_path / "reg")
    v = reg.register_run(grade_run.path, "grader", onnx=True)
    assert v.config["task"] == "toy_grade" and "val_mae" in v.metrics and "toy_grade" in reg.card("grader@1")
    key = reg.create_key("clinic")
    rng = np.random.default_rng(5)
    low, high = graded_image(0, rng), graded_image(4, rng)
    for backend in ("auto", "onnx"):
        config = ServeConfig(models=["grader"], registry=str(tmp_path / "reg"), rate_limit=0, backend=backend)
        with running(config) as url:
            answers = []
            for img in (low, high):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                r = httpx.post(f"{url}/v1/models/grader/predict", content=buf.getvalue(), headers=auth(key))
                assert r.status_code == 200, r.text
                answers.append(r.json()["grade"])
            assert answers[0] < answers[1]
            meta = httpx.get(f"{url}/v2/models/grader", headers=auth(key)).json()
            assert meta["outputs"] == [{"name": "grade", "datatype": "FP32", "shape": [-1, 1]}]
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 16, 16],
                                "data": (np.stack([low, high])[:, None] / 255).ravel().tolist()}]}
            out = httpx.post(f"{url}/v2/models/grader/infer", json=body, headers=auth(key)).json()["outputs"]
            assert [o["name"] for o in out] == ["grade"] and out[0]["shape"] == [2, 1]
            np.testing.assert_allclose(out[0]["data"], answers, atol=1e-3)
            metrics = httpx.get(f"{url}/metrics").text
            assert 'lepton_requests_total{model="grader",status="200",version="1"}' in metrics
