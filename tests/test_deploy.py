"""deploy/ and the Dockerfile, checked offline: Kubernetes objects against the Kubernetes JSON schemas, KServe and
Kubeflow Trainer objects against their vendored CRD schemas (unknown fields rejected, as kubectl's strict field
validation does), the compose file against the Compose Specification, the Grafana dashboard against the metrics
the server exports; and the container's entrypoint run outside a container against a real server."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from conftest import auth

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
K8S_VERSION = "1.33"  # the Kubernetes release the manifests are checked against


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _schema(name: str) -> dict:
    return json.loads(gzip.decompress((SCHEMAS / name).read_bytes()))


def _strict(schema: object) -> object:
    """A CRD schema that rejects unknown fields (the API server prunes them silently; kubectl --validate=strict,
    the default, refuses them): objects with listed properties and no other allowance get additionalProperties
    false."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _validate_crd(doc: dict, schema_file: str) -> None:
    import jsonschema

    schema = _strict(_schema(schema_file))
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    errors = sorted(jsonschema.Draft7Validator({**schema, "properties": {
        k: v for k, v in schema["properties"].items() if k not in ("apiVersion", "kind", "metadata")}}).iter_errors(
        body), key=lambda e: list(e.absolute_path))
    assert not errors, "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])


# -- Kubernetes ------------------------------------------------------------------------------------------------
def test_kubernetes_objects_validate_against_the_kubernetes_schemas():
    import kubernetes_validate

    docs = _docs(DEPLOY / "k8s" / "lepton.yaml")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "PodDisruptionBudget",
                     "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in container["env"]}
    assert env["LEPTON_DB_URL"]["valueFrom"]["secretKeyRef"]["name"] == "lepton-registry"  # never a literal URL
    assert pod["securityContext"]["runAsNonRoot"] is True
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for doc in docs:  # the Service, PDB and HPA reach the Deployment's pods
        selector = doc["spec"].get("selector", {})
        selector = selector.get("matchLabels", selector)
        assert all(labels.get(k) == v for k, v in selector.items())
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_a_broken_kubernetes_object_is_caught():
    import kubernetes_validate

    doc = next(d for d in _docs(DEPLOY / "k8s" / "lepton.yaml") if d["kind"] == "Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kserve_runtime_and_inference_service_validate_against_their_crds():
    runtime, = _docs(DEPLOY / "k8s" / "kserve" / "servingruntime.yaml")
    service, = _docs(DEPLOY / "k8s" / "kserve" / "inferenceservice.yaml")
    _validate_crd(runtime, "serving.kserve.io_ServingRuntime_v1alpha1.json.gz")
    _validate_crd(service, "serving.kserve.io_InferenceService_v1beta1.json.gz")
    container = runtime["spec"]["containers"][0]
    # What KServe expects of a runtime, and what `lepton serve` must accept.
    assert container["name"] == "kserve-container" and "v2" in runtime["spec"]["protocolVersions"]
    assert {"--model_name={{.Name}}", "--model_dir=/mnt/models", "--http_port=8080"} <= set(container["args"])
    assert service["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    assert service["spec"]["predictor"]["model"]["modelFormat"]["name"] in {
        f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    bad = json.loads(json.dumps(runtime))
    bad["spec"]["containers"][0]["argz"] = bad["spec"]["containers"][0].pop("args")
    with pytest.raises(AssertionError, match="argz"):
        _validate_crd(bad, "serving.kserve.io_ServingRuntime_v1alpha1.json.gz")


def test_trainjob_validates_and_runs_lepton_under_torchrun():
    job, = _docs(DEPLOY / "k8s" / "trainjob.yaml")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    _validate_crd(job, "trainer.kubeflow.org_TrainJob_v1alpha1.json.gz")
    command = job["spec"]["trainer"]["command"]
    assert command[0] == "torchrun" and command[command.index("-m") + 1:command.index("-m") + 3] == ["lepton", "train"]
    assert "--name" in command  # restarts resume the same run directory
    # The command's options are ones `lepton train` has.
    from typer.testing import CliRunner

    from lepton.cli import app

    helptext = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for option in (c.split("=")[0] for c in command[command.index("train") + 1:] if c.startswith("--")):
        assert option in helptext, option


def test_rayjob_runs_lepton_predict_on_ray_and_its_pod_templates_validate():
    """The KubeRay RayJob: no KubeRay CRD schema is vendored here (none ships in a package this project installs),
    so its two pod templates are validated as Kubernetes PodTemplates (strict), the RayJob fields it uses are checked
    by name, and its entrypoint's options are ones `lepton predict` has."""
    import shlex

    import kubernetes_validate

    job, = _docs(DEPLOY / "k8s" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert set(spec) <= {"entrypoint", "submissionMode", "backoffLimit", "shutdownAfterJobFinishes",
                         "ttlSecondsAfterFinished", "rayClusterSpec", "runtimeEnvYAML", "activeDeadlineSeconds"}
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling"}
    groups = [("head", cluster["headGroupSpec"]), *((g["groupName"], g) for g in cluster["workerGroupSpecs"])]
    for name, group in groups:
        assert set(group) <= {"rayStartParams", "template", "groupName", "replicas", "minReplicas", "maxReplicas",
                              "serviceType"}, name
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name  # KubeRay takes strings
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                                      "template": group["template"]}, K8S_VERSION, strict=True)
        pod = group["template"]["spec"]
        volumes = {v["name"] for v in pod["volumes"]}
        assert {m["name"] for c in pod["containers"] for m in c["volumeMounts"]} <= volumes, name
        assert pod["securityContext"]["runAsNonRoot"] is True
    for _, group in groups[1:]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    ray = pytest.importorskip("ray")
    assert cluster["rayVersion"] == ray.__version__  # the image's Ray is the one the tests ran
    command = shlex.split(spec["entrypoint"])
    assert command[:2] == ["lepton", "predict"] and command[command.index("--engine") + 1] == "ray"
    head_mounts = {m["mountPath"] for m in cluster["headGroupSpec"]["template"]["spec"]["containers"][0][
        "volumeMounts"]}
    output = command[command.index("--output") + 1]
    assert output.endswith(".parquet") and any(output.startswith(m + "/") for m in head_mounts)
    from typer.testing import CliRunner

    from lepton.cli import app

    helptext = CliRunner().invoke(app, ["predict", "--help"], env={"COLUMNS": "200"}).output
    for option in (c for c in command[2:] if c.startswith("--")):
        assert option in helptext, option


# -- compose, Prometheus, Grafana -----------------------------------------------------------------------------
def test_compose_file_validates_against_the_compose_specification():
    import jsonschema

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.Draft7Validator(_schema("compose-spec.json.gz")).validate(compose)
    services = compose["services"]
    assert {"lepton", "postgres", "prometheus", "grafana"} <= set(services)
    for service in services.values():  # every bind-mounted file or folder is in the repository
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and "bundles" not in source:
                assert (DEPLOY / source).exists(), source
    assert "build" in services["lepton"] and (DEPLOY / services["lepton"]["build"]["context"] /
                                              services["lepton"]["build"]["dockerfile"]).is_file()
    for service in services.values():  # secrets come from secrets, not literals in the file
        for key in service.get("environment") or {}:
            assert "PASSWORD" not in key or key.endswith("_FILE"), key
    bad = json.loads(json.dumps(compose))
    bad["services"]["lepton"]["helthcheck"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(_schema("compose-spec.json.gz")).validate(bad)


def _exported_metrics() -> set[str]:
    from lepton.serve.metrics import Metrics

    text = Metrics().render().decode()
    return {re.sub(r"_(bucket|sum|count|total)$", "", m) for m in re.findall(r"^# TYPE (\w+) ", text, re.M)}


def _metric_names(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count|total)$", "", m) for m in re.findall(r"\blepton_\w+", expr)}


def test_grafana_dashboard_loads_and_charts_metrics_the_server_exports():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "lepton.json").read_text())
    exported = _exported_metrics()
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    wanted = {"request rate", "p50", "p99", "batch size", "queue depth", "drift", "predictions per class"}
    titles = " ".join(p["title"].lower() for p in panels)
    assert all(w in titles for w in wanted), titles
    cells = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == uid
        g = panel["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells and g["x"] + g["w"] <= 24, f"panel {panel['title']} overlaps or overflows"
        cells |= area
        for target in panel["targets"]:
            names = _metric_names(target["expr"])
            assert names and names <= exported, f"{panel['title']}: {names - exported} not exported"
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "lepton.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]


def test_prometheus_scrapes_lepton_and_loads_the_alert_rules():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"] if v.startswith("."))
    assert mounts["./prometheus/alerts.yml"] in config["rule_files"]
    job, = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["lepton:8080"]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exported = _exported_metrics()
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        assert _metric_names(rule["expr"]) <= exported, rule["alert"]
    promtool = shutil.which("promtool")
    if promtool:  # the whole configuration, with the rules where the container finds them
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"lepton-prom-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp / "alerts.yml")
        (tmp / "prometheus.yml").write_text(yaml.safe_dump({**config, "rule_files": [str(tmp / "alerts.yml")]}))
        done = subprocess.run([promtool, "check", "config", str(tmp / "prometheus.yml")], capture_output=True,
                              text=True, timeout=60)
        shutil.rmtree(tmp)
        assert done.returncode == 0, done.stdout + done.stderr


# -- the image -------------------------------------------------------------------------------------------------
def test_dockerfile_runs_as_a_user_checks_readiness_and_bakes_no_model_by_default():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    final = stages[-1]
    assert final.strip() == "runtime", "the default target is the plain runtime (no model)"
    runtime = next(s for s in stages if s.split()[2:3] == ["runtime"])
    assert re.search(r"^USER 10001", runtime, re.M) and "HEALTHCHECK" in runtime and "/readyz" in runtime
    assert "ENTRYPOINT [\"lepton-entrypoint\"]" in runtime
    for source in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+) ", text, re.M):
        if not source.startswith("$"):
            assert (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored


# -- the entrypoint, outside a container ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entrypoint(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.Popen(["sh", str(DEPLOY / "docker" / "entrypoint.sh"), *args],
                            env={**os.environ, "PATH": path, "LEPTON_HOST": "127.0.0.1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} never became ready")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_entrypoint_serves_a_kserve_model_folder(served, tmp_path):
    from lepton.registry import Registry

    models = tmp_path / "mnt-models"
    models.mkdir()
    Registry.open(served["registry"]).export_bundle("cxr@1", models / "cxr.lepton")
    keys = tmp_path / "keys"
    keys.write_text(f"# tenant scope key\nclinic predict {served['keys']['clinic']}\n")
    port = _free_port()
    # The ServingRuntime's own arguments, as KServe passes them.
    proc = _entrypoint(["serve", "--model_name=chest", "--model_dir", str(models), f"--http_port={port}"],
                       {"LEPTON_KEYS_FILE": str(keys), "LEPTON_PORT": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(proc, f"{base}/v2/health/ready")  # the probe KServe uses: no key needed
        key = auth(served["keys"]["clinic"])
        assert httpx.get(f"{base}/v2/models/chest/ready", headers=key).status_code == 200
        tensor = np.random.default_rng(0).uniform(size=(1, 1, 32, 32)).astype(np.float32)  # 0-1 pixels
        body = {"inputs": [{"name": "input", "shape": list(tensor.shape), "datatype": "FP32",
                            "data": tensor.ravel().tolist()}]}
        answer = httpx.post(f"{base}/v2/models/chest/infer", json=body, headers=key, timeout=60)
        assert answer.status_code == 200, answer.text
        assert httpx.post(f"{base}/v2/models/chest/infer", json=body, timeout=60).status_code == 401
        other = auth(served["keys"]["other"])  # a key of the source registry that is not in the keys file
        assert httpx.post(f"{base}/v2/models/chest/infer", json=body, headers=other, timeout=60).status_code == 401
    finally:
        _stop(proc)


def test_entrypoint_reads_the_registry_url_from_a_secret_file(served, tmp_path):
    secret = tmp_path / "db_url"
    secret.write_text(f"sqlite:///{Path(served['registry']) / 'registry.db'}")
    port = _free_port()
    proc = _entrypoint([], {"LEPTON_DB_URL_FILE": str(secret), "LEPTON_MODELS": "cxr@production,shared",
                            "LEPTON_PORT": str(port), "LEPTON_HOME": str(Path(served["registry"]))})
    try:
        _wait(proc, f"http://127.0.0.1:{port}/readyz")
        assert set(httpx.get(f"http://127.0.0.1:{port}/readyz").json()["models"]) == {"cxr", "shared"}
    finally:
        _stop(proc)


@pytest.mark.parametrize(("env", "message"), [
    ({"LEPTON_DB_URL_FILE": "/nonexistent/secret"}, "LEPTON_DB_URL_FILE=/nonexistent/secret is not a readable"),
    ({"LEPTON_MODELS": ""}, "nothing to serve"),
])
def test_entrypoint_refuses_a_missing_secret_or_an_empty_model_list(env, message):
    proc = _entrypoint([], env)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 64 and message in out


def test_model_dir_errors_name_the_folder_and_the_fix(tmp_path, served):
    from lepton.errors import ConfigError
    from lepton.registry import Registry
    from lepton.serve.modeldir import find_bundle, read_keys, registry_from_model_dir

    with pytest.raises(ConfigError, match="expected one Lepton bundle .* found nothing"):
        find_bundle(tmp_path)
    with pytest.raises(ConfigError, match="no such folder"):
        find_bundle(tmp_path / "missing")
    bundle = tmp_path / "cxr.lepton"
    Registry.open(served["registry"]).export_bundle("cxr@1", bundle)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    import tarfile

    with tarfile.open(bundle) as tar:
        tar.extractall(unpacked, filter="data")
    location = registry_from_model_dir(unpacked, "chest", root=tmp_path / "reg")  # KServe unpacked a .tar.gz
    assert Registry.open(location).get("chest").version == 1
    (tmp_path / "keys").write_text("clinic predict\n")
    with pytest.raises(ConfigError, match="line 1: expected TENANT SCOPE KEY"):
        read_keys(tmp_path / "keys")
    (tmp_path / "keys").write_text("clinic predict not-a-key\n")
    with pytest.raises(ConfigError, match="key 1: not a Lepton API key") as info:
        registry_from_model_dir(unpacked, "chest", tmp_path / "keys", root=tmp_path / "reg2")
    assert "not-a-key" not in str(info.value)  # keys are never echoed
    (unpacked / "artifacts" / next(iter(os.listdir(unpacked / "artifacts")))).write_bytes(b"tampered")
    with pytest.raises(ConfigError, match="--model-dir"):
        registry_from_model_dir(unpacked, "chest", root=tmp_path / "reg3")
