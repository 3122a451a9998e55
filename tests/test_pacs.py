"""Hospital integration against a real PACS (Orthanc with DICOMweb, on loopback): the DICOM node picks up a new
study, the Structured Report arrives in Orthanc, references the right study and series and reads back; a restart
processes nothing twice; a PACS that goes away is retried and nothing is lost; a study the model cannot read is
retried and parked with its reason; the node's metrics count it all."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pydicom
import pytest

from conftest import lepton_cmd, orthanc_server, upload_to_orthanc
from lepton.data.tools.synthetic import ct_phantom, write_dicom_series
from lepton.pacs.sr import classification_sr, read_classification


def _study(root, k: int, patient: str) -> tuple[list, str, str]:
    files = write_dicom_series(root / f"study{k}", ct_phantom(np.random.default_rng(10 + k), (8, 24, 24)),
                               patient_id=patient)
    ds = pydicom.dcmread(files[0])
    return files, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A registered CT volume classifier (one quick epoch on synthetic phantoms)."""
    from lepton.data.tools.synthetic import write_ct_cases
    from lepton.registry import Registry
    from lepton.train import train

    root = tmp_path_factory.mktemp("node")
    cases = write_ct_cases(root / "cases", n=12, shape=(8, 24, 24), seed=1)
    run = train(cases, preset="default", slices="volume", window="-300,1400", model="lepton_cnn", epochs=1,
                batch_size=4, output_dir=str(root / "runs"), name="ct", quiet=True)
    registry = Registry.open(root / "reg")
    registry.register_run(run.path, "ctnod")
    registry.promote("ctnod", 1, "production")
    return {"registry": registry, "location": str(root / "reg"), "root": root}


def _srs(base: str, study: str) -> list:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=base + "/dicom-web")
    series = client.search_for_series(study_instance_uid=study, search_filters={"Modality": "SR"})
    out = []
    for s in series:
        uid = s["0020000E"]["Value"][0]
        out += client.retrieve_series(study, uid)
    return out


def test_a_report_reads_back():
    evidence = [pydicom.dcmread(f, stop_before_pixels=True) for f in write_dicom_series(
        __import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "s", ct_phantom(np.random.default_rng(0),
                                                                                       (3, 16, 16)))]
    sr = classification_sr(evidence, {"label": "nodule", "probabilities": {"normal": 0.25, "nodule": 0.75},
                                      "threshold": 0.4}, model="ct", version=7)
    buf = io.BytesIO()
    sr.save_as(buf)
    back = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    said = read_classification(back)
    assert said["label"] == "nodule" and said["probabilities"] == {"normal": 0.25, "nodule": 0.75}
    assert said["threshold"] == 0.4 and said["model"] == "ct" and said["version"] == "7"
    assert said["study"] == evidence[0].StudyInstanceUID and said["series"] == [evidence[0].SeriesInstanceUID]
    assert back.StudyInstanceUID == evidence[0].StudyInstanceUID and back.Modality == "SR"
    assert back.PatientID == evidence[0].PatientID  # filed with the patient's study, inside the hospital
    import highdicom as hd

    parsed = hd.sr.Comprehensive3DSR.from_dataset(back)  # highdicom reads it as a valid SR too
    (group,) = parsed.content.get_image_measurement_groups()
    assert [m.value for m in group.get_measurements()][:2] == [0.25, 0.75]
    assert group.get_qualitative_evaluations()[0].value.meaning == "nodule"


