import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale

from conftest import pydicom_file
from lepton.data import load_dataset, read_image
from lepton.data.readers.dicom import WINDOW_PRESETS, apply_window
from lepton.errors import DataError


def test_ct_rescale_to_hu_and_lung_window():
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = apply_rescale(ds.pixel_array, ds).astype(np.float32)
    assert float(ds.RescaleIntercept) == -1024.0  # the file really needs the rescale
    (frame,) = read_image(path, window="lung")
    center, width = WINDOW_PRESETS["lung"]
    np.testing.assert_allclose(frame.pixels[0], np.clip((hu - (center - width / 2)) / width, 0, 1), atol=1e-6)
    assert frame.modality == "CT"
    (bone,) = read_image(path, window="bone")
    assert not np.allclose(bone.pixels, frame.pixels)


def test_custom_window_and_bad_window():
    path = pydicom_file("CT_small.dcm")
    (frame,) = read_image(path, window="40,400")
    assert frame.pixels.min() >= 0 and frame.pixels.max() <= 1
    with pytest.raises(DataError, match="unknown window"):
        read_image(path, window="lungs-please")


def test_header_window_is_used_by_default():
    path = pydicom_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    (frame,) = read_image(path)
    expected = apply_window(apply_rescale(ds.pixel_array, ds), float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_allclose(frame.pixels[0], expected, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    src = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(src)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "mono1.dcm"
    ds.save_as(inverted)
    (normal,) = read_image(src, window="mediastinum")
    (flipped,) = read_image(inverted, window="mediastinum")
    np.testing.assert_allclose(flipped.pixels, 1.0 - normal.pixels, atol=1e-6)


def test_multiframe_middle_or_all():
    path = pydicom_file("rtdose.dcm")
    assert int(pydicom.dcmread(path).NumberOfFrames) == 15
    (middle,) = read_image(path)
    frames = read_image(path, slices="all")
    assert len(frames) == 15 and frames[3].name.endswith("#frame=3")
    np.testing.assert_allclose(middle.pixels, frames[7].pixels)


def test_rgb_dicom_has_three_channels():
    (frame,) = read_image(pydicom_file("SC_rgb_small_odd.dcm"))
    assert frame.pixels.shape == (3, 3, 3)


@pytest.mark.parametrize("name,reason", [("MR_truncated.dcm", "MR_truncated.dcm"),
                                         ("rtplan.dcm", "no pixel data")])
def test_broken_or_non_image_dicom(name, reason):
    with pytest.raises(DataError, match=reason):
        read_image(pydicom_file(name))


def test_patient_id_is_pseudonymised_never_kept(tmp_path):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    secret = "MRN-0042-SECRET"
    ds.PatientID, ds.PatientName = secret, "Doe^Jane"
    path = tmp_path / "patient.dcm"
    ds.save_as(path)
    (frame,) = read_image(path)
    assert frame.patient and frame.patient.startswith("p-") and secret not in frame.patient
    assert secret not in repr(frame.__dict__.keys()) and secret not in frame.name


def test_dicom_folder_groups_patients_across_splits(tmp_path):
    from lepton.data.index.splits import assign_splits

    base = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    rng = np.random.default_rng(0)
    for label in ("normal", "nodule"):
        (tmp_path / "ct" / label).mkdir(parents=True)
    for patient in range(12):
        label = "nodule" if patient % 2 else "normal"
        for image in range(3):  # three images per patient
            ds = base.copy()
            ds.PatientID = f"PAT{patient:03d}"
            pixels = base.pixel_array.astype(np.int16) + rng.integers(0, 50, base.pixel_array.shape).astype(np.int16)
            ds.PixelData = pixels.tobytes()
            ds.save_as(tmp_path / "ct" / label / f"p{patient}_{image}.dcm")
    data = load_dataset(tmp_path / "ct", window="lung")
    assert data.has_patient_ids and len(data) == 36
    splits = assign_splits(data, val_fraction=0.25, test_fraction=0.25, seed=3)
    for group in set(data.groups.tolist()):
        assert len(set(splits[data.groups == group].tolist())) == 1
    assert {"train", "val", "test"} <= set(splits.tolist())
    assert not any("PAT" in g for g in data.groups.tolist())


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"])
def test_compressed_transfer_syntaxes_decode_like_the_uncompressed_file(name):
    """JPEG 2000, JPEG-LS and RLE lossless through the pylibjpeg plugins: the same pixels as the plain file."""
    plain = read_image(pydicom_file("MR_small.dcm"))[0].pixels
    np.testing.assert_allclose(read_image(pydicom_file(name))[0].pixels, plain, atol=1e-6)


def test_baseline_jpeg_decodes_and_a_damaged_stream_is_named():
    frame = read_image(pydicom_file("SC_rgb_jpeg_dcmtk.dcm"))[0]
    assert frame.pixels.shape[0] == 3 and frame.pixels.min() >= 0 and frame.pixels.max() <= 1
    with pytest.raises(DataError, match=r"JPEG-lossy.dcm: cannot decode pixel data \(transfer syntax JPEG Extended"):
        read_image(pydicom_file("JPEG-lossy.dcm"))  # its scan header is malformed: every decoder refuses it
