"""Nothing invalid is ever stored, and a client's mistake is its 4xx: route weights that overflow the registry's
arithmetic, integral floats where JSON Schema says integer, malformed multipart bodies and oversized bodies, each
against a real uvicorn server on loopback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import httpx
import numpy as np
import pytest

from conftest import auth, png_bytes, running


@pytest.fixture(scope="module")
def live(served):
    from lepton.serve import ServeConfig

    config = ServeConfig(models=["cxr@production", "shared"], registry=served["registry"], rate_limit=0,
                         max_upload_bytes=8 << 20)
    with running(config) as base:
        yield base


@pytest.fixture(scope="module")
def registry(served):
    from lepton.registry import Registry

    return Registry.open(served["registry"])


def put_route(live, served, body: dict | str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.put(f"{live}/v1/admin/models/cxr/route", content=content, timeout=30,
                     headers={**auth(served["keys"]["admin"]), "content-type": "application/json"})


def served_route(live, served) -> dict | None:
    return httpx.get(f"{live}/v1/models/cxr", headers=auth(served["keys"]["admin"]), timeout=30).json()["route"]


@pytest.mark.parametrize("weights", ['{"1": 1e308}', '{"1": 1e308, "2": 1e308}', '{"1": 2e6}', '{"1": 1e309}',
                                     '{"1": -1e309}', '{"1": NaN}', '{"1": 0, "2": 0}', '{"1": -0.5, "2": 1}',
                                     '{"1": true}', '{"1": "1"}'])
def test_route_weights_out_of_bounds_are_422_and_the_stored_route_is_unchanged(live, served, registry, weights):
    before = put_route(live, served, {"weights": {"1": 90, "2": 10}})
    assert before.status_code == 200, before.text
    stored = registry.get_route("cxr")
    r = put_route(live, served, f'{{"weights": {weights}}}')
    assert r.status_code == 422, r.text
    assert "weights" in r.json()["error"]["message"], r.text
    assert registry.get_route("cxr") == stored
    assert served_route(live, served) == {"1": 90.0, "2": 10.0}


def test_the_route_document_states_the_bounds(live):
    spec = httpx.get(f"{live}/openapi.json", timeout=30).json()
    weights = spec["components"]["schemas"]["RouteRequest"]["properties"]["weights"]
    (value,) = weights["patternProperties"].values()
    assert value["minimum"] == 0 and value["maximum"] == 1e6
    assert weights["not"] == {"patternProperties": {"^[1-9][0-9]{0,8}$": {"maximum": 0}}}  # one above 0


@pytest.mark.parametrize("weights", [{"1": 1, "2": 2}, {"1": 1e6, "2": 1e-6}, {"1": 0.1, "2": 0.2}, {"2": 7},
                                     {"1": 1e6, "2": 1e6}, {"1": 3, "2": 0}, {"1": 5e-324}, {"1": 5e-324, "2": 1}])
def test_a_route_read_back_equals_the_route_acknowledged(live, served, registry, weights):
    r = put_route(live, served, {"weights": weights, "shadow": 2})
    assert r.status_code == 200, r.text
    acknowledged = r.json()["weights"]
    stored = registry.get_route("cxr")
    assert {str(v): w for v, w in stored.weights.items()} == acknowledged and stored.shadow == 2
    assert served_route(live, served) == acknowledged
    assert all(w > 0 for w in acknowledged.values()) and abs(sum(acknowledged.values()) - 100) < 1e-3


def test_integral_float_shapes_infer(live, served):
    x = np.random.default_rng(0).random((2, 1, 32, 32)).astype(np.float32)
    key = auth(served["keys"]["clinic"])
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2.0, 1.0, 32.0, 32.0],
                        "data": x.ravel().tolist()}]}
    r = httpx.post(f"{live}/v2/models/cxr/infer", json=body, headers=key, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"][0] == 2
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32.0, 32],
                                   "parameters": {"binary_data_size": 4096.0}}]}).encode()
    r = httpx.post(f"{live}/v2/models/cxr/infer", content=head + x[:1].tobytes(), timeout=60,
                   headers={**key, "Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    body["inputs"][0]["shape"] = [2.5, 1, 32, 32]
    r = httpx.post(f"{live}/v2/models/cxr/infer", json=body, headers=key, timeout=60)
    assert r.status_code == 400 and "integers" in r.json()["error"], r.text


def test_integral_floats_are_integers_in_the_native_api_too(live, served, registry):
    admin = auth(served["keys"]["admin"])
    r = httpx.post(f"{live}/v1/admin/models/cxr/promote", json={"version": 1.0, "stage": "production"},
                   headers=admin, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    r = put_route(live, served, {"weights": {"1": 1}, "shadow": 2.0})
    assert r.status_code == 200 and r.json()["shadow"] == 2 and registry.get_route("cxr").shadow == 2, r.text
    r = httpx.get(f"{live}/v1/models/cxr/diff?a=1.0&b=2", headers=admin, timeout=60)
    assert r.status_code == 200 and r.json()["a"] == "cxr@1", r.text
    for shadow in (2.5, True, "2"):
        r = put_route(live, served, {"weights": {"1": 1}, "shadow": shadow})
        assert r.status_code == 422 and "shadow" in r.json()["error"]["message"], r.text
    for version in (True, "1", 1.5):  # JSON true is not the version 1 (pydantic's lax mode would take it)
        r = httpx.post(f"{live}/v1/admin/models/cxr/promote", json={"version": version, "stage": "staging"},
                       headers=admin, timeout=60)
        assert r.status_code == 422 and "version" in r.json()["error"]["message"], r.text
    spec = httpx.get(f"{live}/openapi.json", timeout=30).json()
    for path in ("/v1/admin/models/{name}/route", "/v1/admin/models/{name}/promote"):
        assert "413" in next(iter(spec["paths"][path].values()))["responses"]


def test_an_output_asking_for_binary_data_with_a_non_boolean_is_400(live, served):
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.5] * 1024}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": 1}}]}
    r = httpx.post(f"{live}/v2/models/cxr/infer", json=body, headers=auth(served["keys"]["clinic"]), timeout=60)
    assert r.status_code == 400 and "binary_data must be true or false" in r.json()["error"], r.text


@pytest.mark.parametrize("window", ["nan,400", "40,inf", "1e308,400"])
def test_a_view_window_out_of_bounds_is_422(live, served, window):
    r = httpx.post(f"{live}/v1/view", params={"window": window}, content=png_bytes(), timeout=60,
                   headers=auth(served["keys"]["clinic"]))
    assert r.status_code == 422 and "CENTER must be a finite number" in r.json()["error"]["message"], r.text


def test_structure_is_checked_before_limits(live, served):
    """A later tensor's negative dimension is the 400, even when an earlier one is over the size limit."""
    body = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [10**9, 10**9], "data": []},
                       {"name": "b", "datatype": "FP32", "shape": [-1], "data": []}]}
    r = httpx.post(f"{live}/v2/models/cxr/infer", json=body, headers=auth(served["keys"]["clinic"]), timeout=60)
    assert r.status_code == 400 and "input 'b'" in r.json()["error"], r.text


