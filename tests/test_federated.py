"""Federated training on Flower's Deployment Engine on loopback: a SuperLink, two SuperNodes (`lepton federate site`)
each with its own share of the data, `lepton federate run` for two rounds; the run directory it writes is a normal
run. And the sites' side alone: what a site sends, FedProx's pull towards the global weights, mismatched sites."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import lepton_cmd

pytest.importorskip("flwr", reason="federated learning needs Flower: pip install 'lepton[federated]'")

from lepton.errors import DataError
from lepton.federated import site


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "a Flower process exited early"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    from lepton.data import load_dataset
    from lepton.data.index.partition import write_partition
    from lepton.data.tools.synthetic import write_synthetic_npz

    root = tmp_path_factory.mktemp("fed")
    source = write_synthetic_npz(root / "source.npz", n=200, size=28, seed=4)
    return write_partition(load_dataset(source), str(source), root / "sites", 2, "iid", seed=0)


def _bin_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def federation(manifests: list[Path], cwd: Path, tls: dict[str, Path] | None = None):
    """A SuperLink and one SuperNode (`lepton federate site`) per manifest on loopback, with TLS when ``tls`` holds
    ``ca``, ``cert`` and ``key``; yields the SuperLink's address and the SuperNode processes, and stops them all."""
    env, procs = _bin_env(), []
    link = _port()
    link_security = (["--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"]), "--ssl-ca-certfile",
                      str(tls["ca"])] if tls else ["--insecure"])
    site_security = ["--root-certificates", str(tls["ca"])] if tls else ["--insecure"]
    try:
        procs.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "flower-superlink"), *link_security,
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link),
             "--health-server-address", f"127.0.0.1:{_port()}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True, cwd=cwd))
        _wait_port(link, procs[0])
        for manifest in manifests:
            procs.append(subprocess.Popen(
                lepton_cmd("federate", "site", "--superlink", f"127.0.0.1:{link}", "--data", str(manifest),
                           "--port", str(_port()), *site_security),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True, cwd=cwd))
        yield f"127.0.0.1:{link}", procs[1:]
    finally:
        _stop(procs)


