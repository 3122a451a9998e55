"""Slide models in the registry and the server: a slide model registers with its card and is promoted; a real server
on loopback takes a whole slide as a job (uploaded, zipped DICOM, or named under the slide root), answers what
``predict_slide`` answers offline, writes a DICOM SR for a DICOM slide, refuses bad input with a 4xx (never a 500),
bounds its queue, and leaves no uploaded file behind."""

from __future__ import annotations

import io
import json
import socket
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from conftest import auth, running
from lepton.data.tools.slidegen import plan_slide, write_slide

SPEC = {"mpp": 1.0, "size": 64, "overlap": 0, "min_tissue": 0.5}


def _slide_model(folder: Path) -> Path:
    """A real (untrained, seeded) gated-attention MIL model over a seeded random backbone, saved as
    `lepton slides train` saves one."""
    import torch

    from lepton.pathology.embed import Backbone
    from lepton.pathology.mil import SlideModel, abmil

    backbone = Backbone.random(input_size=32)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = SlideModel(abmil(backbone.dim), rng.normal(size=backbone.dim).astype(np.float32),
                       rng.uniform(0.5, 2, backbone.dim).astype(np.float32), ["normal", "tumour"], 0.4,
                       backbone.identity, SPEC)
    model.save(folder)
    (folder / "evaluation.json").write_text(json.dumps({"slides": {"train": 6, "val": 2, "test": 4}, "tiles": 500,
                                                        "test": {"slides": 4, "auc": 0.75, "auc_ci95": [0.5, 1.0],
                                                                 "acc": 0.75, "sensitivity": 1.0,
                                                                 "specificity": 0.5, "calibration": {"ece": 0.1}}}))
    return folder


@pytest.fixture(scope="module")
def slide_server(tmp_path_factory):
    from lepton.registry import Registry
    from lepton.serve import ServeConfig

    root = tmp_path_factory.mktemp("slideserve")
    model = _slide_model(root / "model")
    reg = Registry.open(root / "reg")
    reg.register_slide_model(model, "wsi")
    reg.promote("wsi", 1, "production")
    keys = {"clinic": reg.create_key("clinic"), "other": reg.create_key("other")}
    plan = plan_slide(1024, 896, tumour=True, seed=5)
    slides = root / "slides"
    tiff = write_slide(slides / "case.tiff", plan, tile=128)
    dicom = write_slide(slides / "case_dcm", plan, container="dicom", tile=128)
    with socket.socket() as sock:  # the port a test's Orthanc will take: the one DICOMweb service trusted
        sock.bind(("127.0.0.1", 0))
        pacs_port = sock.getsockname()[1]
    config = ServeConfig(models=["wsi@production"], registry=str(root / "reg"), rate_limit=0,
                         slide_dir=str(root / "jobs"), slide_root=str(slides), slide_queue=1,
                         max_slide_bytes=8 << 20, dicomweb_allow=[f"http://127.0.0.1:{pacs_port}/dicom-web/"])
    with running(config) as base:
        yield {"url": base, "keys": keys, "model": model, "tiff": tiff, "dicom": dicom, "jobs": root / "jobs",
               "root": root, "pacs_port": pacs_port}