def test_the_node_reports_new_studies_once_and_survives_the_pacs_going_away(model, tmp_path, monkeypatch):
    from lepton.pacs.node import DicomNode

    monkeypatch.setenv("LEPTON_DICOMWEB_RETRIES", "2")  # one retry after 1 s when the PACS is away, not 15 s of them

    registry, root = model["registry"], tmp_path
    first, study1, series1 = _study(root, 1, "PAT-1")
    second, study2, _ = _study(root, 2, "PAT-2")
    with orthanc_server(root / "orthanc") as base:
        port = int(base.rsplit(":", 1)[1])
        upload_to_orthanc(base, first)
        node = DicomNode(base + "/dicom-web", "ctnod@production", registry, name="ct", modalities=["CT"],
                         backoff_seconds=0, cache=root / "cache")
        poll = node.poll_once()
        assert (poll.seen, poll.processed, poll.failed) == (1, 1, 0), poll
        reports = _srs(base, study1)
        assert len(reports) == 1
        said = read_classification(reports[0])
        assert said["study"] == study1 and said["series"] == [series1] and said["model"] == "ctnod"
        assert said["label"] in said["probabilities"] and said["version"] == "1"
        # A restart (a new node on the same registry) processes nothing twice; its own SR is not an input.
        again = DicomNode(base + "/dicom-web", "ctnod@production", registry, name="ct", modalities=["CT"],
                          cache=root / "cache")
        poll = again.poll_once()
        assert (poll.seen, poll.processed, poll.skipped) == (1, 0, 1)
        assert len(_srs(base, study1)) == 1
        upload_to_orthanc(base, second)  # a new study arrives
    # The PACS goes away: the poll fails cleanly and records nothing.
    poll = again.poll_once()
    assert poll.error and "failed" in poll.error and poll.processed == 0
    assert [j.status for j in registry.jobs("ct")] == ["done"]
    with orthanc_server(root / "orthanc", port=port) as base:  # back, with its storage
        poll = again.poll_once()
        assert (poll.processed, poll.skipped) == (1, 1), poll
        assert len(_srs(base, study2)) == 1 and len(_srs(base, study1)) == 1
    jobs = registry.jobs("ct")
    assert [j.status for j in jobs] == ["done", "done"]
    assert all(study1 not in str(j) and study2 not in str(j) and "PAT-" not in str(j) for j in jobs)
    text = again.metrics.registry
    from prometheus_client import generate_latest

    metrics = generate_latest(text).decode()
    assert "lepton_node_studies_processed_total 1.0" in metrics and "lepton_node_studies_skipped_total 2.0" in metrics


def test_a_study_the_model_cannot_read_is_retried_then_parked(model, tmp_path):
    from lepton.pacs.node import DicomNode

    registry = model["registry"]
    files = write_dicom_series(tmp_path / "odd", ct_phantom(np.random.default_rng(3), (3, 24, 24)),
                               patient_id="PAT-3")
    ds = pydicom.dcmread(files[1])  # one slice of another size: not a volume the series reader can stack
    ds.Rows, ds.Columns = 16, 16
    ds.PixelData = np.zeros((16, 16), np.int16).tobytes()
    ds.save_as(files[1])
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    with orthanc_server(tmp_path / "orthanc") as base:
        upload_to_orthanc(base, files)
        node = DicomNode(base + "/dicom-web", "ctnod@production", registry, name="park", modalities=["CT"],
                         max_attempts=2, backoff_seconds=0, cache=tmp_path / "cache")
        first = node.poll_once()
        second = node.poll_once()
        third = node.poll_once()
        assert (first.failed, first.parked, second.failed, second.parked, third.skipped) == (1, 0, 1, 1, 1)
        (job,) = registry.jobs("park")
        assert job.status == "parked" and job.attempts == 2 and job.reason
        assert study not in job.reason and "PAT-3" not in job.reason
        assert _srs(base, study) == []