def test_two_supernodes_train_two_rounds_into_a_normal_run(sites, tmp_path):
    with federation(sites, tmp_path) as (link, _):
        done = subprocess.run(lepton_cmd("federate", "run", "--superlink", link, "--insecure",
                                         "--rounds", "2", "--strategy", "fedprox", "--batch-size", "32",
                                         "--dp-noise", "0.001", "--dp-clip", "100",
                                         "--output-dir", str(tmp_path / "runs"), "--name", "fl"),
                              capture_output=True, text=True, timeout=400, env=_bin_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "fl"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["federated"]["rounds"] == 2 and info["federated"]["sites"] == 2
    assert info["federated"]["strategy"] == "fedprox" and info["federated"]["proximal_mu"] == 0.01
    assert info["federated"]["differential_privacy"] == {
        "mechanism": "central DP, server-side fixed clipping, Gaussian noise (Flower)", "noise_multiplier": 0.001,
        "clipping_norm": 100.0, "sampled_sites": 2}
    assert [int(r["epoch"]) for r in csv.DictReader((run_dir / "history.csv").open())] == [1, 2]
    rows = list(csv.DictReader((run_dir / "sites.csv").open()))
    assert {(r["round"], r["kind"]) for r in rows} == {(str(k), kind) for k in (1, 2) for kind in ("train", "evaluate")}
    assert len({r["site"] for r in rows}) == 2
    assert 0.0 <= info["val_auc"] <= 1.0
    # A normal run: evaluated, registered and loaded like any other.
    from lepton.evaluate import evaluate
    from lepton.registry import Registry

    source = json.loads(sites[0].read_text())["source"]
    report = evaluate(run_dir, source, split="test", n_bootstrap=20, plots=False)
    assert report["images"] > 0 and 0.0 <= report["metrics"]["0.5"]["auc"] <= 1.0
    version = Registry.open(tmp_path / "reg").register_run(run_dir, "federated")
    assert version.version == 1


def _certificates(root: Path) -> dict[str, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it (PEM files under ``root``)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Lepton test CA")])

    def build(subject, public_key, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(hours=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA256())

    ca = build(ca_name, ca_key.public_key(), [(x509.BasicConstraints(ca=True, path_length=None), True)])
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), key.public_key(),
                 [(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)])
    paths = {"ca": root / "ca.pem", "cert": root / "server.pem", "key": root / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def test_a_federation_over_tls(sites, tmp_path):
    """The SuperLink serves HTTPS with a certificate from a private CA; sites and `federate run` trust that CA."""
    import http.client
    import ssl
    import urllib.request

    tls = _certificates(tmp_path)
    with federation(sites, tmp_path, tls) as (link, _):
        trusted = ssl.create_default_context(cafile=str(tls["ca"]))
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP is not served
            urllib.request.urlopen(f"http://{link}/", timeout=5)
        with contextlib.suppress(urllib.error.HTTPError):  # any HTTP answer over a verified TLS connection
            urllib.request.urlopen(f"https://{link}/", timeout=5, context=trusted)
        done = subprocess.run(lepton_cmd("federate", "run", "--superlink", link, "--root-certificates",
                                         str(tls["ca"]), "--rounds", "1", "--batch-size", "32",
                                         "--output-dir", str(tmp_path / "runs"), "--name", "tls"),
                              capture_output=True, text=True, timeout=400, env=_bin_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "tls" / "run.json").read_text())["federated"]["sites"] == 2


def test_a_site_that_drops_out_does_not_stop_the_federation(tmp_path):
    """Three sites, two needed: one SuperNode killed while the rounds run; the federation finishes without it."""
    from lepton.data import load_dataset
    from lepton.data.index.partition import write_partition
    from lepton.data.tools.synthetic import write_synthetic_npz

    source = write_synthetic_npz(tmp_path / "source.npz", n=240, size=28, seed=6)
    manifests = write_partition(load_dataset(source), str(source), tmp_path / "sites", 3, "iid", seed=1)
    with federation(manifests, tmp_path) as (link, nodes):
        run = subprocess.Popen(lepton_cmd("federate", "run", "--superlink", link, "--insecure",
                                          "--rounds", "3", "--min-sites", "2", "--batch-size", "32", "--timeout", "20",
                                          "--output-dir", str(tmp_path / "runs"), "--name", "dropout"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_bin_env(),
                               cwd=tmp_path)
        try:
            time.sleep(15)  # the sites have described their data and round 1 is under way
            assert run.poll() is None, run.stdout.read()[-3000:]
            os.killpg(nodes[-1].pid, signal.SIGKILL)
            out, _ = run.communicate(timeout=400)
        finally:
            if run.poll() is None:
                run.kill()
    assert run.returncode == 0, out[-3000:]
    run_dir = tmp_path / "runs" / "dropout"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["federated"]["rounds"] == 3
    rows = list(csv.DictReader((run_dir / "sites.csv").open()))
    last = {r["site"] for r in rows if r["round"] == "3" and r["kind"] == "train"}
    assert len(last) == 2  # the two sites still there carried the last round


def test_simulation_engine_runs_the_same_federation(synthetic_npz, tmp_path):
    pytest.importorskip("ray", reason="the simulation engine needs Ray: pip install 'lepton[simulation]'")
    done = subprocess.run(lepton_cmd("federate", "simulate", str(synthetic_npz), "--sites", "2", "--scheme",
                                     "label-skew", "--alpha", "1", "--rounds", "2", "--batch-size", "32",
                                     "--output-dir", str(tmp_path), "--name", "sim"),
                          capture_output=True, text=True, timeout=400, env=_bin_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    info = json.loads((tmp_path / "sim" / "run.json").read_text())
    assert info["federated"]["sites"] == 2 and info["federated"]["rounds"] == 2
    assert sorted(p.name for p in (tmp_path / "sim-sites").iterdir()) == ["site-0.json", "site-1.json"]
    assert json.loads((tmp_path / "sim-sites" / "site-0.json").read_text())["scheme"] == "label-skew"


def _context(data: str, node_id: int = 7):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=node_id, node_config={"data": data}, state=RecordDict(), run_config={})


def _message(kind: str, content):
    """A message as a SuperNode's ClientApp process receives it (that process's identity set first, as Flower
    does before it calls the app)."""
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    return Message(content=content, dst_node_id=7, message_type=kind)


def test_what_a_site_sends_is_weights_and_numbers_only(sites):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from lepton.federated import apps

    data = str(sites[0])
    spec = json.loads(sites[0].read_text())
    settings = {"batch-size": 32, "augment": "none"}
    handlers = apps.client_app.handlers
    described = handlers["query"](_message("query", RecordDict({"config": ConfigRecord(settings)})), _context(data))
    summary = json.loads(described.content["summary"]["summary"])
    agreed = site.agree({"7": summary})
    from lepton.data.transforms.preprocessing import Preprocessing
    from lepton.models import create_model

    model = site.model_spec_for(site.SiteSettings.from_config(settings), Preprocessing.from_dict(agreed["spec"]),
                                agreed["label_names"])

    net = create_model(**model)
    config = ConfigRecord({**settings, "spec": json.dumps(agreed["spec"]), "server-round": 1})
    weights = ArrayRecord(net.state_dict())
    trained = handlers["train"](_message("train", RecordDict({"arrays": weights, "config": config})), _context(data))
    evaluated = handlers["evaluate"](_message("evaluate", RecordDict({"arrays": weights, "config": config})),
                                     _context(data))
    assert set(trained.content["arrays"].keys()) == set(net.state_dict())  # the network's parameters, no more
    forbidden = [data, Path(data).name, Path(spec["source"]).name, "#train", "#val"]
    for reply in (described, trained, evaluated):
        for name, record in reply.content.items():
            if name == "arrays":
                continue
            text = json.dumps({k: v for k, v in record.items()}, default=str)
            assert not any(f in text for f in forbidden), f"{name} carries a path or name: {text[:300]}"
            for value in record.values():
                assert isinstance(value, int | float) or name == "summary", (name, value)
    assert set(summary) == {"label_names", "size", "channels", "train", "val", "train_per_class", "sum", "sumsq",
                            "count", "window", "slices"}
    assert trained.content["metrics"]["num-examples"] == summary["train"]


def test_sites_that_differ_are_refused_by_name():
    base = {"label_names": ["a", "b"], "size": [28, 28], "channels": 1, "train": 10, "val": 2,
            "train_per_class": [5, 5], "sum": [1.0], "sumsq": [1.0], "count": 100.0, "window": None,
            "slices": "middle"}
    with pytest.raises(DataError, match="site 2 has label set"):
        site.agree({"1": base, "2": {**base, "label_names": ["a", "c"]}})
    with pytest.raises(DataError, match="site 2 has image size"):
        site.agree({"1": base, "2": {**base, "size": [32, 32]}})
    agreed = site.agree({"1": base, "2": {**base, "sum": [3.0], "sumsq": [3.0]}})
    assert agreed["spec"]["mean"] == pytest.approx([0.02])  # pooled over both sites' pixels


def test_fedprox_keeps_a_site_near_the_global_weights(sites):
    from lepton.data.transforms.preprocessing import Preprocessing
    from lepton.models import create_model

    settings0 = site.SiteSettings(batch_size=16, augment="none", local_epochs=2, lr=3e-3)
    summary = site.describe(str(sites[0]), settings0)
    agreed = site.agree({"0": summary})
    spec = Preprocessing.from_dict(agreed["spec"])
    torch.manual_seed(0)
    start = create_model(**site.model_spec_for(settings0, spec, agreed["label_names"])).state_dict()

    def drift(mu: float) -> float:
        settings = site.SiteSettings(batch_size=16, augment="none", local_epochs=2, lr=3e-3, proximal_mu=mu)
        weights, _ = site.train(str(sites[0]), settings, spec, {k: v.clone() for k, v in start.items()}, 1)
        return float(sum(((weights[k] - start[k].float()) ** 2).sum() for k in start if start[k].is_floating_point()))

    assert drift(10.0) < 0.8 * drift(0.0)


def test_run_config_is_checked():
    from lepton.errors import ConfigError
    from lepton.federated.deploy import flower_home, run_config_arg

    assert run_config_arg({"rounds": 2, "name": "x", "lr": 0.001}) == 'rounds=2 name="x" lr=0.001'
    with pytest.raises(ConfigError, match="unknown federation setting"):
        run_config_arg({"epochs": 2})
    with pytest.raises(ConfigError, match="quotes"):
        run_config_arg({"name": 'a"b'})
    with pytest.raises(ConfigError, match="--root-certificates"):
        flower_home("127.0.0.1:9093", False, None, Path("/nonexistent"))


@pytest.mark.parametrize("key,value", [("lr", float("nan")), ("lr", float("inf")), ("lr", 0.0), ("rounds", 2.5),
                                       ("rounds", 0), ("fraction", 0.0), ("fraction", 1.5), ("timeout", float("inf")),
                                       ("batch-size", True), ("proximal-mu", -1.0), ("dp-noise", float("nan")),
                                       ("secagg-clip", 0.0), ("local-epochs", "2"), ("seed", -1)])
def test_federation_settings_are_finite_and_bounded_wherever_they_enter(key, value):
    from lepton.errors import ConfigError
    from lepton.federated import check_settings
    from lepton.federated.deploy import run_config_arg
    from lepton.federated.site import SiteSettings

    for enter in (run_config_arg, check_settings, SiteSettings.from_config):
        if enter == SiteSettings.from_config and key not in site_keys():
            continue
        with pytest.raises(ConfigError, match=f"federation setting {key} must be"):
            enter({key: value})


def site_keys() -> set[str]:
    from lepton.federated.site import DEFAULTS

    return set(DEFAULTS)


def test_whole_numbers_sent_as_floats_are_taken():
    from lepton.federated.deploy import run_config_arg
    from lepton.federated.site import SiteSettings

    assert run_config_arg({"rounds": 3.0, "lr": 0.01}) == "rounds=3 lr=0.01"
    assert SiteSettings.from_config({"batch-size": 32.0}).batch_size == 32
