import gzip

import nibabel as nib
import numpy as np
import pytest

from conftest import nibabel_file
from lepton.data import read_image
from lepton.data.readers.io import read_image_bytes, sniff_bytes, sniff_format
from lepton.data.readers.nifti import HEADER_BYTES, gunzip_head, read_nifti_volume
from lepton.data.readers.registry import SNIFF_BYTES
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


@pytest.mark.parametrize("klass", [nib.Nifti1Image, nib.Nifti2Image])
def test_gzip_nifti_is_recognised_by_content_without_a_name(klass, tmp_path):
    """`curl --data-binary @x.nii.gz` sends no file name: gzip content whose inflated head is a NIfTI header is
    NIfTI, and reads as it does with its name (on disk under any name, too)."""
    hu = np.linspace(-1000, 1000, 6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    data = gzip.compress(klass(hu, np.diag([0.8, 0.8, 2.0, 1.0])).to_bytes())
    assert sniff_bytes(data[:SNIFF_BYTES]) == "nifti"
    (named,) = read_image_bytes(data, "case.nii.gz", slices="volume", window="lung")
    (bare,) = read_image_bytes(data, "upload", slices="volume", window="lung")
    np.testing.assert_array_equal(bare.pixels, named.pixels)
    np.testing.assert_allclose(bare.affine, named.affine)
    (tmp_path / "scan").write_bytes(data)
    assert sniff_format(tmp_path / "scan") == "nifti"
    np.testing.assert_array_equal(read_image(tmp_path / "scan", slices="volume", window="lung")[0].pixels,
                                  named.pixels)
    plain = klass(hu[..., 0], np.eye(4)).to_bytes()  # a 2-D image, uncompressed, without a name
    assert read_image_bytes(plain, "upload")[0].pixels.shape == (1, 7, 6)


def test_the_gzip_sniff_inflates_only_a_header_and_other_gzip_is_not_nifti():
    bomb = gzip.compress(b"\0" * (20 << 20))  # 20 MB of zeros in ~20 KB
    assert len(gunzip_head(bomb)) == HEADER_BYTES and len(gunzip_head(bomb[:SNIFF_BYTES])) <= HEADER_BYTES
    assert gunzip_head(b"\x1f\x8b not deflate") == b""
    assert sniff_bytes(bomb[:SNIFF_BYTES]) is None  # gzip, but no NIfTI inside
    with pytest.raises(DataError, match="unrecognised file content"):
        read_image_bytes(bomb, "upload")
    assert sniff_bytes(bomb[:SNIFF_BYTES], "x.nii.gz") == "nifti"  # the name still says which error to give


def test_a_nifti_gz_expanding_past_the_byte_limit_is_refused_from_its_header(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float64)
    header.set_data_shape((1024, 1024, 160))  # 168 M voxels (under a volume's voxel limit), 1.3 GB as float64
    data = gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * (1 << 20))  # the first MB of it
    (tmp_path / "big.nii.gz").write_bytes(data)
    with pytest.raises(DataError, match=r"expand to \d+ bytes, over the 1073741824 byte limit"):
        read_nifti_volume(tmp_path / "big.nii.gz")
    for name in ("big.nii.gz", "upload"):
        with pytest.raises(DataError, match="byte limit"):
            read_image_bytes(data, name, slices="volume")
