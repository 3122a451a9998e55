"""Shared fixtures: small generated datasets and one tiny trained run reused across tests."""

from __future__ import annotations

import io
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "2")
# The case cache of every test (and of the CLI processes tests start) in a throwaway folder, never ~/.cache.
if "LEPTON_CACHE" not in os.environ:
    import tempfile

    os.environ["LEPTON_CACHE"] = tempfile.mkdtemp(prefix="lepton-test-cache-")
PYDICOM_FILES = Path(__import__("pydicom").__file__).parent / "data" / "test_files"
NIBABEL_FILES = Path(__import__("nibabel").__file__).parent / "tests" / "data"


def pydicom_file(name: str) -> Path:
    """A DICOM file shipped inside pydicom (never the network-backed get_testdata_file)."""
    path = PYDICOM_FILES / name
    if not path.is_file():
        pytest.skip(f"pydicom does not ship {name}")
    return path


def nibabel_file(name: str) -> Path:
    path = NIBABEL_FILES / name
    if not path.is_file():
        pytest.skip(f"nibabel does not ship {name}")
    return path


def lepton_cmd(*args: str) -> list[str]:
    """Run the CLI through the current interpreter, as a user would run `lepton ...`."""
    return [sys.executable, "-m", "lepton.cli", *args]


def kill_after_epochs(cmd: list[str], run_dir: Path, epochs: int = 2, timeout: float = 240) -> None:
    """Start a training command, SIGKILL it once ``epochs`` epochs are in its history (bounded wait)."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    history = run_dir / "history.csv"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= epochs + 1:  # header + epochs
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def resume_and_rerun(args: list[str], root: Path) -> tuple[list[dict], list[dict]]:
    """Resume ``root/killed`` and train ``args`` afresh as ``root/clean``: both histories, as CSV rows."""
    import csv
    import subprocess

    resumed = subprocess.run(lepton_cmd("train", "--resume", str(root / "killed"), "--quiet"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    clean = subprocess.run(lepton_cmd(*args, "--name", "clean"), capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    return tuple(list(csv.DictReader((root / name / "history.csv").open())) for name in ("killed", "clean"))


@pytest.fixture
def one_thread():
    """One PyTorch thread for the test: on a machine shared by other jobs it is several times faster than two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_npz(tmp_path_factory) -> Path:
    from lepton.data.tools.synthetic import write_synthetic_npz

    return write_synthetic_npz(tmp_path_factory.mktemp("npz") / "synth.npz", n=240, size=32, seed=1)


