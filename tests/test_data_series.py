"""DICOM series and NIfTI files as volumes: placement by position, geometry in RAS, and every way a series can
be broken — on series this test writes, and on the shared real CT (JPEG 2000) when it is there."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from lepton.data.readers.nifti import read_nifti_volume
from lepton.data.readers.series import inspect_series, read_series
from lepton.data.tools.synthetic import write_dicom_series
from lepton.errors import DataError

SHARED_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct_series"


def phantom(k: int = 8, rows: int = 12, cols: int = 10, seed: int = 0) -> np.ndarray:
    """(K, rows, cols) HU values, every voxel distinct so any misplacement shows."""
    return (np.arange(k * rows * cols).reshape(k, rows, cols) % 2000 - 1000 + seed).astype(np.float32)


def as_ras(slices: np.ndarray) -> np.ndarray:
    """Where an axial LPS series' voxels land in RAS order: columns run to the left, rows to the back."""
    return slices.transpose(2, 1, 0)[::-1, ::-1, :]


def test_a_series_becomes_a_ras_volume_ordered_by_position(tmp_path):
    slices = phantom()
    k = len(slices)
    order = np.random.default_rng(0).permutation(k)  # file names and InstanceNumbers say nothing about position
    write_dicom_series(tmp_path / "s", slices[order], spacing=(0.7, 0.8, 2.5), origin=(-50, -60, 100),
                       positions=np.array([[-50, -60, 100 + 2.5 * i] for i in order]),
                       instance_numbers=list(range(k, 0, -1)), file_names=[f"{n:03d}.dcm" for n in range(k)])
    (volume,) = read_series(tmp_path / "s")
    assert volume.axis_codes() == "RAS" and volume.shape == (10, 12, k)
    np.testing.assert_allclose(volume.spacing, (0.7, 0.8, 2.5), atol=1e-6)
    np.testing.assert_array_equal(volume.data, as_ras(slices))  # HU after the rescale, every voxel in place
    corner = volume.affine @ [0, 0, 0, 1]  # voxel (0, 0, 0) is the right-most, back-most, lowest
    np.testing.assert_allclose(corner[:3], [50 - 9 * 0.7, 60 - 11 * 0.8, 100], atol=1e-4)
    assert volume.patient.startswith("p-") and "SYNTH" not in str(volume.meta)


def test_a_folder_with_two_series_and_a_choice(tmp_path):
    write_dicom_series(tmp_path / "study" / "a", phantom(4), series_uid="1.2.3.4")
    write_dicom_series(tmp_path / "study" / "b", phantom(6, seed=7), series_uid="1.2.3.5")
    volumes = read_series(tmp_path / "study")
    assert sorted(v.shape[2] for v in volumes) == [4, 6]
    (chosen,) = read_series(tmp_path / "study", series="1.2.3.5")
    assert chosen.shape[2] == 6 and "1.2.3.5" not in chosen.name  # UIDs only as a hash in names and messages
    with pytest.raises(DataError, match="no series with that SeriesInstanceUID"):
        read_series(tmp_path / "study", series="9.9")


def test_blank_uids_group_by_folder_with_a_warning(tmp_path, caplog):
    write_dicom_series(tmp_path / "s", phantom(3), series_uid=None)
    with caplog.at_level(logging.WARNING, logger="lepton.data"):
        (volume,) = read_series(tmp_path / "s")
    assert volume.shape[2] == 3 and "no SeriesInstanceUID" in caplog.text


def test_a_localizer_is_left_out_with_a_warning(tmp_path, caplog):
    write_dicom_series(tmp_path / "s", phantom(5), series_uid="1.2.3")
    write_dicom_series(tmp_path / "s", phantom(1, rows=12, cols=10), series_uid="1.2.3",
                       orientation=(0, 1, 0, 0, 0, -1), file_names=["scout.dcm"])
    with caplog.at_level(logging.WARNING, logger="lepton.data"):
        (volume,) = read_series(tmp_path / "s")
    assert volume.shape[2] == 5 and volume.meta["left_out"] == 1 and "localizer" in caplog.text


