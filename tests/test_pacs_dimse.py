"""The DICOM node over DIMSE (pynetdicom on loopback): C-ECHO; a multi-series study C-STOREd by pynetdicom's own SCU
lands in the inbox and is reported, the results C-STOREd to a configured AE; a restart between series applies the
settle rule from the database and a late series reopens the study; a calling AE title off the allow-list is refused;
a malformed data set gets a DIMSE failure status and nothing is stored; TLS; no patient identifier in the logs; and
one exchange with a real Orthanc (it C-STOREs a study to the node, the node C-STOREs its report back)."""

from __future__ import annotations

import io
import logging
import socket
import ssl
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import lepton_cmd, orthanc_server
from lepton.data.tools.synthetic import ct_phantom, write_dicom_series
from lepton.errors import DataError
from lepton.pacs.dimse import CANNOT_UNDERSTAND, DOES_NOT_MATCH, AeAddress, StorageSCP, echo, send, tls_context
from lepton.pacs.sr import read_classification

PATIENT = "PAT-DIMSE-77"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A registered CT volume classifier (one quick epoch on synthetic phantoms)."""
    from lepton.data.tools.synthetic import write_ct_cases
    from lepton.registry import Registry
    from lepton.train import train

    root = tmp_path_factory.mktemp("dimse")
    cases = write_ct_cases(root / "cases", n=8, shape=(8, 24, 24), seed=1)
    run = train(cases, preset="default", slices="volume", window="-300,1400", model="lepton_cnn", epochs=1,
                batch_size=4, output_dir=str(root / "runs"), name="ct", quiet=True)
    registry = Registry.open(root / "reg")
    registry.register_run(run.path, "ctdim")
    registry.promote("ctdim", 1, "production")
    registry.test_location = str(root / "reg")  # for the CLI test
    return registry


def _study(root: Path, n_series: int, seed: int = 0) -> list[list[Path]]:
    """One study of ``n_series`` CT series (shared Study Instance UID and patient)."""
    out, study = [], None
    for k in range(n_series):
        files = write_dicom_series(root / f"series{k}", ct_phantom(np.random.default_rng(seed + k), (4, 16, 16)),
                                   patient_id=PATIENT)
        if study is None:
            study = pydicom.dcmread(files[0]).StudyInstanceUID
        for f in files:
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID, ds.PatientName = study, "Doe^Jane"
            ds.save_as(f)
        out.append(files)
    return out


class Collector:
    """A PACS's AE for the node's results: a pynetdicom Storage SCP keeping whatever it is sent."""

    def __init__(self):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.received: list = []
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.address = f"PACS@127.0.0.1:{self.server.server_address[1]}"

    def _store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000

    def close(self):
        self.server.shutdown()


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


def _scu(scp: StorageSCP) -> AeAddress:
    return AeAddress(scp.ae_title, "127.0.0.1", scp.port)


def _node(registry, inbox: Path, results_to: str, name: str, settle: float = 0.0):
    from lepton.pacs.node import DicomNode

    return DicomNode(None, "ctdim@production", registry, name=name, inbox=inbox, results_to=results_to,
                     settle_seconds=settle, backoff_seconds=0)


@pytest.mark.slow
def test_a_multi_series_study_is_stored_reported_and_sent_back(model, tmp_path, collector, caplog):
    caplog.set_level(logging.DEBUG)
    series = _study(tmp_path, 2)
    study = str(pydicom.dcmread(series[0][0]).StudyInstanceUID)
    with StorageSCP(tmp_path / "inbox", port=0, allowed=["MODALITY"]) as scp:
        assert echo(_scu(scp), ae_title="MODALITY")
        send([pydicom.dcmread(f) for f in series[0] + series[1]], _scu(scp), ae_title="MODALITY")
        assert scp.stored == 8
    stored = sorted((tmp_path / "inbox").rglob("*"))
    assert len([p for p in stored if p.suffix == ".dcm"]) == 8 and not [p for p in stored if ".tmp" in p.name]
    assert all(study not in str(p) for p in stored)  # folders and files are named by pseudonyms
    # stored as received: the same data set back, pixel data included
    original = pydicom.dcmread(series[1][2])
    (copy,) = [pydicom.dcmread(p) for p in stored if p.suffix == ".dcm"
               and pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == original.SOPInstanceUID]
    assert copy.PixelData == original.PixelData and copy.PatientID == PATIENT

    node = _node(model, tmp_path / "inbox", collector.address, "dimse")
    poll = node.poll_once()
    assert (poll.seen, poll.processed, poll.failed, len(poll.reports)) == (1, 1, 0, 2), poll
    said = [read_classification(ds) for ds in collector.received]
    assert sorted(s["series"][0] for s in said) == sorted(str(pydicom.dcmread(s[0]).SeriesInstanceUID)
                                                          for s in series)
    assert all(s["study"] == study and s["model"] == "ctdim" for s in said)
    assert node.poll_once().skipped == 1 and len(collector.received) == 2  # reported once
    (job,) = model.jobs("dimse")
    assert job.status == "done" and len(job.result["series"]) == 2 and job.result["reports"] == 2
    logs = caplog.text + str(job)
    assert "C-STORE from MODALITY" in caplog.text
    for secret in (PATIENT, "Doe^Jane", study, str(original.SOPInstanceUID)):
        assert secret not in logs


@pytest.mark.slow
def test_a_restart_between_series_keeps_the_settle_rule_and_a_late_series_reopens(model, tmp_path, collector):
    series = _study(tmp_path, 3, seed=5)
    inbox, settle = tmp_path / "inbox", 1.5
    with StorageSCP(inbox, port=0) as scp:
        send([pydicom.dcmread(f) for f in series[0]], _scu(scp))
        first = _node(model, inbox, collector.address, "restart", settle)
        assert first.poll_once().waiting == 1
    # the node stops; the second series arrives at a restarted node
    with StorageSCP(inbox, port=0) as scp:
        send([pydicom.dcmread(f) for f in series[1]], _scu(scp))
        second = _node(model, inbox, collector.address, "restart", settle)
        assert second.poll_once().waiting == 1  # changed: the clock starts again
        (job,) = model.jobs("restart")
        assert job.status == "waiting" and job.changed_at is not None
    time.sleep(settle)
    # a single poll of a fresh node (`--once`) knows from the database that the study has settled
    once = _node(model, inbox, collector.address, "restart", settle)
    poll = once.poll_once()
    assert (poll.processed, poll.reopened, len(poll.reports)) == (1, 0, 2), poll
    assert len(collector.received) == 2
    # a series after the report reopens the study: it waits to settle, then only the new series is processed
    with StorageSCP(inbox, port=0) as scp:
        send([pydicom.dcmread(f) for f in series[2]], _scu(scp))
    assert once.poll_once().waiting == 1
    time.sleep(settle)
    poll = _node(model, inbox, collector.address, "restart", settle).poll_once()
    assert (poll.processed, poll.reopened, len(poll.reports)) == (1, 1, 1), poll
    assert read_classification(collector.received[-1])["series"] == [str(pydicom.dcmread(series[2][0])
                                                                         .SeriesInstanceUID)]
    (job,) = model.jobs("restart")
    assert job.status == "done" and len(job.result["series"]) == 3 and job.result["reports"] == 3
    assert once.poll_once().skipped == 1


def test_a_calling_ae_off_the_allow_list_is_refused(tmp_path, caplog):
    files = _study(tmp_path, 1)[0]
    with StorageSCP(tmp_path / "inbox", port=0, allowed=["CT01", "MR02"]) as scp:
        with pytest.raises(DataError, match="refused"):
            send([pydicom.dcmread(files[0])], _scu(scp), ae_title="INTRUDER")
        assert not echo(_scu(scp), ae_title="INTRUDER")
        assert echo(_scu(scp), ae_title="CT01")
    assert scp.stored == 0 and not list((tmp_path / "inbox").rglob("*.dcm"))
    assert "INTRUDER" in caplog.text


def test_a_malformed_data_set_gets_a_failure_status_and_nothing_is_stored(tmp_path, monkeypatch):
    from pynetdicom import AE, _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send a file's bytes as they are

    files = _study(tmp_path, 1)[0]
    ds = pydicom.dcmread(files[0])
    raw = Path(files[0]).read_bytes()
    meta_end = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength  # preamble, DICM, group length, meta
    garbled = tmp_path / "garbled.dcm"  # file meta intact, then Rows (US) with 3 bytes: not decodable
    garbled.write_bytes(raw[:meta_end] + b"\x28\x00\x10\x00US\x03\x00abc")
    truncated = tmp_path / "truncated.dcm"  # cut in its pixel data: what is left has no image
    truncated.write_bytes(raw[:-100])
    no_study = pydicom.dcmread(files[1])
    del no_study.StudyInstanceUID
    no_pixels = pydicom.dcmread(files[2])
    del no_pixels.PixelData
    with StorageSCP(tmp_path / "inbox", port=0) as scp:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title)
        assert assoc.is_established
        statuses = [assoc.send_c_store(item).Status for item in (garbled, truncated, no_study, no_pixels)]
        assert assoc.send_c_store(pydicom.dcmread(files[3])).Status == 0  # the association carries on
        assoc.release()
    assert statuses == [CANNOT_UNDERSTAND, DOES_NOT_MATCH, DOES_NOT_MATCH, DOES_NOT_MATCH]
    assert (scp.stored, scp.refused) == (1, 4)
    assert len(list((tmp_path / "inbox").rglob("*.dcm"))) == 1 and not list((tmp_path / "inbox").rglob("*.tmp"))


def _certificate(root: Path) -> tuple[Path, Path]:
    key, cert = root / "node.key", root / "node.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_dicom_over_tls(tmp_path):
    cert, key = _certificate(tmp_path)
    files = _study(tmp_path, 1)[0]
    server = tls_context(cert, key, server=True)
    client = ssl.create_default_context(cafile=str(cert))
    with StorageSCP(tmp_path / "inbox", port=0, ssl_context=server) as scp:
        to = AeAddress(scp.ae_title, "localhost", scp.port)
        assert echo(to, ssl_context=client)
        send([pydicom.dcmread(f) for f in files], to, ssl_context=client)
        assert not echo(to, timeout=5)  # plain DICOM to a TLS port: no association
    assert scp.stored == 4
    with pytest.raises(DataError, match="does not exist"):
        tls_context(tmp_path / "nope.crt", key, server=True)


def test_settings_are_checked():
    from lepton.pacs.node import DicomNode

    assert str(AeAddress.parse("ORTHANC@pacs.local:4242")) == "ORTHANC@pacs.local:4242"
    for bad in ("ORTHANC@pacs", "@host:1", "A\\B@host:1", "WAY_TOO_LONG_A_TITLE@host:1", "X@host:70000"):
        with pytest.raises(DataError, match="AE"):
            AeAddress.parse(bad)
    with pytest.raises(DataError, match="somewhere to send results"):
        DicomNode(None, "m@1", None, inbox=Path("inbox"))
    with pytest.raises(DataError, match="needs studies"):
        DicomNode(None, "m@1", None, results_to="PACS@h:1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_orthanc_pushes_a_study_and_gets_the_report_back(model, tmp_path):
    """Orthanc C-STOREs a study to the node's SCP (its REST `modalities/…/store`); the node C-STOREs the SR to
    Orthanc's own DICOM port, where it reads back."""
    import httpx

    from conftest import upload_to_orthanc

    files = _study(tmp_path, 1, seed=9)[0]
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    node_port, pacs_port = _free_port(), _free_port()
    dicom = {"port": pacs_port, "aet": "ORTHANC", "modalities": {"lepton": ["LEPTON", "127.0.0.1", node_port]}}
    with orthanc_server(tmp_path / "orthanc", dicom=dicom) as base, \
            StorageSCP(tmp_path / "inbox", port=node_port, allowed=["ORTHANC"]) as scp:
        upload_to_orthanc(base, files)
        (orthanc_study,) = httpx.get(f"{base}/studies").json()
        assert echo(AeAddress("ORTHANC", "127.0.0.1", pacs_port))
        r = httpx.post(f"{base}/modalities/lepton/store", json={"Resources": [orthanc_study], "Synchronous": True},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert scp.stored == len(files)
        node = _node(model, tmp_path / "inbox", f"ORTHANC@127.0.0.1:{pacs_port}", "orthanc")
        poll = node.poll_once()
        assert (poll.processed, len(poll.reports)) == (1, 1), poll
        deadline = time.monotonic() + 30
        while True:
            series = httpx.get(f"{base}/studies/{orthanc_study}/series", params={"expand": 1}).json()
            srs = [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]
            if srs or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        (sr,) = srs
        (instance,) = sr["Instances"]
        back = pydicom.dcmread(io.BytesIO(httpx.get(f"{base}/instances/{instance}/file").content))
        said = read_classification(back)
        assert said["study"] == study and said["model"] == "ctdim"


@pytest.mark.slow
def test_cli_node_listens_and_sends_results_back(model, tmp_path, collector):
    """`lepton dicom-node --listen`: a study C-STOREd to the running node comes back as an SR by C-STORE; SIGTERM
    stops it; nothing identifying is printed."""
    import signal

    files = _study(tmp_path, 1, seed=11)[0]
    port = _free_port()
    proc = subprocess.Popen(lepton_cmd("dicom-node", "--model", "ctdim@production", "--registry", model.test_location,
                                       "--listen", str(port), "--host", "127.0.0.1", "--inbox", str(tmp_path / "in"),
                                       "--allow-ae", "MODALITY", "--results-to", collector.address, "--name", "cli",
                                       "--settle", "0.5", "--interval", "0.2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        to = AeAddress("LEPTON", "127.0.0.1", port)
        deadline = time.monotonic() + 120
        while not echo(to, ae_title="MODALITY", timeout=2):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.3)
        send([pydicom.dcmread(f) for f in files], to, ae_title="MODALITY")
        while not collector.received:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert read_classification(collector.received[0])["model"] == "ctdim"
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "watching AE LEPTON on 127.0.0.1" in out and PATIENT not in out
    assert str(pydicom.dcmread(files[0]).StudyInstanceUID) not in out
