import numpy as np
import pytest
import torch

from lepton.data.transforms.preprocessing import AUGMENT_PRESETS, Preprocessing, augment_batch, augment_options
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


GEOMETRY = {"hflip": 0.5, "vflip": 0.5, "rotate": 25.0, "translate": 0.1, "scale": 0.2, "shear": 8.0}


def _squares(n: int, shape: tuple[int, ...], side: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark images (or volumes) each with one bright square (cube) at its own place, and its mask."""
    rng = np.random.default_rng(seed)
    x = torch.full((n, 1, *shape), 0.1)
    y = torch.zeros((n, 1, *shape), dtype=torch.int64)
    for i in range(n):
        at = [int(rng.integers(s // 4, s - s // 4 - side)) for s in shape]
        window = (i, 0, *[slice(a, a + side) for a in at])
        x[window], y[window] = 0.9, 1
    return x, y


@pytest.mark.parametrize("shape", [(48, 48), (40, 64), (24, 32, 32)])
def test_augmented_masks_follow_their_images(shape):
    x, y = _squares(8, shape, 10 if len(shape) == 2 else 8)
    opts = GEOMETRY if len(shape) == 2 else {k: v for k, v in GEOMETRY.items() if k != "shear"}
    moved, masks = augment_batch(x, opts, torch.Generator().manual_seed(0), masks=y)
    assert moved.shape == x.shape and masks.shape == y.shape and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= {0, 1}  # nearest neighbour: no blended classes
    changed = 0
    for i in range(len(x)):
        bright, labelled = moved[i, 0] > 0.5, masks[i, 0] == 1
        iou = float((bright & labelled).sum() / (bright | labelled).sum())
        assert iou > 0.8, f"sample {i}: the mask left its square (IoU {iou:.2f})"
        changed += not torch.equal(masks[i], y[i])
    assert changed == len(x)  # every mask moved, with its image


def test_rotation_is_rigid_on_non_square_images():
    """A square stays a square when a wide image turns (matrices in voxel units, not in [-1, 1] per axis)."""
    x = torch.zeros(6, 1, 40, 96)
    x[:, :, 14:26, 42:54] = 1.0
    for i, moved in enumerate(augment_batch(x, {"rotate": 45.0}, torch.Generator().manual_seed(2))):
        rows, cols = torch.nonzero(moved[0] > 0.5, as_tuple=True)
        height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert abs(height - width) <= 2, f"sample {i}: the square became {height} x {width}"
        assert abs(float((moved[0] > 0.5).sum()) - 144) < 20  # and kept its area


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_augmentation_is_deterministic_by_seed(shape):
    x, y = _squares(4, shape, 6)
    opts = {**AUGMENT_PRESETS["strong"]}
    a = augment_batch(x, opts, torch.Generator().manual_seed(5), masks=y)
    b = augment_batch(x, opts, torch.Generator().manual_seed(5), masks=y)
    c = augment_batch(x, opts, torch.Generator().manual_seed(6), masks=y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_pad_or_crop_shapes_and_centring():
    from lepton.data.transforms.pipeline import apply_steps
    from lepton.data.transforms.preprocessing import pad_or_crop

    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    out = pad_or_crop(x, (8, 4))  # rows padded 1 before and 2 after, columns cropped 1 before and 2 after
    assert out.shape == (2, 3, 8, 4)
    assert torch.equal(out[:, :, 1:6], x[:, :, :, 1:5])
    assert not out[:, :, [0, 6, 7]].any()
    assert torch.equal(pad_or_crop(out, (5, 4)), x[:, :, :, 1:5])  # cropping undoes the padding
    masks = torch.ones(3, 1, 4, 4, 4, dtype=torch.int64)
    padded = pad_or_crop(masks, (6, 2, 5))
    assert padded.shape == (3, 1, 6, 2, 5) and padded.dtype == torch.int64 and int(padded.sum()) == 3 * 4 * 2 * 4
    assert pad_or_crop(x, (5, 7)) is x
    assert float(pad_or_crop(torch.zeros(1, 1, 2, 2), (4, 4), value=0.5)[0, 0, 0, 0]) == 0.5
    # the same centring as the volume pipeline's crop_or_pad step (MONAI's ResizeWithPadOrCrop)
    vol = np.random.default_rng(0).random((1, 7, 10, 5), dtype=np.float32)
    stepped, _, _ = apply_steps(vol, None, [{"name": "crop_or_pad", "size": [8, 6, 6]}], "vol")
    assert np.array_equal(pad_or_crop(torch.from_numpy(vol), (8, 6, 6)).numpy(), stepped)


def test_affine_grid_normalises_as_monai():
    from monai.networks import to_norm_affine

    from lepton.data.transforms.preprocessing import affine_grid, random_affine

    for shape in ((3, 1, 20, 36), (2, 1, 9, 16, 12)):
        x = torch.zeros(shape)
        theta = random_affine(x, {"rotate": 30.0, "scale": 0.2, "translate": 0.2, "shear": 10.0},
                              torch.Generator().manual_seed(0))
        dims = len(shape) - 2
        norm = to_norm_affine(theta.double(), shape[2:], shape[2:], align_corners=False, zero_centered=True)
        order = [*range(dims - 1, -1, -1), dims]
        expected = torch.nn.functional.affine_grid(norm[:, order][:, :, order][:, :dims].float(), list(shape),
                                                   align_corners=False)
        torch.testing.assert_close(affine_grid(theta, shape), expected, atol=1e-5, rtol=0)
