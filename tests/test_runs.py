import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import pydicom_file
from lepton.errors import DataError, RunError
from lepton.runs import load_run


def test_predict_files_of_every_kind(tiny_run, tmp_path):
    from lepton.data.tools.synthetic import make_synthetic

    images, _, _ = make_synthetic(2, 32, seed=4)
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    Image.fromarray(images[1]).convert("RGB").save(tmp_path / "b.jpg")
    np.save(tmp_path / "c.npy", images[0])
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.save_as(tmp_path / "d.dcm")
    run = load_run(tiny_run.path)
    rows = run.predict([tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.npy", tmp_path / "d.dcm"])
    assert len(rows) == 4
    for row in rows:
        assert row["label"] in ("normal", "opacity")
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["threshold"] == run.threshold
    # Same pixels through PNG and NPY give the same answer.
    assert rows[0]["probabilities"] == rows[2]["probabilities"]


def test_run_predictions_match_training_preprocessing(tiny_run):
    from lepton.data import load_dataset

    data = load_dataset(tiny_run.config.data)
    val = data.subset(data.splits == "val")
    probs = tiny_run.predict_proba(val.images)
    from lepton.evaluate import auc_score

    info = json.loads((tiny_run.path / "run.json").read_text())
    assert auc_score(val.labels, probs) == pytest.approx(info["val_auc"], abs=1e-6)


def test_incomplete_and_missing_runs(tmp_path, tiny_run):
    with pytest.raises(RunError, match="not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "last.pt").write_bytes(b"x")
    with pytest.raises(RunError, match="resume it"):
        load_run(tmp_path / "half")
    with pytest.raises(DataError, match="empty"):
        (tmp_path / "empty.png").write_bytes(b"")
        tiny_run.predict([tmp_path / "empty.png"])


def test_flip_tta_flips_dense_outputs_back_and_averages_class_scores():
    import torch

    from lepton.runs import flip_mean

    dense = np.arange(24.0).reshape(1, 2, 3, 4)
    assert np.array_equal(flip_mean(dense, dense[..., ::-1]), dense)  # a mirrored answer, mirrored back, agrees
    t = torch.from_numpy(dense)
    assert torch.equal(flip_mean(t, t.flip(-1)), t)
    np.testing.assert_allclose(flip_mean(np.array([[0.2, 0.8]]), np.array([[0.4, 0.6]])), [[0.3, 0.7]])