def test_cli_dicom_node_once(model, tmp_path):
    files, study, _ = _study(tmp_path, 5, "PAT-5")
    with orthanc_server(tmp_path / "orthanc") as base:
        upload_to_orthanc(base, files)
        done = subprocess.run(lepton_cmd("dicom-node", "--pacs", base + "/dicom-web", "--model", "ctnod@production",
                                         "--registry", model["location"], "--filter", "modality=CT", "--name", "cli",
                                         "--explain", "gradcam", "--once"), capture_output=True, text=True,
                              timeout=300,
                              env={**__import__("os").environ, "LEPTON_DICOMWEB_CACHE": str(tmp_path / "c")})
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "1 processed" in done.stdout
        assert study not in done.stdout + done.stderr and "PAT-5" not in done.stdout + done.stderr
        assert len(_srs(base, study)) == 1
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(url=base + "/dicom-web")
        (overlay,) = client.search_for_series(study_instance_uid=study, search_filters={"Modality": "OT"})
        (sc,) = client.retrieve_series(study, overlay["0020000E"]["Value"][0])
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.PhotometricInterpretation == "RGB"
        assert "gradcam heatmap" in sc.ImageComments and sc.pixel_array.ndim == 3
        assert list(sc.PatientOrientation) == ["R", "P"]  # montage tiles in the network's axial order
        bad = subprocess.run(lepton_cmd("dicom-node", "--pacs", base + "/dicom-web", "--model", "ctnod@production",
                                        "--registry", model["location"], "--filter", "colour=red", "--once"),
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "modality=CT" in bad.stdout + bad.stderr


def test_pacs_export_builds_a_deidentified_training_set(tmp_path):
    files, study, series = _study(tmp_path, 7, "PAT-7")
    with orthanc_server(tmp_path / "orthanc") as base:
        upload_to_orthanc(base, files)
        done = subprocess.run(lepton_cmd("pacs", "export", f"dicomweb+{base}/dicom-web?PatientID=PAT-7",
                                         str(tmp_path / "export"), "--key-file", str(tmp_path / "deid.key")),
                              capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "LEPTON_DICOMWEB_CACHE": str(tmp_path / "c")})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 series, 8 files de-identified" in done.stdout
    (folder,) = [p for p in (tmp_path / "export").iterdir()]
    assert folder.name.startswith("2.25.") and series not in folder.name
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        assert "PAT-7" not in str(ds) and study not in str(ds) and series not in str(ds)
        assert ds.PatientIdentityRemoved == "YES" and ds.SeriesInstanceUID == folder.name
    from lepton.data.readers.io import read_image

    assert read_image(folder, window="lung", slices="volume")[0].pixels.shape[1] == 8  # still one readable series


def test_a_segmentation_model_stores_a_dicom_seg(tmp_path):
    """A 3-D segmentation model's answer goes back as DICOM SEG referencing the series (read back with highdicom)."""
    import highdicom as hd

    from lepton.data.tools.synthetic import nodule_phantom, write_segmentation_cases
    from lepton.pacs.node import DicomNode
    from lepton.registry import Registry
    from lepton.train import train

    cases = write_segmentation_cases(tmp_path / "cases", n=8, dims=3, seed=1)
    run = train(cases, task="segmentation", epochs=1, batch_size=4, time_budget_s=0, quiet=True,
                window="-1000,1400", output_dir=str(tmp_path / "runs"), name="seg")
    registry = Registry.open(tmp_path / "reg")
    registry.register_run(run.path, "nodules")
    hu, _ = nodule_phantom(np.random.default_rng(5), (16, 32, 32), count=1)
    files = write_dicom_series(tmp_path / "series", hu, spacing=(1.0, 1.0, 2.0), patient_id="PAT-9")
    first = pydicom.dcmread(files[0])
    with orthanc_server(tmp_path / "orthanc") as base:
        upload_to_orthanc(base, files)
        node = DicomNode(base + "/dicom-web", "nodules@1", registry, name="seg", modalities=["CT"],
                         cache=tmp_path / "cache")
        poll = node.poll_once()
        assert (poll.processed, poll.failed) == (1, 0) and poll.reports[0]["kind"] == "SEG"
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(url=base + "/dicom-web")
        (found,) = client.search_for_series(study_instance_uid=str(first.StudyInstanceUID),
                                            search_filters={"Modality": "SEG"})
        (seg,) = client.retrieve_series(str(first.StudyInstanceUID), found["0020000E"]["Value"][0])
    seg = hd.seg.Segmentation.from_dataset(seg)
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    referenced = {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence}
    assert referenced == {first.SeriesInstanceUID}
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["nodule"]


def test_the_pacs_going_away_mid_study_loses_nothing(model, tmp_path, monkeypatch):
    """Orthanc stops after the node fetched a study and before it stores the report: that attempt fails and is
    recorded for a retry; with the PACS back, the next poll stores exactly one report."""
    monkeypatch.setenv("LEPTON_DICOMWEB_RETRIES", "2")
    from conftest import ORTHANC_PROCS
    from lepton.pacs.node import DicomNode

    files, study, _ = _study(tmp_path, 8, "PAT-8")

    class Unlucky(DicomNode):
        def _store(self, client, dataset):
            proc = ORTHANC_PROCS.get(self.base.removesuffix("/dicom-web"))
            if proc is not None:  # the PACS goes away now, between retrieval and storage
                proc.terminate()
                proc.wait(timeout=30)
            super()._store(client, dataset)

    with orthanc_server(tmp_path / "orthanc") as base:
        port = int(base.rsplit(":", 1)[1])
        upload_to_orthanc(base, files)
        node = Unlucky(base + "/dicom-web", "ctnod@production", model["registry"], name="midrun",
                       modalities=["CT"], backoff_seconds=0, cache=tmp_path / "cache")
        poll = node.poll_once()
        assert (poll.processed, poll.failed, poll.parked) == (0, 1, 0)
        (job,) = model["registry"].jobs("midrun")
        assert job.status == "retry" and "STOW-RS" in job.reason and study not in job.reason
    with orthanc_server(tmp_path / "orthanc", port=port) as base:
        again = DicomNode(base + "/dicom-web", "ctnod@production", model["registry"], name="midrun",
                          modalities=["CT"], backoff_seconds=0, cache=tmp_path / "cache")
        assert again.poll_once().processed == 1
        assert len(_srs(base, study)) == 1
        assert again.poll_once().skipped == 1