MULTIPART = {
    "boundary mismatch": (b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
                          b"abc\r\n--zzz--\r\n", "abc", "boundary"),
    "missing final delimiter": (b'--abc\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
                                b"abc", "abc", "closing delimiter"),
    "part without headers": (b"--abc\r\n\r\nabc\r\n--abc--\r\n", "abc", "no headers"),
    "part without a name": (b"--abc\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--abc--\r\n", "abc", "name"),
    "no boundary parameter": (b"--abc\r\n\r\nabc\r\n--abc--\r\n", None, "boundary"),
}


@pytest.mark.parametrize("case", sorted(MULTIPART))
@pytest.mark.parametrize("path", ["/v1/models/cxr/predict", "/v1/models/cxr/predict?dicom_seg=false"])
def test_malformed_multipart_is_400_naming_the_problem(live, served, case, path):
    body, boundary, needle = MULTIPART[case]
    ctype = "multipart/form-data" + (f"; boundary={boundary}" if boundary else "")
    r = httpx.post(live + path, content=body, timeout=30,
                   headers={**auth(served["keys"]["clinic"]), "content-type": ctype})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_multipart" and needle in r.json()["error"]["message"], r.text
    ok = httpx.post(live + path, files={"file": ("x.png", png_bytes())}, headers=auth(served["keys"]["clinic"]),
                    timeout=60)
    assert ok.status_code == 200, ok.text


