"""ECG through `lepton train`: a folder of WFDB records with a label manifest is detected as sequence data, read at a
fixed sampling rate and length (interpolated), standardised per lead on the training split, and trained by the same
temporal heads as the cine loops (``seq_gru`` on signals: the 1-D convolution encoder); predictions read records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lepton.errors import DataError

wfdb = pytest.importorskip("wfdb")


def ecg(bpm: float, seconds: float, fs: float, rng: np.random.Generator) -> np.ndarray:
    """Two leads of a spike train at ``bpm`` (a QRS-like Gaussian per beat) with baseline noise, in mV."""
    t = np.arange(int(seconds * fs)) / fs
    beats = np.arange(rng.uniform(0, 60 / bpm), seconds, 60 / bpm)
    qrs = np.exp(-((t[:, None] - beats[None]) ** 2) / (2 * 0.012 ** 2)).sum(1)
    lead1 = 1.2 * qrs + rng.normal(0, 0.05, len(t))
    return np.stack([lead1, -0.6 * qrs + rng.normal(0, 0.05, len(t)) + 0.3], 1)


def write_records(root: Path, n: int = 12, fs: float = 250.0) -> Path:
    rng = np.random.default_rng(0)
    (root / "records").mkdir(parents=True)
    lines = ["path,label,patient_id"]
    for i in range(n):
        label = "tachy" if i % 2 else "normal"
        signal = ecg(150 if label == "tachy" else 60, 6.0, fs, rng)
        wfdb.wrsamp(f"r{i:02d}", fs=fs, units=["mV", "mV"], sig_name=["I", "II"], p_signal=signal,
                    fmt=["16", "16"], write_dir=str(root / "records"))
        lines.append(f"records/r{i:02d}.hea,{label},p{i}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def test_records_resampled_by_interpolation_and_detected_as_sequences(tmp_path):
    from lepton.data.readers.clips import load_clips
    from lepton.data.readers.sequence import read_sequence
    from lepton.tasks import choose_task

    manifest = write_records(tmp_path, n=4)
    name, layout = choose_task(tmp_path)  # the folder holding manifest.csv
    assert (name, layout.name) == ("sequence", "clip-manifest") and "WFDB signal records" in layout.evidence
    clip = read_sequence(tmp_path / "records" / "r00.hea", fps=100, length=300)
    raw = read_sequence(tmp_path / "records" / "r00.hea")
    assert clip.frames.shape == (300, 2) and np.allclose(np.diff(clip.times), 0.01)
    # 2.5 recorded samples per kept one: every kept value lies between its two recorded neighbours
    t = clip.times + (raw.duration - 3.0) / 2
    lo = raw.frames[np.floor(t * 250).astype(int), 0]
    hi = raw.frames[np.minimum(np.ceil(t * 250).astype(int), len(raw.frames) - 1), 0]
    assert np.all(clip.frames[:, 0] >= np.minimum(lo, hi) - 1e-4) and np.all(
        clip.frames[:, 0] <= np.maximum(lo, hi) + 1e-4)
    data = load_clips(manifest, fps=100, length=300, size=16)
    assert data.spatial_dims == 1 and data.images[0].shape == (2, 300) and data.label_names == ["normal", "tachy"]
    (tmp_path / "mixed.csv").write_text(manifest.read_text() + "records/extra.hea,normal,p9\n")
    wfdb.wrsamp("extra", fs=250, units=["mV"], sig_name=["I"], p_signal=np.zeros((1500, 1)), fmt=["16"],
                write_dir=str(tmp_path / "records"))
    with pytest.raises(DataError, match="mixes signal records with different channel counts"):
        load_clips(tmp_path / "mixed.csv", fps=100, length=300, size=16)


@pytest.mark.slow
def test_lepton_train_on_wfdb_records_and_predict(tmp_path):
    from typer.testing import CliRunner

    from lepton.cli import app
    from lepton.runs import load_run

    manifest = write_records(tmp_path / "data")
    result = CliRunner().invoke(app, [
        "train", str(manifest), "--model", "seq_gru", "--epochs", "3", "--batch-size", "4",
        "--task-option", "fps=100", "--task-option", "frames=300", "--output-dir", str(tmp_path / "runs"),
        "--name", "ecg", "--precision", "fp32", "--val-fraction", "0.25", "--test-fraction", "0"])
    assert result.exit_code == 0, result.output
    run = load_run(tmp_path / "runs" / "ecg")
    assert run.config.task == "sequence" and run.preprocessing.size == (300,) and run.preprocessing.channels == 2
    assert run.preprocessing.mean[1] == pytest.approx(0.3, abs=0.1)  # lead II's offset, from the training split
    from lepton.models.sequence import SignalNet

    assert isinstance(run.model, SignalNet)
    answer = run.predict([manifest.parent / "records" / "r01.hea"])[0]
    assert answer["label"] in ("normal", "tachy") and sum(answer["probabilities"].values()) == pytest.approx(1)
