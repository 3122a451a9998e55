import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import lepton_cmd
from lepton.errors import ConfigError
from lepton.robustness import CORRUPTIONS, attack, corrupt


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruptions_grow_with_severity(name):
    x = torch.rand(4, 1, 28, 28) * 0.6 + 0.2
    dist = [float((corrupt(x, name, s) - x).abs().mean()) for s in range(1, 6)]
    assert all(d > 0 for d in dist), dist
    assert dist[4] > dist[0], dist
    out = corrupt(x, name, 3)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_corruption_arguments():
    with pytest.raises(ConfigError, match="unknown corruption"):
        corrupt(torch.rand(1, 1, 8, 8), "rain", 1)
    with pytest.raises(ConfigError, match="severity"):
        corrupt(torch.rand(1, 1, 8, 8), "jpeg", 6)


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_attacks_respect_budget_and_hurt(tiny_run, method):
    from lepton.data import load_dataset

    data = load_dataset(tiny_run.config.data)
    val = data.subset(data.splits == "val")
    x = tiny_run.preprocessing.resize(val.images)
    y = torch.from_numpy(val.labels)
    eps = 8 / 255
    adv = attack(tiny_run.model, tiny_run.preprocessing.normalize, x, y, eps, method)
    assert float((adv - x).abs().max()) <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        def loss(images):
            norm = tiny_run.preprocessing.normalize(images).contiguous(memory_format=torch.channels_last)
            return float(torch.nn.functional.cross_entropy(tiny_run.model(norm), y))
        assert loss(adv) > loss(x)


@pytest.mark.slow
def test_robustness_report_and_cli(tiny_run, tmp_path):
    out = subprocess.run(lepton_cmd("robustness", str(tiny_run.path), "--corruption", "gaussian_noise",
                                    "--corruption", "contrast", "--output", str(tmp_path)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "robustness.json").read_text())
    assert set(report["corruptions"]) == {"gaussian_noise", "contrast"}
    assert [r["severity"] for r in report["corruptions"]["contrast"]] == [1, 2, 3, 4, 5]
    assert set(report["adversarial"]) == {"fgsm", "pgd"}
    pgd = report["adversarial"]["pgd"]
    assert pgd[-1]["acc"] <= report["clean"]["acc"]
    assert (tmp_path / "robustness.png").is_file() and "| pgd |" in (tmp_path / "robustness.md").read_text()
    assert np.isfinite(report["mean_corruption"][0]["acc"])


@pytest.mark.slow
def test_adversarial_training_runs(tmp_path, synthetic_npz):
    from lepton.train import train

    run = train(synthetic_npz, preset="default", name="adv", output_dir=str(tmp_path), epochs=1, quiet=True,
                adversarial="pgd", adv_epsilon=2 / 255)
    assert run.config.adversarial == "pgd" and run.info["epochs"] == 1
    with pytest.raises(ConfigError, match="adversarial"):
        train(synthetic_npz, name="bad", output_dir=str(tmp_path), adversarial="cw")
