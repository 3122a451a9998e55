"""The run directory's one owner: every file written and read back through ``RunDir``, old flat and grouped
``config.yaml`` files, a model rebuilt from ``best.pt``, and errors that name the file."""

from pathlib import Path

import numpy as np
import pytest

from lepton.config import TrainConfig, make_config
from lepton.errors import RunError
from lepton.rundir import BEST, COMPLETE, CONFIG, INFO, LABELS, LAST, RunDir

#: A config.yaml as Lepton wrote it before tasks, precision and the data engine (flat, every key at the top).
OLD_FLAT = """data: x.npz
name: old
output_dir: runs
model: lepton_cnn
pretrained: null
freeze_backbone: false
backbone_lr: null
image_size: null
channels: null
normalize: half
window: null
slices: middle
augment: xray
augment_options: {}
val_fraction: 0.15
test_fraction: 0.15
skip_bad: false
epochs: 3
batch_size: 32
lr: 0.002
weight_decay: 0.0001
schedule: cosine
warmup_epochs: 1.0
step_size: 10
gamma: 0.1
label_smoothing: 0.0
imbalance: weighted
ema_decay: 0.0
early_stopping: 0
time_budget_s: 0.0
tta: false
adversarial: null
adv_epsilon: 0.00784313725490196
adv_steps: 3
seed: 0
deterministic: false
device: auto
amp: false
threads: null
preset: default
"""

GROUPED = """run: {data: x.npz, name: old, preset: default}
data: {normalize: half}
model: {model: lepton_cnn}
optimisation: {epochs: 3, batch_size: 32, lr: 0.002}
augmentation: {augment: xray}
budget: {amp: false}
"""


def _write_run(path: Path, config_text: str | None = None) -> tuple[RunDir, object]:
    """A complete run directory written through RunDir alone: a small untrained lepton_cnn and its files."""
    import torch

    from lepton.data.transforms.preprocessing import Preprocessing
    from lepton.models import create_model

    torch.manual_seed(0)
    spec = {"name": "lepton_cnn", "in_channels": 1, "num_classes": 2, "image_size": 16}
    model = create_model(**spec)
    run_dir = RunDir(path).create()
    run_dir.write_config(make_config("default", data="x.npz", name="old", epochs=3, normalize="half"))
    if config_text is not None:
        (path / CONFIG).write_text(config_text)
    run_dir.write_preprocessing(Preprocessing((16, 16), 1, [0.5], [0.5]))
    run_dir.write_labels(["normal", "opacity"])
    run_dir.write_data({"sha256": "0" * 64})
    run_dir.save_checkpoint({"model": model.state_dict(), "spec": spec, "epoch": 1, "val": {}})
    run_dir.write_info({"status": "complete", "task": "classification", "threshold": 0.5})
    return run_dir, model.eval()


def test_a_run_directory_round_trips_through_rundir(tmp_path):
    import torch

    from lepton.runs import load_run

    run_dir, model = _write_run(tmp_path / "run")
    assert run_dir.missing() == []
    assert run_dir.read_labels() == ["normal", "opacity"] and run_dir.read_info()["threshold"] == 0.5
    assert run_dir.read_preprocessing().size == (16, 16) and run_dir.read_data() == {"sha256": "0" * 64}
    assert run_dir.read_config() == make_config("default", data="x.npz", name="old", epochs=3, normalize="half")
    images = np.random.default_rng(0).random((3, 1, 16, 16), dtype=np.float32)
    x = torch.from_numpy((images - 0.5) / 0.5)
    with torch.no_grad():
        expected = torch.softmax(model(x), 1).numpy()
    assert np.allclose(load_run(run_dir.path).predict_proba(list(images)), expected, atol=1e-5)
    with torch.no_grad():
        assert np.allclose(torch.softmax(run_dir.load_model()(x), 1).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("text", [OLD_FLAT, GROUPED], ids=["old-flat", "grouped"])
def test_old_flat_and_grouped_configs_load(tmp_path, text):
    from lepton.runs import load_run

    run_dir, _ = _write_run(tmp_path / "run", text)
    run = load_run(run_dir.path)
    assert (run.config.normalize, run.config.augment, run.config.lr, run.config.amp) == ("half", "xray", 0.002, False)
    assert run.config.task == "classification" and run.config.precision == "auto"  # fields it predates: defaults
    values = run_dir.read_config_values()
    assert values["lr"] == 0.002 and "optimisation" not in values  # grouped files read flat


def test_missing_and_unreadable_files_are_named(tmp_path):
    from lepton.runs import load_run

    run_dir, _ = _write_run(tmp_path / "run")
    (run_dir.path / LABELS).unlink()
    (run_dir.path / LAST).write_bytes(b"")
    with pytest.raises(RunError, match=r"missing labels\.json .*--resume"):
        load_run(run_dir.path)
    run_dir.write_labels(["normal", "opacity"])
    (run_dir.path / INFO).write_text("{not json")
    with pytest.raises(RunError, match=r"run\.json: cannot read"):
        load_run(run_dir.path)
    assert RunDir(tmp_path / "nothing").read_info(default={}) == {}
    run_dir.write_info({"status": "complete"})
    run_dir.save_checkpoint({"model": {}, "spec": {"name": "lepton_cnn", "num_classes": 2}}, BEST)
    with pytest.raises(RunError, match=r"best\.pt does not rebuild its network"):
        run_dir.load_model()
    assert set(COMPLETE) <= {p.name for p in run_dir.path.iterdir()}


def test_registry_and_comparison_read_runs_through_rundir(tmp_path):
    """A run with a grouped config registers (its config stored flat) and loads back; runs compare by field."""
    import torch

    from lepton.registry import Registry
    from lepton.tracking.compare import compare_runs

    flat, model = _write_run(tmp_path / "flat", OLD_FLAT)
    grouped, _ = _write_run(tmp_path / "grouped", GROUPED.replace("lr: 0.002", "lr: 0.003"))
    registry = Registry.open(tmp_path / "registry")
    version = registry.register_run(grouped.path, "chest")
    assert version.config["lr"] == 0.003 and "optimisation" not in version.config
    run = registry.load_run(version.ref)
    x = torch.zeros((1, 1, 16, 16))
    with torch.no_grad():
        assert torch.allclose(run.model(x), model(x), atol=1e-5)
    differ = compare_runs([flat.path, grouped.path])["config"]
    assert differ["lr"] == ["0.002", "0.003"] and "normalize" not in differ  # (tracker parameters: text)
    assert TrainConfig.from_dict(version.config).lr == 0.003
