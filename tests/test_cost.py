"""The cost record (lepton.cost): forward passes counted through the members, milliseconds timed on the real
predict path — never constants."""

import time

import pytest
import torch
from torch import nn

from lepton.cost import SERVING_BATCH, cost_lines, measure_cost
from lepton.models.networks import Ensemble

SLEEP_S = 0.004


class Sleepy(nn.Module):
    """A classifier whose every forward pass sleeps SLEEP_S: a known lower bound on what timing must find."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 2)

    def forward(self, x):
        time.sleep(SLEEP_S)
        return self.fc(x.mean(dim=(1, 2, 3))[:, None])


def _cost(model, tta):
    return measure_cost(model, (1, 8, 8), lambda z: torch.softmax(z, 1), tta=tta, precisions=["fp32"],
                        min_seconds=0.01, max_seconds=0.05)


def test_passes_are_counted_and_milliseconds_timed():
    one, ens_tta = _cost(Sleepy(), tta=False), _cost(Ensemble([Sleepy(), Sleepy(), Sleepy()]), tta=True)
    assert (one["members"], one["tta_views"], one["forward_passes_per_image"]) == (1, 1, 1)
    assert (ens_tta["members"], ens_tta["tta_views"], ens_tta["forward_passes_per_image"]) == (3, 2, 6)
    b = one["serving_batch"]
    assert b == SERVING_BATCH and one["input_shape"] == [1, 8, 8]
    for cost in (one, ens_tta):
        fp32, passes = cost["precisions"]["fp32"], cost["forward_passes_per_image"]
        # each image at batch 1 waits for every one of its passes; a full batch shares them among b images
        assert fp32["ms_per_image_b1"] >= 1000 * SLEEP_S * passes
        assert fp32[f"ms_per_image_b{b}"] >= 1000 * SLEEP_S * passes / b
        assert fp32["images_per_s_b1"] == pytest.approx(1000 / fp32["ms_per_image_b1"], rel=0.01)
    lines = cost_lines(ens_tta)
    assert lines[0].startswith("- Forward passes per image: 6 (3 member(s) × 2 TTA view(s))")
    assert "ms/image at batch 1" in lines[1] and f"at batch {b}" in lines[1]
    assert cost_lines(None)[0].startswith("- Not measured")


def test_serving_batch_is_the_servers_default():
    from lepton.serve.config import ServeConfig

    assert ServeConfig(models=["m"]).max_batch_size == SERVING_BATCH


def test_a_trained_run_records_its_cost(tiny_run):
    from lepton.train import summary

    cost = tiny_run.info["cost"]
    assert cost["forward_passes_per_image"] == 1 and cost["input_shape"] == [1, 32, 32]
    assert cost["parameters"] == sum(p.numel() for p in tiny_run.model.parameters())
    assert "fp32" in cost["precisions"] and cost["threads"] == torch.get_num_threads()
    assert summary(tiny_run)["cost"]["forward_passes_per_image"] == 1
