"""Volume preprocessing steps (MONAI dictionary transforms): validation, geometry kept in millimetres, masks
following images, series chosen by UID in manifests, and the 2.5-D option."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from lepton.data import load_dataset, read_image
from lepton.data.tools.synthetic import write_dicom_series
from lepton.data.transforms.pipeline import apply_steps, check_steps, parse_step
from lepton.errors import ConfigError, DataError, ModelError
from lepton.models import create_model


def test_steps_are_checked_naming_the_step():
    assert check_steps([{"name": "crop_foreground"}]) == [{"name": "crop_foreground", "threshold": 0.0, "margin": 0}]
    assert parse_step("spacing=1.5,1.5,3") == {"name": "spacing", "mm": [1.5, 1.5, 3.0]}
    assert parse_step("pad=8x16x16") == {"name": "pad", "size": [8, 16, 16]}
    cases = [([{"name": "sharpen"}], "unknown step 'sharpen'"),
             ([{"name": "pad"}], r"preprocess\[0\] \(pad\): missing size"),
             ([{"name": "pad", "size": [8, 8]}], "three values"),
             ([{"name": "spacing", "mm": [1, 0, 1]}], "positive"),
             ([{"name": "resize", "size": [8, 8, 8.5]}], "whole numbers"),
             ([{"name": "crop_foreground", "margins": 2}], "unknown argument.*margins"),
             (["spacing"], "a step is a mapping")]
    for steps, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_steps(steps)


def ball(shape=(20, 30, 40), centre=(10, 12, 25), radius=4) -> np.ndarray:
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    inside = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2
    return inside.astype(np.float32)


def centroid_mm(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(volume > 0.5).mean(0)
    return (affine @ [*idx, 1.0])[:3]


def test_spacing_crop_and_pad_keep_the_world_position_and_the_mask():
    image = ball()[None]
    mask = (ball() > 0).astype(np.uint8)[None]
    # network order (d, h, w) with 2 mm slices and 0.5 mm pixels, rotated like a real series' affine
    affine = np.array([[0, 0, 0.5, -30], [0, -0.5, 0, 40], [2.0, 0, 0, -80], [0, 0, 0, 1]], float)
    before = centroid_mm(image[0], affine)
    steps = check_steps([{"name": "spacing", "mm": [1.0, 1.0, 1.0]},
                         {"name": "crop_foreground", "threshold": 0.5, "margin": 2},
                         {"name": "pad", "size": [16, 16, 16]}])
    out, new_affine, new_mask = apply_steps(image, affine, steps, "ball", mask=mask)
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), [1, 1, 1], atol=1e-6)
    # the ball spans ~16 mm along the slices and ~4 mm in-plane: cropped with margins, padded in-plane to 16
    assert out.shape[2:] == (16, 16) and 16 <= out.shape[1] <= 22
    np.testing.assert_allclose(centroid_mm(out[0], new_affine), before, atol=0.6)
    assert new_mask.dtype == np.uint8 and set(np.unique(new_mask)) == {0, 1}
    np.testing.assert_allclose(centroid_mm(new_mask[0], new_affine), before, atol=0.6)
    assert np.abs((out[0] > 0.5).astype(int) - new_mask[0]).sum() <= 0.1 * new_mask.sum()
    fixed, _, _ = apply_steps(image, affine, check_steps([{"name": "crop_or_pad", "size": [8, 40, 24]}]), "ball")
    assert fixed.shape == (1, 8, 40, 24)


def test_steps_refuse_what_they_cannot_do():
    with pytest.raises(DataError, match="no voxel geometry"):
        apply_steps(np.zeros((1, 4, 4, 4), np.float32), None, check_steps([parse_step("spacing=1,1,1")]), "arr")
    with pytest.raises(DataError, match="apply to volumes"):
        apply_steps(np.zeros((1, 4, 4), np.float32), None, check_steps([parse_step("pad=4x4x4")]), "img")
    with pytest.raises(DataError, match="mask shape"):
        apply_steps(np.zeros((1, 4, 4, 4), np.float32), np.eye(4), check_steps([parse_step("pad=4x4x4")]), "v",
                    mask=np.zeros((1, 4, 4, 5), np.uint8))


def test_a_series_read_with_steps_lands_on_the_requested_grid(tmp_path):
    hu = np.full((12, 40, 30), -1000.0, np.float32)
    hu[4:8, 10:20, 5:15] = 200.0  # a block of tissue
    write_dicom_series(tmp_path / "s", hu, spacing=(0.5, 0.5, 3.0), origin=(-20, -30, 50))
    (plain,) = read_image(tmp_path / "s", slices="volume", window="-300,1400")
    steps = check_steps([parse_step("spacing=1,1,1.5"), {"name": "crop_foreground", "threshold": 0.5, "margin": 1}])
    (frame,) = read_image(tmp_path / "s", slices="volume", window="-300,1400", steps=steps)
    np.testing.assert_allclose(np.linalg.norm(frame.affine[:3, :3], axis=0), [1.5, 1.0, 1.0], atol=1e-6)
    # 10 x 10 pixels of 0.5 mm become 5 x 5 voxels, 4 slices of 3 mm about 8 of 1.5 mm; plus a voxel each side
    assert frame.pixels.shape[2:] == (7, 7) and 9 <= frame.pixels.shape[1] <= 10
    np.testing.assert_allclose(centroid_mm(frame.pixels[0], frame.affine), centroid_mm(plain.pixels[0], plain.affine),
                               atol=0.8)


def test_a_manifest_chooses_a_series_by_uid_or_takes_each(tmp_path):
    write_dicom_series(tmp_path / "study" / "a", np.zeros((4, 8, 8), np.float32), series_uid="1.2.3.4")
    write_dicom_series(tmp_path / "study" / "b", np.ones((6, 8, 8), np.float32) * 100, series_uid="1.2.3.5")
    for i in range(3):
        write_dicom_series(tmp_path / f"other{i}", np.full((5, 8, 8), 50.0 * i, np.float32))

    def manifest(uid: str) -> Path:
        path = tmp_path / f"m{len(uid)}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label", "series_uid"])
            writer.writerow(["study", "a", uid])
            writer.writerows([[f"other{i}", "b", ""] for i in range(3)])
        return path

    data = load_dataset(manifest("1.2.3.5"), slices="volume")
    assert [np.shape(im)[1] for im in data.images] == [6, 5, 5, 5]
    both = load_dataset(manifest("*"), slices="volume")
    assert sorted(np.shape(im)[1] for im in both.images[:2]) == [4, 6] and len(both) == 5
    assert all("#series-" in name for name in both.names[:2]) and not any("1.2.3" in n for n in both.names)
    with pytest.raises(DataError, match="holds 2 DICOM series; choose one by its SeriesInstanceUID"):
        load_dataset(manifest(""), slices="volume")


def test_a_slab_network_reads_slices_as_channels():
    model = create_model("lepton_cnn", in_channels=1, num_classes=2, image_size=16, spatial_dims=3,
                         slab_depth=8).eval()
    assert model.net.features[0].in_channels == 8
    x = torch.rand(3, 1, 8, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model.net(x[:, 0]))
    with pytest.raises(ModelError, match="a 2.5-D network takes volumes"):
        create_model("lepton_cnn", spatial_dims=2, slab_depth=8)
