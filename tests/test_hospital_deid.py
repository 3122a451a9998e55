"""De-identification (PS3.15 Basic Application Level Confidentiality Profile): every attribute the profile lists,
filled with an identifying value, is removed, emptied or replaced — nothing of it survives anywhere in the file —
and UIDs are remapped consistently across files and runs under one key."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from conftest import lepton_cmd
from lepton.data.tools.synthetic import ct_phantom, write_dicom_series
from lepton.errors import DataError
from lepton.hospital import deid

SECRET = "PHI-"
DATE = "20200229"


def _value(vr: str, tag: int):
    """An identifying value of this VR (text carries SECRET, so any survivor is found by a search)."""
    if vr == "SQ":
        item = Dataset()
        item.PatientName = SECRET + "nested"
        item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.99.{tag % 100000}.7"
        return Sequence([item])
    if vr == "UI":
        return f"1.2.826.0.1.3680043.99.{tag % 100000}"
    if vr in ("DA",):
        return DATE
    if vr == "DT":
        return DATE + "101010"
    if vr == "TM":
        return "101010"
    if vr in ("DS", "IS"):
        return "4711"
    if vr in ("FD", "FL"):
        return 4711.0
    if vr in ("SL", "SS", "UL", "US", "SV", "UV"):
        return 4711
    if vr == "AS":
        return "047Y"
    if vr == "AT":
        return 0x00100010
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        return (SECRET + "bytes").encode()
    if vr == "UR":
        return "http://phi.example/" + SECRET
    if vr == "CS":
        return "PHI"
    return SECRET + (keyword_for_tag(tag) or hex(tag))[:40]


def _listed(ds: Dataset) -> dict[int, str]:
    """Fill ``ds`` with every attribute the profile lists that the data dictionary knows (exact tags)."""
    exact, _ = deid.profile()
    filled = {}
    for tag, code in exact.items():
        try:
            vr = dictionary_VR(tag).split(" or ")[0]
        except KeyError:
            continue
        if tag >> 16 in (0x0000, 0x0002, 0xFFFA, 0xFFFC, 0xFFFE) or tag in (0x7FE00010,):  # not in a file's data set
            continue
        if tag in ds and vr == "UI":  # the file's own UIDs (unique per instance) stay as they are
            filled[tag] = code
            continue
        ds.add(DataElement(tag, vr, _value(vr, tag)))
        filled[tag] = code
    return filled


def _strings(ds: Dataset):
    for elem in ds.iterall():
        if elem.VR == "SQ":
            continue
        yield str(elem.value) if not isinstance(elem.value, bytes) else elem.value.decode("latin-1")


@pytest.fixture
def identified(tmp_path):
    """Two slices of one CT series, every listed attribute filled in, a private tag, and identifying file names."""
    folder = tmp_path / "in" / "DOE^JOHN-12345"
    files = write_dicom_series(folder, ct_phantom(np.random.default_rng(0), (2, 16, 16)),
                               file_names=["DOE_JOHN_1.dcm", "DOE_JOHN_2.dcm"])
    filled = {}
    for path in files:
        ds = pydicom.dcmread(path)
        filled = _listed(ds)
        ds.add_new(0x00091001, "LO", SECRET + "private")
        ds.private_block(0x0009, "ACME", create=True).add_new(0x02, "LO", SECRET + "creator")
        ds.save_as(path)
    return tmp_path / "in", files, filled


def test_no_listed_attribute_survives(identified, tmp_path):
    source, files, filled = identified
    assert len(filled) > 400  # the table's attributes the data dictionary knows
    originals = [pydicom.dcmread(f) for f in files]
    report = deid.deidentify(source, tmp_path / "out", key=b"k" * 32)
    assert report.written == 2 and report.refused == []
    outputs = sorted((tmp_path / "out").iterdir())
    assert all("DOE" not in p.name and "JOHN" not in p.name for p in outputs)
    for out_path in outputs:
        ds = pydicom.dcmread(out_path)
        original = next(o for o in originals if deid.Deidentifier(b"k" * 32).uid(o.SOPInstanceUID) == ds.SOPInstanceUID)
        for tag, code in filled.items():
            action = deid._RESOLVED.get(code, code)
            name = keyword_for_tag(tag) or hex(tag)
            if action == "X":
                assert tag not in ds, f"{name} ({code}) survived"
            elif action == "Z":
                assert tag in ds and (ds[tag].value in ("", None, b"") or len(ds[tag].value) == 0), name
            elif tag in ds and ds[tag].VR != "SQ":
                assert ds[tag].value != original[tag].value, f"{name} ({code}) kept its value"
        text = "\n".join(_strings(ds))
        assert SECRET not in text and DATE not in text and "1.2.826.0.1.3680043.99." not in text
        for uid in (original.SOPInstanceUID, original.SeriesInstanceUID, original.StudyInstanceUID,
                    original.FrameOfReferenceUID):
            assert uid not in text
        assert not any(elem.tag.is_private for elem in ds.iterall())
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.pixel_array.shape == (16, 16)  # the image itself is untouched
    # One series stays one series; its UIDs are new.
    first, second = (pydicom.dcmread(p) for p in outputs)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID != originals[0].SeriesInstanceUID
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID


def test_uids_are_consistent_under_a_key_and_differ_across_keys(identified, tmp_path):
    source, _, _ = identified
    key_file = tmp_path / "deid.key"
    key = deid.load_key(key_file)
    assert (key_file.stat().st_mode & 0o777) == 0o600 and deid.load_key(key_file) == key
    deid.deidentify(source, tmp_path / "a", key=key)
    deid.deidentify(source, tmp_path / "b", key=deid.load_key(key_file))
    deid.deidentify(source, tmp_path / "c", key=deid.load_key(None))
    names = {d: sorted(p.name for p in (tmp_path / d).iterdir()) for d in "abc"}
    assert names["a"] == names["b"] != names["c"]
    for uid in (deid.Deidentifier(key).uid("1.2.3"),):
        assert uid.startswith("2.25.") and len(uid) <= 64


def test_burned_in_annotation_and_non_dicom_are_refused(identified, tmp_path):
    source, files, _ = identified
    ds = pydicom.dcmread(files[0])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(files[0])
    (source / "notes.txt").write_text("Patient John Doe")
    report = deid.deidentify(source, tmp_path / "out", key=b"k" * 32)
    assert report.written == 1
    reasons = dict(report.refused)
    assert "BurnedInAnnotation" in reasons["DOE^JOHN-12345/DOE_JOHN_1.dcm"]
    assert reasons["notes.txt"] == "not a DICOM file"
    with pytest.raises(DataError, match="outside"):
        deid.deidentify(source, source / "out", key=b"k" * 32)
    with pytest.raises(DataError, match="no such file"):
        deid.deidentify(tmp_path / "nothere", tmp_path / "o", key=b"k" * 32)
    (tmp_path / "short.key").write_bytes(b"abc")
    with pytest.raises(DataError, match="16 bytes"):
        deid.load_key(tmp_path / "short.key")


def test_cli_deidentify(identified, tmp_path):
    import subprocess

    source, _, _ = identified
    done = subprocess.run(lepton_cmd("dicom", "deidentify", str(source), str(tmp_path / "out"), "--key-file",
                                     str(tmp_path / "k")), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 written" in done.stdout and SECRET not in done.stdout + done.stderr
    assert "DOE" not in done.stdout + done.stderr  # the report names no identifying path of a written file
    assert len(list((tmp_path / "out").iterdir())) == 2
