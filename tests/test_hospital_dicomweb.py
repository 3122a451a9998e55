"""DICOMweb as a data source against a real PACS (Orthanc with its DICOMweb plugin, on loopback): QIDO finds the
series by study, patient, modality and date; WADO fetches them into the cache once; `lepton predict` takes a
dicomweb+ URL; bad URLs and an unreachable PACS give clear errors."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import lepton_cmd, orthanc_server, upload_to_orthanc
from lepton.data.tools.synthetic import ct_phantom, write_dicom_series
from lepton.errors import ConfigError, DataError
from lepton.hospital import dicomweb


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding two CT studies of two patients (3 and 4 slices)."""
    root = tmp_path_factory.mktemp("pacs")
    studies = []
    for k, (patient, slices, date) in enumerate((("PAT-A", 3, "20240105"), ("PAT-B", 4, "20240620"))):
        files = write_dicom_series(root / f"s{k}", ct_phantom(np.random.default_rng(k), (slices, 24, 24)),
                                   patient_id=patient)
        import pydicom

        for f in files:
            ds = pydicom.dcmread(f)
            ds.StudyDate = date
            ds.save_as(f)
        studies.append({"patient": patient, "slices": slices, "files": files,
                        "study": str(pydicom.dcmread(files[0]).StudyInstanceUID),
                        "series": str(pydicom.dcmread(files[0]).SeriesInstanceUID)})
    with orthanc_server(root / "orthanc") as base:
        for s in studies:
            upload_to_orthanc(base, s["files"])
        yield {"base": base, "web": f"dicomweb+{base}/dicom-web", "studies": studies}


def test_a_source_url_is_parsed_and_checked():
    s = dicomweb.Source.parse("dicomweb+http://pacs:8042/dicom-web/?StudyInstanceUID=1.2.3&Modality=CT&limit=2")
    assert s.base == "http://pacs:8042/dicom-web" and s.filters == {"StudyInstanceUID": "1.2.3", "Modality": "CT"}
    assert s.limit == 2
    for bad, match in (("http://pacs/dicom-web", "not a DICOMweb source"), ("dicomweb+ftp://pacs/x", "http"),
                       ("dicomweb+http://pacs/dw?Colour=red", "unknown DICOMweb filter"),
                       ("dicomweb+http://pacs/dw?limit=0", "limit"), ("dicomweb+http://pacs/dw?PatientID=", "empty")):
        with pytest.raises(DataError, match=match):
            dicomweb.Source.parse(bad)


def test_qido_finds_series_by_study_patient_modality_and_date(pacs):
    first, second = pacs["studies"]
    by_study = dicomweb.find_series(dicomweb.Source.parse(f"{pacs['web']}?StudyInstanceUID={first['study']}"))
    assert [(s.series, s.modality, s.instances) for s in by_study] == [(first["series"], "CT", 3)]
    by_patient = dicomweb.find_series(dicomweb.Source.parse(f"{pacs['web']}?PatientID=PAT-B"))
    assert [s.series for s in by_patient] == [second["series"]]
    by_date = dicomweb.find_series(dicomweb.Source.parse(f"{pacs['web']}?StudyDate=20240601-20241231&Modality=CT"))
    assert [s.series for s in by_date] == [second["series"]]
    assert dicomweb.find_series(dicomweb.Source.parse(f"{pacs['web']}?Modality=MR")) == []
    assert len(dicomweb.find_series(dicomweb.Source.parse(f"{pacs['web']}?Modality=CT&limit=1"))) == 1