SHARED_CT = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "ct_series" / "dicom_uids"


@pytest.mark.skipif(not SHARED_CT.is_dir(), reason="the shared CT series is not here (../shared/data/ct_series)")
def test_a_real_jpeg2000_ct_goes_through_the_pacs_and_gets_a_report(model, tmp_path):
    """The shared abdominal CT (20 JPEG 2000 slices of 512 x 512): uploaded to Orthanc, fetched over WADO-RS in its
    own transfer syntax, read as a volume in Hounsfield units, and answered with an SR in its study."""
    from lepton.data.readers.io import read_image
    from lepton.hospital.dicomweb import Source, fetch
    from lepton.pacs.node import DicomNode

    files = sorted(SHARED_CT.iterdir())
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with orthanc_server(tmp_path / "orthanc") as base:
        upload_to_orthanc(base, files)
        (folder,) = fetch(Source.parse(f"dicomweb+{base}/dicom-web?StudyInstanceUID={study}"), tmp_path / "c")
        assert len(list(folder.iterdir())) == 20
        (frame,) = read_image(folder, window="-1000,2000", slices="volume")
        assert frame.pixels.shape[1:] == (20, 512, 512) or sorted(frame.pixels.shape[1:]) == [20, 512, 512]
        node = DicomNode(base + "/dicom-web", "ctnod@production", model["registry"], name="real",
                         modalities=["CT"], cache=tmp_path / "c")
        poll = node.poll_once()
        assert (poll.processed, poll.failed) == (1, 0)
        (sr,) = _srs(base, study)
        assert read_classification(sr)["study"] == study


def test_a_running_node_serves_its_metrics(model, tmp_path):
    """`lepton dicom-node` left running: it polls on its own and /metrics (on loopback) counts what it did."""
    import os
    import signal
    import socket
    import time
    import urllib.request

    files, study, _ = _study(tmp_path, 6, "PAT-6")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    with orthanc_server(tmp_path / "orthanc") as base:
        upload_to_orthanc(base, files)
        proc = subprocess.Popen(lepton_cmd("dicom-node", "--pacs", base + "/dicom-web", "--model", "ctnod@production",
                                           "--registry", model["location"], "--name", "live", "--interval", "1",
                                           "--settle", "1",
                                           "--metrics-port", str(metrics_port)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "LEPTON_DICOMWEB_CACHE": str(tmp_path / "c")})
        try:
            deadline, text = time.monotonic() + 120, ""
            while "lepton_node_studies_processed_total 1.0" not in text:
                assert time.monotonic() < deadline and proc.poll() is None, text[-1500:]
                time.sleep(0.5)
                try:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
                except OSError:
                    continue
            deadline = time.monotonic() + 30
            while "lepton_node_studies_skipped_total 0.0" in text or "lepton_node_studies_skipped_total" not in text:
                assert time.monotonic() < deadline, text[-1500:]  # later polls skip the study it has done
                time.sleep(0.5)
                text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            assert "lepton_node_study_seconds_count 1.0" in text
        finally:
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        assert len(_srs(base, study)) == 1
    assert study not in out and "PAT-6" not in out


def test_an_overlay_is_placed_by_the_image_orientation():
    from pydicom.dataset import Dataset

    from lepton.errors import DataError
    from lepton.pacs.sr import _orientation

    axial = Dataset()
    axial.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert _orientation(axial, volume=False) == ("L", "P")
    coronal = Dataset()
    coronal.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    assert _orientation(coronal, volume=False) == ("L", "F")
    xray = Dataset()
    xray.PatientOrientation = ["L", "F"]
    assert _orientation(xray, volume=False) == ("L", "F")
    with pytest.raises(DataError, match="cannot be placed"):
        _orientation(Dataset(), volume=False)