def write_png_folder(root: Path, n_per_class: int = 12, size: int = 20, seed: int = 0) -> Path:
    """Two classes of PNGs that differ in mean brightness, so a model can learn them."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("normal", "pneumonia")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 100, (size, size)) + 100 * label
            Image.fromarray(arr.astype(np.uint8)).save(root / name / f"{name}_{i:03d}.png")
    return root


@pytest.fixture
def png_folder(tmp_path) -> Path:
    return write_png_folder(tmp_path / "pngs")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synthetic_npz):
    """A trained lepton_cnn run on the synthetic npz (3 epochs, ~10 s)."""
    from lepton.train import train

    out = tmp_path_factory.mktemp("runs")
    return train(synthetic_npz, preset="default", name="tiny", output_dir=str(out), epochs=3, batch_size=32,
                 lr=2e-3, quiet=True, seed=0)


@pytest.fixture(scope="session")
def seg_run(tmp_path_factory):
    """A small 2-D segmentation run (synthetic chest images with opacity masks, a few epochs) and its cases."""
    import lepton
    from lepton.data.tools.synthetic import write_segmentation_cases

    root = tmp_path_factory.mktemp("seg-run")
    cases = write_segmentation_cases(root / "cases", n=16, dims=2, seed=0)
    run = lepton.train(cases, task="segmentation", epochs=4, batch_size=8, time_budget_s=0, quiet=True,
                       output_dir=str(root / "runs"), name="seg", seed=0)
    return run, cases


# -- serving helpers: a real uvicorn server on a free 127.0.0.1 port ----------------------------------
@contextmanager
def running(config):
    """Start uvicorn in a thread on a free loopback port; stop it afterwards (bounded waits)."""
    import uvicorn

    from lepton.serve import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """A registry with cxr v1 (production) and v2 for tenant 'clinic', 'shared' for everyone, and keys."""
    from lepton.evaluate import evaluate
    from lepton.registry import Registry

    root = tmp_path_factory.mktemp("serve")
    run = root / "run"
    shutil.copytree(tiny_run.path, run)
    evaluate(run, split="test", n_bootstrap=20, plots=False)
    reg = Registry.open(root / "reg")
    reg.register_run(run, "cxr")
    reg.register_run(run, "cxr")
    reg.promote("cxr", 1, "production")
    reg.set_tenant("cxr", "clinic")
    reg.register_run(run, "shared")
    keys = {"clinic": reg.create_key("clinic"), "other": reg.create_key("other"),
            "admin": reg.create_key("ops", "admin")}
    return {"registry": str(root / "reg"), "keys": keys, "run": tiny_run, "root": root}


@pytest.fixture(scope="module")
def url(served):
    from lepton.serve import ServeConfig

    config = ServeConfig(models=["cxr@production", "shared"], registry=served["registry"], rate_limit=0)
    with running(config) as base:
        yield base


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def png_bytes(seed: int = 0, size: int = 32) -> bytes:
    from lepton.data.tools.synthetic import make_synthetic

    images, _, _ = make_synthetic(1, size, seed=seed)
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    return buf.getvalue()




# -- Redis: the server .ci/run starts ($LEPTON_TEST_REDIS_URL), else a throwaway redis-server on loopback -----------
@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    import socket
    import subprocess

    url = os.environ.get("LEPTON_TEST_REDIS_URL")
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: .ci/run installs it (Debian package redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    work = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# -- Orthanc: a real PACS with its DICOMweb plugin (Debian's orthanc, orthanc-dicomweb; .ci/run installs them) --------
ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: The running Orthanc processes by base URL (a test may stop one mid-run: a PACS going away).
ORTHANC_PROCS: dict = {}


@contextmanager
def orthanc_server(root: Path, port: int | None = None, dicom: dict | None = None):
    """An Orthanc on loopback with DICOMweb at /dicom-web, its storage under ``root``; yields its base URL and
    stops it afterwards (bounded waits). ``port`` reuses a port (a restart of the same PACS). ``dicom`` turns its
    DIMSE server on: ``{"port": P, "aet": "ORTHANC", "modalities": {"name": [AET, host, port]}}``."""
    import json
    import socket
    import subprocess
    import urllib.request

    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(binary).exists() or not ORTHANC_PLUGIN.exists():
        if os.environ.get("CI"):
            pytest.fail("Orthanc is missing: .ci/run installs it (Debian packages orthanc, orthanc-dicomweb)")
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    root.mkdir(parents=True, exist_ok=True)
    config = {"Name": "lepton-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "DicomServerEnabled": False, "HttpCompressionEnabled": False, "Plugins": [str(ORTHANC_PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False}}
    if dicom:
        config.update({"DicomServerEnabled": True, "DicomPort": dicom["port"], "DicomAet": dicom.get("aet", "ORTHANC"),
                       "DicomModalities": dicom.get("modalities", {}), "DicomCheckCalledAet": True})
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("ab")
    proc = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/system", timeout=2).read()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, (root / "orthanc.log").read_text()[-2000:]
            time.sleep(0.1)
    ORTHANC_PROCS[base] = proc
    try:
        yield base
    finally:
        ORTHANC_PROCS.pop(base, None)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def upload_to_orthanc(base: str, files: list[Path]) -> None:
    """Store DICOM files in Orthanc through its REST API (POST /instances)."""
    import urllib.request

    for path in files:
        request = urllib.request.Request(base + "/instances", data=Path(path).read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
        urllib.request.urlopen(request, timeout=30).read()
