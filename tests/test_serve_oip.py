"""The Open Inference Protocol v2 as real clients speak it: tritonclient's HTTP clients (sync and asyncio) with
their default binary tensor data and with JSON, against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import struct

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from conftest import auth
from lepton.serve.tensors import InferRequest, encode_infer_response, parse_infer_request


def images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def client(url):
    with triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=60) as c:
        yield c


def test_server_and_model_metadata(client, served):
    headers = auth(served["keys"]["clinic"])
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.is_model_ready("cxr", headers=headers) and client.is_model_ready("cxr", "1", headers=headers)
    meta = client.get_model_metadata("cxr", headers=headers)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
    cost = meta["parameters"]["cost"]  # the version's measured cost, and the figures of the precision it runs in
    assert cost["forward_passes_per_image"] == 1 and cost["served"]["precision"] == "fp32"
    assert cost["served"]["ms_per_image_b1"] == cost["precisions"]["fp32"]["ms_per_image_b1"] > 0


def test_default_call_sends_and_receives_binary_tensors(client, served):
    x = images()
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary_data=True is tritonclient's default; no outputs named: all binary
    result = client.infer("cxr", [inp], request_id="r-1", headers=auth(served["keys"]["clinic"]))
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_version"] == "1"
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    expected = served["run"].predict_proba(list(x))
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    labels = [served["run"].label_names[k] for k in served["run"].decide(expected)]
    assert [v.decode() for v in result.as_numpy("label")] == labels


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_json_and_binary_mixed(client, served, binary_in, binary_out):
    x = images(2, seed=3)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary_out)]
    result = client.infer("cxr", [inp], model_version="1", outputs=outputs, headers=auth(served["keys"]["clinic"]))
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]
    np.testing.assert_allclose(result.as_numpy("probabilities"), served["run"].predict_proba(list(x)), atol=1e-5)


def test_asyncio_client(url, served):
    async def call():
        async with triton_aio.InferenceServerClient(url.removeprefix("http://")) as c:
            x = images(4, seed=5)
            inp = triton_aio.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            results = await asyncio.gather(*(c.infer("cxr", [inp], headers=auth(served["keys"]["clinic"]))
                                             for _ in range(3)))
            return x, [r.as_numpy("probabilities") for r in results]

    x, outs = asyncio.run(call())
    for out in outs:
        np.testing.assert_allclose(out, served["run"].predict_proba(list(x)), atol=1e-5)


@pytest.mark.parametrize(("name", "datatype", "shape", "needle"), [
    ("image", "FP32", [1, 1, 32, 32], "one input, 'input'"),
    ("input", "FP64", [1, 1, 32, 32], "datatype must be FP32"),
    ("input", "FP32", [1, 1, 28, 28], "shape must be [N, 1, 32, 32]"),
])
def test_inputs_are_checked_against_the_metadata(client, served, name, datatype, shape, needle):
    inp = triton.InferInput(name, shape, datatype)
    inp.set_data_from_numpy(np.zeros(shape, np.float64 if datatype == "FP64" else np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("cxr", [inp], headers=auth(served["keys"]["clinic"]))
    assert info.value.status() == "400" and needle in info.value.message()


def test_unknown_outputs_and_lying_sizes_are_400s(url, served):
    key = auth(served["keys"]["clinic"])
    x = images(1)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with triton.InferenceServerClient(url.removeprefix("http://")) as c, pytest.raises(InferenceServerException,
                                                                                      match="unknown output"):
        c.infer("cxr", [inp], outputs=[triton.InferRequestedOutput("logits")], headers=key)
    head = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,32,32],"parameters":{"binary_data_size":4096}}]}'
    for body, length in ((head + x.tobytes()[:100], len(head)),  # fewer bytes than announced
                         (head + x.tobytes() + b"xx", len(head)),  # bytes left over
                         (head + x.tobytes(), len(head) + 10_000),  # a header length past the body
                         (head + x.tobytes(), "12abc")):
        r = httpx.post(f"{url}/v2/models/cxr/infer", content=body,
                       headers={**key, "Inference-Header-Content-Length": str(length)})
        assert r.status_code == 400 and isinstance(r.json()["error"], str), (length, r.text)
    ok = httpx.post(f"{url}/v2/models/cxr/infer", content=head + x.tobytes(),
                    headers={**key, "Inference-Header-Content-Length": str(len(head))})
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"


def test_codec_round_trips_every_datatype():
    rng = np.random.default_rng(0)
    arrays = {"FP32": rng.random((2, 3)).astype(np.float32), "INT64": rng.integers(-5, 5, (4,)),
              "UINT8": rng.integers(0, 255, (2, 2)).astype(np.uint8), "BOOL": np.array([True, False]),
              "FP16": rng.random(3).astype(np.float16), "BYTES": np.array([b"a", b"", "\u00e9".encode()], dtype=object)}
    heads, blobs = [], []
    for i, (dt, arr) in enumerate(arrays.items()):
        blob = b"".join(struct.pack("<I", len(v)) + v for v in arr.ravel()) if dt == "BYTES" else arr.tobytes()
        heads.append({"name": f"t{i}", "datatype": dt, "shape": list(arr.shape),
                      "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    import json

    head = json.dumps({"inputs": heads, "parameters": {"binary_data_output": True}}).encode()
    parsed = parse_infer_request(head + b"".join(blobs), str(len(head)), max_elements=100)
    for i, (dt, arr) in enumerate(arrays.items()):
        got_dt, got = parsed.inputs[f"t{i}"]
        assert got_dt == dt and got.shape == arr.shape and (got == arr).all()
    body, headers = encode_infer_response({}, {f"t{i}": (dt, arr) for i, (dt, arr) in enumerate(arrays.items())},
                                          parsed)
    n = int(headers["inference-header-content-length"])
    back = parse_infer_request(json.dumps({"inputs": json.loads(body[:n])["outputs"]}).encode() + body[n:],
                               str(len(json.dumps({"inputs": json.loads(body[:n])["outputs"]}))), max_elements=100)
    assert all((back.inputs[k][1] == parsed.inputs[k][1]).all() for k in parsed.inputs)
    body, headers = encode_infer_response({}, {"t0": ("FP32", arrays["FP32"])}, InferRequest(None))
    assert headers == {"content-type": "application/json"} and json.loads(body)["outputs"][0]["shape"] == [2, 3]


@pytest.mark.parametrize("binary", [True, False])
def test_kserve_rest_client(url, served, binary):
    """KServe's own Python client (InferenceRESTClient, protocol v2) against the server."""
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    x = images(2, seed=9)

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
        try:
            inp = InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            request = InferRequest(model_name="cxr", infer_inputs=[inp], request_id="ks-1")
            response = await client.infer(url, request, model_name="cxr", headers=auth(served["keys"]["clinic"]))
            return await client.is_server_ready(url), response
        finally:
            await client.close()

    ready, response = asyncio.run(call())
    outputs = {o.name: o.as_numpy() for o in response.outputs}
    assert ready and response.id == "ks-1" and set(outputs) == {"probabilities", "label"}
    np.testing.assert_allclose(outputs["probabilities"], served["run"].predict_proba(list(x)), atol=1e-5)
