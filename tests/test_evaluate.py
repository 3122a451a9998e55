import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from lepton.errors import DataError
from lepton.evaluate import (
    auc_score,
    bootstrap_ci,
    calibration,
    classification_metrics,
    evaluate,
    youden_threshold,
)


def _binary(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
    return y, np.stack([1 - p1, p1], 1)


def test_metrics_match_sklearn():
    y, probs = _binary()
    m = classification_metrics(y, probs, ["neg", "pos"], threshold=0.5)
    pred = (probs[:, 1] >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert m["acc"] == pytest.approx((pred == y).mean())
    assert m["per_class"]["pos"]["f1"] == pytest.approx(f1_score(y, pred))
    tn = ((pred == 0) & (y == 0)).sum()
    assert m["per_class"]["pos"]["specificity"] == pytest.approx(tn / (y == 0).sum())
    assert m["per_class"]["pos"]["sensitivity"] == pytest.approx(((pred == 1) & (y == 1)).sum() / (y == 1).sum())
    assert np.array(m["confusion_matrix"]).sum() == len(y)


def test_multiclass_auc_is_macro_ovr():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    probs = rng.dirichlet([1, 1, 1], 300)
    probs[np.arange(300), y] += 0.5
    probs /= probs.sum(1, keepdims=True)
    assert auc_score(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_youden_threshold_separates_perfectly():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    t = youden_threshold(y, p)
    assert 0.3 < t <= 0.6
    assert ((p >= t) == y).all()


def test_calibration_and_bootstrap():
    y = np.array([1] * 80 + [0] * 20)
    probs = np.tile([0.2, 0.8], (100, 1))  # says 80 % and is right 80 % of the time
    assert calibration(y, probs)["ece"] == pytest.approx(0.0, abs=1e-9)
    y2, p2 = _binary(seed=3)
    pred = p2.argmax(1)
    ci = bootstrap_ci(y2, p2, pred, n=300)
    assert ci["acc"][0] <= (pred == y2).mean() <= ci["acc"][1]
    assert ci["auc"][0] <= auc_score(y2, p2) <= ci["auc"][1]
    assert ci["auc"][1] - ci["auc"][0] < 0.2


def test_evaluate_run_writes_report(tiny_run):
    report = evaluate(tiny_run, split="test", n_bootstrap=100)
    out = tiny_run.path / "eval" / "test"
    for name in ("report.json", "report.md", "roc.png", "confusion.png", "reliability.png"):
        assert (out / name).is_file()
    assert report["split"] == "test" and report["images"] == 36  # the npz's own test split
    assert set(report["metrics"]) == {"0.5", "val_youden"}
    assert report["metrics"]["val_youden"]["threshold"] == tiny_run.threshold
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"]["0.5"]["acc"] == report["metrics"]["0.5"]["acc"]
    assert "| accuracy |" in (out / "report.md").read_text()


def test_evaluate_other_source_and_errors(tiny_run, tmp_path):
    from lepton.data.tools.synthetic import make_synthetic

    images, labels, _ = make_synthetic(40, 32, seed=9)
    np.savez(tmp_path / "external.npz", test_images=images, test_labels=labels[:, None],
             label_names=np.array(["normal", "opacity"]))
    report = evaluate(tiny_run, tmp_path / "external.npz", split="test", n_bootstrap=50, plots=False)
    assert report["images"] == 40 and report["split"] == "test"
    with pytest.raises(DataError, match="no 'val' split"):
        evaluate(tiny_run, tmp_path / "external.npz", split="val", n_bootstrap=0)
    np.savez(tmp_path / "wrong.npz", test_images=images, test_labels=labels[:, None],
             label_names=np.array(["cat", "dog"]))
    with pytest.raises(DataError, match="do not match"):
        evaluate(tiny_run, tmp_path / "wrong.npz", n_bootstrap=0)