def _wait(url: str, job: str, key: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = httpx.get(f"{url}/v1/slide-jobs/{job}", headers=auth(key)).json()
        if state["status"] in ("done", "failed") or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def _submit(s: dict, body: bytes, key: str = "clinic", **params) -> httpx.Response:
    return httpx.post(f"{s['url']}/v1/slide-models/wsi/jobs", content=body, params=params,
                      headers={**auth(s["keys"][key]), "Content-Type": "application/octet-stream"}, timeout=60)


def test_a_slide_model_registers_with_its_card_and_is_promoted(slide_server):
    from lepton.registry import Registry
    from lepton.registry.slides import load_slide_model

    reg = Registry.open(slide_server["root"] / "reg")
    v = reg.get("wsi@production")
    assert v.format == "slide-mil" and v.labels == ["normal", "tumour"] and v.threshold == pytest.approx(0.4)
    assert v.metrics["test_auc"] == 0.75 and v.preprocessing["tile"] == SPEC
    card = reg.card(v.ref)
    assert "gated-attention MIL" in card and "slide AUC 0.7500 (95 % CI 0.5000–1.0000)" in card
    assert load_slide_model(reg, v.ref).threshold == pytest.approx(0.4)
    with pytest.raises(Exception, match="not a slide model folder"):
        reg.register_slide_model(slide_server["root"] / "slides", "nope")
    listed = httpx.get(f"{slide_server['url']}/v1/slide-models", headers=auth(slide_server["keys"]["other"])).json()
    assert [m["name"] for m in listed["models"]] == ["wsi"] and listed["models"][0]["tile"] == SPEC
    shown = httpx.get(f"{slide_server['url']}/v1/slide-models/wsi/card", headers=auth(slide_server["keys"]["other"]))
    assert shown.json()["markdown"] == card and "<h1>Model card: wsi v1</h1>" in shown.json()["html"]
    assert httpx.get(f"{slide_server['url']}/v1/models/wsi", headers=auth(slide_server["keys"]["clinic"])) \
        .status_code == 404  # not an image model: no batcher behind it
    info = httpx.get(f"{slide_server['url']}/v1/slide-models/wsi", headers=auth(slide_server["keys"]["other"])).json()
    assert info["kind"] == "slide" and info["format"] == "slide-mil" and info["version"] == 1
    assert [(x["version"], x["stage"], x["format"]) for x in info["versions"]] == [(1, "production", "slide-mil")]
    assert info["versions"][0]["metrics"]["test_auc"] == 0.75
    from typer.testing import CliRunner

    from lepton.cli import app

    listed = CliRunner().invoke(app, ["models", "list", "--registry", str(slide_server["root"] / "reg")])
    assert listed.exit_code == 0 and "slide-mil" in listed.output and "0.7500 (test)" in listed.output, listed.output


@pytest.mark.slow
def test_a_slide_job_answers_what_predict_slide_answers(slide_server, tmp_path):
    from lepton.pathology.workflow import predict_slide

    s, key = slide_server, slide_server["keys"]["clinic"]
    r = _submit(s, s["tiff"].read_bytes(), filename="case.tiff")
    assert r.status_code == 202 and r.headers["location"] == r.json()["url"], r.text
    job = r.json()["id"]
    state = _wait(s["url"], job, key)
    assert state["status"] == "done", state
    assert state["progress"]["tiles_done"] == state["progress"]["tiles"] == state["result"]["tiles"] > 10
    offline = predict_slide(s["model"], s["tiff"], tmp_path / "offline", cache=False)
    result = state["result"]
    assert result["probability"] == offline["prediction"]["probability"]
    assert result["label"] == offline["prediction"]["label"] and result["tiles"] == offline["tiles"]
    assert result["regions"] == json.loads(json.dumps(offline["regions"]))
    assert result["geojson"] == json.loads(Path(offline["files"]["geojson"]).read_text())
    assert "file" not in result["slide"] and str(s["jobs"]) not in json.dumps(state)  # no server paths
    png = httpx.get(s["url"] + state["files"]["heatmap"], headers=auth(key))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert "sr" not in state["files"]  # a TIFF slide: no DICOM SR
    assert sorted(p.name for p in (s["jobs"] / job).iterdir()) == ["job.json", "out"]  # the upload is gone
    # another tenant sees no such job; the owner deletes it
    assert httpx.get(f"{s['url']}/v1/slide-jobs/{job}", headers=auth(s["keys"]["other"])).status_code == 404
    assert httpx.delete(f"{s['url']}/v1/slide-jobs/{job}/files", headers=auth(key)).status_code == 204
    assert not (s["jobs"] / job).exists()


@pytest.mark.slow
def test_a_dicom_slide_job_writes_an_sr_that_references_the_slide(slide_server):
    import highdicom as hd
    import pydicom

    from lepton.pacs.sr import read_classification

    s, key = slide_server, slide_server["keys"]["clinic"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(s["dicom"].iterdir()):
            zf.write(f, f"some/folder/{f.name}")
    r = _submit(s, buf.getvalue())
    assert r.status_code == 202, r.text
    state = _wait(s["url"], r.json()["id"], key)
    assert state["status"] == "done", state
    sr_bytes = httpx.get(s["url"] + state["files"]["sr"], headers=auth(key)).content
    ds = pydicom.dcmread(io.BytesIO(sr_bytes))
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    source = pydicom.dcmread(s["dicom"] / "level0.dcm", stop_before_pixels=True)
    referenced = [i.ReferencedSOPInstanceUID for e in ds.CurrentRequestedProcedureEvidenceSequence
                  for se in e.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert referenced == [source.SOPInstanceUID] and ds.StudyInstanceUID == source.StudyInstanceUID
    said = read_classification(ds)
    assert said["probabilities"]["tumour"] == pytest.approx(state["result"]["probability"])
    assert said["label"] == state["result"]["label"] and said["threshold"] == pytest.approx(0.4)
    rois = sr.content.get_planar_roi_measurement_groups()
    assert len(rois) == len(state["result"]["regions"]) >= 1
    region = rois[0].roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert region.PixelOriginInterpretation == "VOLUME"


@pytest.mark.slow
def test_a_slide_job_by_dicomweb_reference_answers_what_predict_slide_answers(slide_server, tmp_path):
    """A DICOM slide STOWed into Orthanc, named by reference: the job retrieves it (progress in instances), answers
    what predict_slide answers on the files, keeps no UID or patient identifier and no instance; an untrusted
    service is 403 before any request, a reference that is not one series by UID 422, a CT series a failed job."""
    import pydicom

    from conftest import orthanc_server, upload_to_orthanc
    from lepton.data.tools.synthetic import ct_phantom, write_dicom_series
    from lepton.hospital.dicomweb import Source
    from lepton.pathology.workflow import predict_slide

    s, key = slide_server, slide_server["keys"]["clinic"]
    instances = [pydicom.dcmread(f) for f in sorted(s["dicom"].iterdir())]
    for ds in instances:
        ds.PatientID = "PAT-WSI-4711"
    study, series = str(instances[0].StudyInstanceUID), str(instances[0].SeriesInstanceUID)
    ct = write_dicom_series(tmp_path / "ct", ct_phantom(np.random.default_rng(0), (2, 16, 16)))

    def submit(reference: str) -> httpx.Response:
        return httpx.post(f"{s['url']}/v1/slide-models/wsi/jobs", json={"dicomweb": reference},
                          headers=auth(key), timeout=60)

    with orthanc_server(tmp_path / "orthanc", port=s["pacs_port"]) as base:
        Source.parse(f"dicomweb+{base}/dicom-web").client().store_instances(instances)  # STOW-RS
        upload_to_orthanc(base, ct)
        query = f"?StudyInstanceUID={study}&SeriesInstanceUID={series}"
        for untrusted in (f"http://localhost:{s['pacs_port']}/dicom-web", f"{base}/other", f"{base}@evil/dicom-web",
                          "http://169.254.169.254/dicom-web"):
            r = submit(untrusted + query)
            assert r.status_code == 403 and "trust" in r.json()["error"]["message"], (untrusted, r.text)
        assert submit(f"{base}/dicom-web?StudyInstanceUID={study}").status_code == 422  # a study, not one series
        assert submit(f"{base}/dicom-web?PatientID=PAT-WSI-4711&SeriesInstanceUID={series}").status_code == 422
        ct_series = str(pydicom.dcmread(ct[0]).SeriesInstanceUID)
        failed = _wait(s["url"], submit(f"{base}/dicom-web?SeriesInstanceUID={ct_series}").json()["id"], key)
        assert failed["status"] == "failed" and "not a VL whole-slide series" in failed["error"], failed
        r = submit(f"{base}/dicom-web{query}")
        assert r.status_code == 202, r.text
        state = _wait(s["url"], r.json()["id"], key)
    assert state["status"] == "done", state
    progress = state["progress"]
    assert progress["instances_done"] == progress["instances"] == len(instances)
    assert progress["tiles_done"] == progress["tiles"] == state["result"]["tiles"] > 10
    offline = predict_slide(s["model"], s["dicom"], tmp_path / "offline", cache=False)
    assert state["result"]["probability"] == offline["prediction"]["probability"]
    assert state["result"]["regions"] == json.loads(json.dumps(offline["regions"])) and "sr" in state["files"]
    folder = s["jobs"] / r.json()["id"]
    assert sorted(p.name for p in folder.iterdir()) == ["job.json", "out"]  # the retrieved instances are gone
    stored = (folder / "job.json").read_text() + json.dumps(state)
    assert not any(x in stored for x in (study, series, "PAT-WSI-4711", ct_series))


def test_bad_input_is_refused_with_a_4xx_and_leaves_nothing(slide_server):
    s = slide_server
    before = set(s["jobs"].iterdir()) if s["jobs"].exists() else set()
    assert _submit(s, b"not a slide at all" * 10).status_code == 415
    truncated = s["tiff"].read_bytes()[:3000]
    r = _submit(s, truncated, filename="case.tiff")
    assert r.status_code == 422 and "case.tiff" not in r.text and str(s["jobs"]) not in r.text, r.text
    assert _submit(s, b"").status_code == 400
    assert _submit(s, b"\0" * (9 << 20)).status_code == 413
    assert httpx.post(f"{s['url']}/v1/slide-models/wsi/jobs", files={"file": ("a.tiff", b"II*\0")},
                      headers=auth(s["keys"]["clinic"])).status_code == 415
    assert httpx.post(f"{s['url']}/v1/slide-models/wsi/jobs", content=b"II*\0").status_code == 401
    assert httpx.post(f"{s['url']}/v1/slide-models/nope/jobs", content=b"II*\0",
                      headers=auth(s["keys"]["clinic"])).status_code == 404
    for path, status in (("../reg/registry.db", 403), ("missing.svs", 404), ("case.tiff", 202)):
        r = httpx.post(f"{s['url']}/v1/slide-models/wsi/jobs", json={"path": path},
                       headers=auth(s["keys"]["clinic"]))
        assert r.status_code == status, (path, r.text)
    assert _wait(s["url"], r.json()["id"], s["keys"]["clinic"])["status"] == "done"
    assert s["tiff"].is_file()  # a server-side slide is the client's: read, never removed
    assert {p for p in s["jobs"].iterdir()} - before == {s["jobs"] / r.json()["id"]}


def test_a_corrupt_tile_fails_the_job_with_the_reason(slide_server, tmp_path):
    import tifffile

    s = slide_server
    path = tmp_path / "bad.tiff"
    path.write_bytes(s["tiff"].read_bytes())
    with tifffile.TiffFile(path) as tif:  # every level-0 tile; the thumbnail's level reads
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    with open(path, "r+b") as fh:
        for offset, count in zip(offsets, counts, strict=True):
            fh.seek(offset)
            fh.write(b"\xff" * count)
    r = _submit(s, path.read_bytes(), filename="bad.tiff")
    assert r.status_code == 202, r.text
    state = _wait(s["url"], r.json()["id"], s["keys"]["clinic"])
    assert state["status"] == "failed" and "corrupt" in state["error"] and str(s["jobs"]) not in state["error"]
    assert sorted(p.name for p in (s["jobs"] / r.json()["id"]).iterdir()) == ["job.json", "out"]


def test_a_full_slide_queue_is_503_with_retry_after(slide_server):
    """slide_queue=1: a slide still uploading holds the one place, so the next submission is refused."""
    s = slide_server
    url = urlparse(s["url"])
    with socket.create_connection((url.hostname, url.port), timeout=30) as held:
        held.sendall((f"POST /v1/slide-models/wsi/jobs HTTP/1.1\r\nHost: {url.hostname}\r\n"
                      f"Authorization: Bearer {s['keys']['clinic']}\r\nContent-Type: application/octet-stream\r\n"
                      "Content-Length: 1000000\r\n\r\n").encode() + b"II*\0" + b"\0" * 1000)
        deadline, status = time.monotonic() + 10, None
        while status != 503 and time.monotonic() < deadline:
            r = _submit(s, b"not a slide")
            status = r.status_code
            time.sleep(0.1)
        assert status == 503 and int(r.headers["retry-after"]) > 0
    deadline = time.monotonic() + 10  # the abandoned upload releases its place and leaves no folder
    while _submit(s, b"not a slide").status_code != 415:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert all((p / "job.json").is_file() and not (p / "upload.part").exists() for p in s["jobs"].iterdir())
