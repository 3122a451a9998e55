import gzip

import nibabel as nib
import numpy as np
import pytest

from conftest import nibabel_file
from lepton.data import read_image
from lepton.errors import DataError


def test_3d_volume_axial_slices():
    path = nibabel_file("anatomical.nii")
    depth = nib.as_closest_canonical(nib.load(path)).shape[2]
    (middle,) = read_image(path)
    slices = read_image(path, slices="all")
    assert len(slices) == depth
    assert middle.pixels.ndim == 3 and middle.pixels.shape[0] == 1
    np.testing.assert_allclose(middle.pixels, slices[depth // 2].pixels)
    assert middle.pixels.min() >= 0.0 and middle.pixels.max() <= 1.0


def test_4d_takes_first_volume():
    frames = read_image(nibabel_file("example4d.nii.gz"), slices="all")
    assert len(frames) == nib.load(nibabel_file("example4d.nii.gz")).shape[2]


def test_2d_nifti_and_ct_window(tmp_path):
    hu = np.linspace(-1000, 1000, 20 * 30, dtype=np.float32).reshape(20, 30)
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.eye(4)), path)
    (frame,) = read_image(path, window="lung")
    assert frame.pixels.shape == (1, 30, 20)
    low, width = -600 - 1500 / 2, 1500  # the lung window
    expected = np.clip((np.flipud(hu.T) - low) / width, 0, 1)
    np.testing.assert_allclose(frame.pixels[0], expected, atol=1e-6)


def test_corrupt_nifti_is_reported(tmp_path):
    path = tmp_path / "broken.nii.gz"
    raw = gzip.compress(nibabel_file("anatomical.nii").read_bytes())
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataError, match="broken.nii.gz"):
        read_image(path)