def _urlopen(url: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    """urllib sends ``Connection: close`` and reads the answer only after the whole body is sent: the client that
    sees a reset when a server answers early and closes."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_an_oversized_json_body_is_a_413_the_client_reads(live, served):
    body = json.dumps({"array": [0.5] * 5_400_000}).encode()  # 27 MB; the server takes 8 MB
    assert len(body) > 26_000_000
    headers = {**auth(served["keys"]["clinic"]), "content-type": "application/json"}
    status, answer = _urlopen(f"{live}/v1/models/cxr/predict", body, headers)
    assert status == 413 and json.loads(answer)["error"]["code"] == "payload_too_large"
    status, answer = _urlopen(f"{live}/v2/models/cxr/infer", body, headers)
    assert status == 413 and "over" in json.loads(answer)["error"]
    # refused before the body is read (unknown model): still an answer, not a reset
    status, answer = _urlopen(f"{live}/v1/models/nothere/predict", body[: 4 << 20], headers)
    assert status == 404 and json.loads(answer)["error"]["code"]


def test_a_chunked_body_over_the_limit_is_413_without_being_read_whole(live, served):
    def chunks():
        for _ in range(27):
            yield b"0" * (1 << 20)

    r = httpx.post(f"{live}/v1/models/cxr/predict", content=chunks(), timeout=60,
                   headers={**auth(served["keys"]["clinic"]), "content-type": "application/octet-stream"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
    r = httpx.put(f"{live}/v1/admin/models/cxr/route", content=chunks(), timeout=60,  # a JSON body FastAPI reads
                  headers={**auth(served["keys"]["admin"]), "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
    r = httpx.post(f"{live}/v2/models/cxr/infer", content=chunks(), timeout=60, headers=auth(served["keys"]["clinic"]))
    assert r.status_code == 413 and "over" in r.json()["error"], r.text
    assert httpx.post(f"{live}/v1/models/cxr/predict", content=png_bytes(), timeout=60,
                      headers=auth(served["keys"]["clinic"])).status_code == 200


@pytest.mark.parametrize("key,value", [("max_batch_size", 0), ("max_batch_size", 2.5), ("max_wait_ms", float("nan")),
                                       ("max_wait_ms", float("inf")), ("batch_idle_ms", -1.0), ("max_queue", 0),
                                       ("model_concurrency", -1), ("max_upload_bytes", 0), ("rate_limit", float("inf")),
                                       ("rate_limit", -5.0), ("rate_burst", 0), ("poll_seconds", float("nan")),
                                       ("key_cache_seconds", 1e9), ("max_queue", True)])
def test_server_settings_are_finite_and_bounded(key, value):
    from lepton.errors import ConfigError
    from lepton.serve import ServeConfig
    from lepton.serve.config import BOUNDS

    assert key in BOUNDS
    with pytest.raises(ConfigError, match=f"^{key} must be"):
        ServeConfig(models=["cxr"], **{key: value})
    assert ServeConfig(models=["cxr"], max_batch_size=8.0).max_batch_size == 8  # a whole number as 8.0


def test_every_bound_names_a_setting():
    import dataclasses

    from lepton.serve import ServeConfig
    from lepton.serve.config import BOUNDS

    assert set(BOUNDS) <= {f.name for f in dataclasses.fields(ServeConfig)}