def test_a_running_node_follows_a_promotion(model, tmp_path):
    """`NAME@production` is resolved for every study: after a promotion the next report names the new version."""
    from lepton.pacs.node import DicomNode

    registry = model["registry"]
    first, study1, _ = _study(tmp_path, 11, "PAT-11")
    second, study2, _ = _study(tmp_path, 12, "PAT-12")
    with orthanc_server(tmp_path / "orthanc") as base:
        node = DicomNode(base + "/dicom-web", "ctnod@production", registry, name="promo", modalities=["CT"],
                         cache=tmp_path / "cache")
        upload_to_orthanc(base, first)
        assert node.poll_once().processed == 1
        source = registry.get("ctnod@1").source_run
        registry.register_run(source, "ctnod")
        registry.promote("ctnod", 2, "production")
        try:
            upload_to_orthanc(base, second)
            assert node.poll_once().processed == 1
            assert read_classification(_srs(base, study1)[0])["version"] == "1"
            assert read_classification(_srs(base, study2)[0])["version"] == "2"
            assert [j.result["version"] for j in registry.jobs("promo")] == [1, 2]
        finally:
            registry.rollback("ctnod")  # the module's other tests expect version 1 in production


def test_a_study_still_arriving_waits_until_it_settles(model, tmp_path):
    """Half a series in the PACS: the node waits; the rest arrives: it waits again; unchanged for the settle time:
    one report on the whole series."""
    import time

    from lepton.pacs.node import DicomNode

    files, study, _ = _study(tmp_path, 13, "PAT-13")
    with orthanc_server(tmp_path / "orthanc") as base:
        node = DicomNode(base + "/dicom-web", "ctnod@production", model["registry"], name="settle",
                         modalities=["CT"], cache=tmp_path / "cache", settle_seconds=1.0)
        upload_to_orthanc(base, files[:4])
        assert (node.poll_once().waiting, node.poll_once().waiting) == (1, 1)
        upload_to_orthanc(base, files[4:])
        assert node.poll_once().waiting == 1  # changed: the clock starts again
        time.sleep(1.2)
        poll = node.poll_once()
        assert (poll.processed, poll.waiting) == (1, 0)
        (sr,) = _srs(base, study)
        referenced = [i for e in sr.CurrentRequestedProcedureEvidenceSequence for s in e.ReferencedSeriesSequence
                      for i in s.ReferencedSOPSequence]
        assert len(referenced) == len(files) == 8


@pytest.mark.parametrize("key,value", [("max_attempts", 0), ("max_attempts", 2.5), ("max_attempts", 10**6),
                                       ("backoff_seconds", float("nan")), ("backoff_seconds", float("inf")),
                                       ("backoff_seconds", -1.0), ("settle_seconds", float("nan")),
                                       ("settle_seconds", 1e9)])
def test_node_settings_are_finite_and_bounded(tmp_path, key, value):
    from lepton.errors import ConfigError
    from lepton.pacs.node import DicomNode
    from lepton.registry import Registry

    registry = Registry.open(tmp_path / "reg")
    with pytest.raises(ConfigError, match=f"^{key} must be"):
        DicomNode("http://127.0.0.1:9/dicom-web", "m@1", registry, **{key: value})
    node = DicomNode("http://127.0.0.1:9/dicom-web", "m@1", registry, max_attempts=3.0)
    assert node.max_attempts == 3
    for interval in (0.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="^interval must be"):
            node.run(interval=interval, polls=1)


def test_retries_wait_at_most_a_week_however_many_attempts(tmp_path):
    from datetime import UTC, datetime, timedelta

    from lepton.registry import Registry
    from lepton.registry.jobs import MAX_RETRY_SECONDS

    registry = Registry.open(tmp_path / "reg")
    for _ in range(80):  # 86400 s doubled 79 times would be past the calendar's end
        job = registry.record_job("n", "study", done=False, reason="down", max_attempts=1000, backoff_seconds=86_400)
    assert job.status == "retry" and job.attempts == 80
    wait = job.next_try - datetime.now(UTC)
    assert timedelta(days=6) < wait <= timedelta(seconds=MAX_RETRY_SECONDS)