def test_wado_fetches_into_the_cache_once(pacs, tmp_path, monkeypatch):
    first = pacs["studies"][0]
    source = dicomweb.Source.parse(f"{pacs['web']}?StudyInstanceUID={first['study']}")
    folders = dicomweb.fetch(source, tmp_path)
    assert len(folders) == 1 and folders[0].name == dicomweb.pseudonym(first["series"])
    files = sorted(folders[0].iterdir())
    assert len(files) == first["slices"]
    assert first["study"] not in str(folders[0]) and "PAT-A" not in str(folders[0])
    stamps = {f: f.stat().st_mtime_ns for f in files}
    calls = []
    real = dicomweb.Source.client

    def counting(self):
        client = real(self)
        original = client.retrieve_instance
        client.retrieve_instance = lambda *a, **k: calls.append(a) or original(*a, **k)
        return client

    monkeypatch.setattr(dicomweb.Source, "client", counting)
    dicomweb.fetch(source, tmp_path)
    assert calls == [] and {f: f.stat().st_mtime_ns for f in files} == stamps  # cached: nothing downloaded again
    from lepton.data.readers.io import read_image

    frames = read_image(folders[0], window="lung", slices="volume")
    assert frames[0].pixels.shape[1] == first["slices"]  # the series reader reads it as a volume


def test_an_unreachable_pacs_and_an_empty_search_are_clear_errors(pacs, tmp_path, monkeypatch):
    monkeypatch.setenv("LEPTON_DICOMWEB_RETRIES", "many")
    with pytest.raises(ConfigError, match="LEPTON_DICOMWEB_RETRIES='many'"):
        dicomweb.Source.parse("dicomweb+http://127.0.0.1:9/dicom-web").client()
    monkeypatch.setenv("LEPTON_DICOMWEB_RETRIES", "1")  # a refused connection is an error at once, not after back-off
    with pytest.raises(DataError, match="DICOMweb search at http://127.0.0.1:9/dicom-web failed"):
        dicomweb.fetch(dicomweb.Source.parse("dicomweb+http://127.0.0.1:9/dicom-web?Modality=CT"), tmp_path)
    with pytest.raises(DataError, match="no series") as info:
        dicomweb.fetch(dicomweb.Source.parse(f"{pacs['web']}?PatientID=NOBODY"), tmp_path)
    assert "NOBODY" not in str(info.value)  # the filter's name, never its value
    seen = []
    with pytest.raises(DataError, match="larger than the limit of 1000 bytes"):  # bounded: stops at the first
        dicomweb.fetch(dicomweb.Source.parse(f"{pacs['web']}?PatientID=PAT-A"), tmp_path / "small", max_bytes=1000,
                       on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [] and not list((tmp_path / "small").rglob("*.dcm"))


def test_predict_takes_a_dicomweb_source(pacs, tmp_path):
    from lepton.data.tools.synthetic import write_ct_cases
    from lepton.train import train

    cases = write_ct_cases(tmp_path / "cases", n=12, shape=(8, 24, 24), seed=1)
    run = train(cases, preset="default", slices="volume", window="-300,1400", model="lepton_cnn", epochs=1,
                batch_size=4, output_dir=str(tmp_path / "runs"), name="ct", quiet=True)
    first = pacs["studies"][0]
    url = f"{pacs['web']}?StudyInstanceUID={first['study']}"
    done = subprocess.run(lepton_cmd("predict", str(run.path), url), capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "LEPTON_DICOMWEB_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["label"] in rows[0]["probabilities"]
    assert first["study"] not in done.stdout + done.stderr and "PAT-A" not in done.stdout + done.stderr


def test_a_manifest_row_can_be_a_dicomweb_series(pacs, tmp_path, monkeypatch):
    from lepton.data import load_dataset

    monkeypatch.setenv("LEPTON_DICOMWEB_CACHE", str(tmp_path / "cache"))
    first = pacs["studies"][0]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient_id\n"
                        f"{pacs['web']}?StudyInstanceUID={first['study']},normal,p1\n"
                        f"{pacs['web']}?PatientID=PAT-B,nodule,p2\n")
    data = load_dataset(manifest, slices="volume", window="lung")
    assert len(data.labels) == 2 and data.label_names == ["nodule", "normal"]
    assert {tuple(np.asarray(data.images[i]).shape[1:2]) for i in range(2)} == {(3,), (4,)}  # each row's slices
    manifest.write_text(f"path,label\n{pacs['web']}?Modality=CT,normal\n")
    with pytest.raises(DataError, match="line 2: the DICOMweb source selects 2 series"):
        load_dataset(manifest, slices="volume")