@pytest.mark.parametrize("fault", ["gap", "tilt", "sizes", "duplicate", "no position"])
def test_broken_series_are_refused_naming_the_series(tmp_path, fault):
    slices = phantom(6)
    kwargs: dict = {"series_uid": "1.2.3"}
    if fault == "tilt":
        kwargs["positions"] = np.array([[0, 0.3 * i * 2, 2.0 * i] for i in range(6)])  # sheared by ~8.5 degrees
    if fault == "duplicate":
        kwargs["positions"] = np.array([[0, 0, 2.0 * min(i, 4)] for i in range(6)])
    paths = write_dicom_series(tmp_path / "s", slices, **kwargs)
    if fault == "gap":
        paths[3].unlink()
    if fault == "sizes":
        write_dicom_series(tmp_path / "s", phantom(1, rows=16), series_uid="1.2.3", origin=(-100, -100, 12),
                           file_names=["odd.dcm"])
    if fault == "no position":
        import pydicom

        ds = pydicom.dcmread(paths[2])
        del ds.ImagePositionPatient
        ds.save_as(paths[2])
    message = {"gap": "slices missing between 4.0 and 8.0 mm", "tilt": "gantry tilt", "sizes": "different sizes",
               "duplicate": "share a position", "no position": "lack ImagePositionPatient"}[fault]
    with pytest.raises(DataError, match=message) as info:
        read_series(tmp_path / "s")
    assert str(tmp_path / "s") in str(info.value) and "series-" in str(info.value)
    (row,) = inspect_series(tmp_path / "s")
    assert row["ok"] is False and message.split()[0] in row["problems"][0]


def test_uneven_spacing_is_a_warning(tmp_path):
    write_dicom_series(tmp_path / "s", phantom(5), series_uid="1.2.3",
                       positions=np.array([[0, 0, z] for z in (0.0, 2.0, 4.0, 6.3, 8.3)]))
    (row,) = inspect_series(tmp_path / "s")
    assert row["ok"] and row["slices"] == 5 and any("uneven" in p for p in row["problems"])


def test_compressed_series_decode(tmp_path):
    pytest.importorskip("openjpeg")
    slices = phantom(3, rows=64, cols=48)  # OpenJPEG's encoder needs more than a few pixels
    write_dicom_series(tmp_path / "s", slices, compress=True)
    import pydicom

    assert pydicom.dcmread(next((tmp_path / "s").iterdir())).file_meta.TransferSyntaxUID.is_compressed
    (volume,) = read_series(tmp_path / "s")
    np.testing.assert_array_equal(volume.data, as_ras(slices))  # lossless


def test_series_and_nifti_agree(tmp_path):
    slices = phantom(6)
    write_dicom_series(tmp_path / "s", slices, spacing=(0.9, 0.9, 3.0))
    (volume,) = read_series(tmp_path / "s")
    import nibabel as nib

    nib.save(volume.to_nifti(), tmp_path / "v.nii.gz")
    back = read_nifti_volume(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(back.data, volume.data)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-5)
    flipped = nib.Nifti1Image(volume.data[::-1].copy(), volume.affine @ np.array(
        [[-1, 0, 0, volume.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))  # stored LAS on disk
    nib.save(flipped, tmp_path / "las.nii")
    np.testing.assert_array_equal(read_nifti_volume(tmp_path / "las.nii").data, volume.data)
    four = nib.Nifti1Image(np.stack([volume.data, volume.data + 1], -1), volume.affine)
    nib.save(four, tmp_path / "4d.nii")
    np.testing.assert_array_equal(read_nifti_volume(tmp_path / "4d.nii", volume_index=1).data, volume.data + 1)
    with pytest.raises(DataError, match="out of range"):
        read_nifti_volume(tmp_path / "4d.nii", volume_index=2)
    with pytest.raises(DataError, match="over the limit"):
        read_nifti_volume(tmp_path / "v.nii.gz", max_voxels=100)


@pytest.mark.skipif(not SHARED_CT.is_dir(), reason="the shared CT series is not here (../shared/data/ct_series)")
def test_the_shared_jpeg2000_ct_reads_in_hounsfield_units_and_ras():
    pytest.importorskip("openjpeg")
    (volume,) = read_series(SHARED_CT / "dicom")  # blank UIDs: grouped by folder
    (with_uids,) = read_series(SHARED_CT / "dicom_uids")
    assert volume.shape == (512, 512, 20) and volume.axis_codes() == "RAS"
    np.testing.assert_allclose(volume.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)  # slice step from positions
    np.testing.assert_array_equal(volume.data, with_uids.data)
    nifti = read_nifti_volume(SHARED_CT / "example_ct.nii.gz")
    assert nifti.axis_codes() == "RAS" and nifti.spacing == (3.0, 3.0, 3.0)
    # Same scanner scale: air near -1000 HU and soft tissue near 0-100 HU in both.
    for v in (volume, nifti):
        air, tissue = np.percentile(v.data, [2, 75])
        assert -1100 < air < -900 and -200 < tissue < 200, (v.name, air, tissue)
