import numpy as np
import pytest
import torch

from lepton.data.transforms import AUGMENT_PRESETS, Preprocessing, augment_batch, augment_options
from lepton.errors import ConfigError


@pytest.mark.parametrize("preset", list(AUGMENT_PRESETS))
def test_augment_keeps_shape_and_range(preset):
    x = torch.rand(16, 1, 28, 28)
    out = augment_batch(x, augment_options(preset), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    if preset != "none":
        assert not torch.allclose(out, x)


def test_augment_is_reproducible_and_hflip_is_exact():
    x = torch.rand(8, 1, 10, 10)
    opts = augment_options("xray")
    a = augment_batch(x, opts, torch.Generator().manual_seed(1))
    b = augment_batch(x, opts, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    flipped = augment_batch(x, {"hflip": 1.0}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, torch.flip(x, dims=[3]), atol=1e-5, rtol=0)


def test_corruption_augmentation_applies_report_corruptions():
    x = torch.rand(8, 1, 28, 28) * 0.5 + 0.25
    changed = 0
    for seed in range(10):
        out = augment_batch(x, {"corrupt": 1.0}, torch.Generator().manual_seed(seed))
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        changed += not torch.allclose(out, x)
    assert changed >= 8
    assert torch.equal(augment_batch(x, {"corrupt": 0.0}, torch.Generator().manual_seed(0)), x)


def test_unknown_options_are_errors():
    with pytest.raises(ConfigError, match="unknown augment preset"):
        augment_options("extreme")
    with pytest.raises(ConfigError, match="unknown augment option"):
        augment_options("light", {"twirl": 1.0})


def test_preprocessing_resizes_converts_and_normalises():
    spec = Preprocessing((16, 16), 1, [0.5], [0.25])
    images = [np.ones((3, 32, 32), np.float32), np.zeros((1, 8, 8), np.float32)]
    x = spec.resize(images)
    assert x.shape == (2, 1, 16, 16)
    torch.testing.assert_close(x[0], torch.ones(1, 16, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(spec(images)[1], torch.full((1, 16, 16), -2.0))
    assert Preprocessing.from_dict(spec.to_dict()) == spec
