"""The OpenAPI document tells the truth: schemathesis (every check, coverage, fuzzing and stateful phases) finds
no failure against a live server, and a client generated from the document calls predict."""

from __future__ import annotations

import importlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import auth, png_bytes, running
from lepton.serve import ServeConfig

CONFIG = Path(__file__).parent / "schemathesis.toml"


@pytest.fixture(scope="module")
def live(served):
    config = ServeConfig(models=["cxr@production", "shared"], registry=served["registry"], rate_limit=0)
    with running(config) as base:
        yield base


@pytest.fixture(scope="module")
def spec(live):
    return httpx.get(f"{live}/openapi.json").json()


def test_the_document_lists_what_the_server_answers(spec):
    paths = spec["paths"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    predict = paths["/v1/models/{name}/predict"]["post"]
    assert predict["operationId"] == "predict"
    assert {"multipart/form-data", "application/json", "application/octet-stream"} <= set(
        predict["requestBody"]["content"])
    assert {"200", "400", "401", "404", "413", "422", "429", "503"} == set(predict["responses"])
    error = {"$ref": "#/components/schemas/Error"}
    assert predict["responses"]["401"]["content"]["application/json"]["schema"] == error
    assert "Retry-After" in predict["responses"]["429"]["headers"]
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert infer["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OipError"}
    assert set(infer["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert "security" in predict and "security" not in paths["/healthz"]["get"]
    assert "HTTPValidationError" not in str(spec)  # FastAPI's validation body is never sent


def test_the_infer_schema_states_what_the_server_refuses(live, spec, served):
    """Each structural refusal of the infer parser (answered 400) is a request the document already calls invalid,
    so schemathesis' "schema-valid request rejected" check is left with the per-model facts a schema shared by
    every model cannot state (the model's input size; `data`'s length against `shape`)."""
    import jsonschema

    meta = httpx.get(f"{live}/v2/models/cxr", headers=auth(served["keys"]["admin"])).json()
    shape = [1, *meta["inputs"][0]["shape"][1:]]
    n = int(np.prod(shape))
    good = {"name": "input", "datatype": "FP32", "shape": shape, "data": [0.5] * n}
    schema = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert spec["paths"]["/v2/models/{name}/versions/{version}/infer"]["post"]["requestBody"] == \
        spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]
    refused = {
        "an empty input name": {"inputs": [{**good, "name": ""}]},
        "a datatype outside the protocol": {"inputs": [{**good, "datatype": "FP8"}]},
        "an empty shape": {"inputs": [{**good, "shape": []}]},
        "a shape of rank 1": {"inputs": [{**good, "shape": [n]}]},
        "a shape of rank 6": {"inputs": [{**good, "shape": [*shape, 1, 1]}]},
        "an empty dimension": {"inputs": [{**good, "shape": [0, *shape[1:]], "data": []}]},
        "data and binary_data_size": {"inputs": [{**good, "parameters": {"binary_data_size": 4 * n}}]},
        "neither data nor binary_data_size": {"inputs": [{k: v for k, v in good.items() if k != "data"}]},
        "no inputs": {"inputs": []},
        "an empty output name": {"inputs": [good], "outputs": [{"name": ""}]},
    }
    validator = jsonschema.Draft202012Validator(schema)
    for why, body in refused.items():
        assert not validator.is_valid(body), why
        r = httpx.post(f"{live}/v2/models/cxr/infer", json=body, headers=auth(served["keys"]["admin"]))
        assert r.status_code == 400, (why, r.text)
    assert validator.is_valid({"inputs": [good]})
    r = httpx.post(f"{live}/v2/models/cxr/infer", json={"inputs": [good]}, headers=auth(served["keys"]["admin"]))
    assert r.status_code == 200, r.text


def test_a_wrong_method_is_405_with_allow(live):
    r = httpx.request("TRACE", f"{live}/v1/models/cxr/predict")
    assert r.status_code == 405 and "POST" in r.headers["allow"] and r.json()["error"]["code"] == "http_error"
    r = httpx.delete(f"{live}/v2/models/cxr/infer")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and isinstance(r.json()["error"], str)


@pytest.mark.slow
@pytest.mark.parametrize("names", ["served", "any"])
def test_schemathesis_finds_nothing(live, served, tmp_path, names):
    """Two runs: path parameters fixed to the served model (requests reach the model), then free (unknown names
    and versions, so the 404s are exercised too)."""
    exe = Path(sys.executable).parent / "schemathesis"
    config = CONFIG
    if names == "any":
        text = CONFIG.read_text()
        start = text.index("[parameters]")
        config = tmp_path / "schemathesis.toml"
        config.write_text(text[:start] + text[text.index("[[operations]]", start) - 1:].lstrip("\n"))
    cmd = [str(exe), "--config-file", str(config), "run", f"{live}/openapi.json", "--checks", "all",
           "--phases", "examples,coverage,fuzzing,stateful", "--seed", "1", "--workers", "1", "--no-color",
           "-H", f"Authorization: Bearer {served['keys']['admin']}", "--report", "junit",
           "--report-junit-path", str(tmp_path / "junit.xml")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    summary = out.stdout[out.stdout.rfind("SUMMARY"):]
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in summary, summary
    assert "failures" not in summary.split("Test cases:")[-1].split("passed")[0], summary


@pytest.mark.slow
def test_a_generated_client_calls_predict(live, spec, served, tmp_path):
    import json

    (tmp_path / "spec.json").write_text(json.dumps(spec))
    exe = Path(sys.executable).parent / "openapi-python-client"
    out = subprocess.run([str(exe), "generate", "--path", "spec.json", "--meta", "none", "--output-path",
                          "lepton_api"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert (tmp_path / "lepton_api" / "api").is_dir(), out.stdout + out.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        api = importlib.import_module("lepton_api")
        predict = importlib.import_module("lepton_api.api.v1.predict")
        body_type = importlib.import_module("lepton_api.models").PredictFilesBody
        types = importlib.import_module("lepton_api.types")
        client = api.AuthenticatedClient(base_url=live, token=served["keys"]["clinic"])
        with client as c:
            result = predict.sync_detailed("cxr", client=c, body=body_type(
                file=types.File(payload=io.BytesIO(png_bytes()), file_name="x.png")))
        assert result.status_code == 200, result.content
        assert result.parsed.model == "cxr" and result.parsed.additional_properties["label"] in ("normal", "opacity")
        unauthorised = api.Client(base_url=live)
        with unauthorised as c:
            refused = predict.sync_detailed("cxr", client=c, body=body_type(
                file=types.File(payload=io.BytesIO(png_bytes()), file_name="x.png")))
        assert refused.status_code == 401 and refused.parsed.error.code == "unauthorized"
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "lepton_api" or m.startswith("lepton_api.")]:
            del sys.modules[name]
        shutil.rmtree(tmp_path / "lepton_api", ignore_errors=True)
    assert httpx.post(f"{live}/v1/models/cxr/predict", content=png_bytes(),
                      headers=auth(served["keys"]["clinic"])).status_code == 200
