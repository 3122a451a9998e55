"""The inference server, tested through a real uvicorn server on 127.0.0.1 (random free port)."""

import asyncio
import base64
import gc
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import auth, lepton_cmd, png_bytes, running
from lepton.registry import Registry
from lepton.serve import ServeConfig, worker_config


def test_health_and_listing(url, served):
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json()["models"] == {"cxr": 1, "shared": 1}
    clinic = httpx.get(f"{url}/v1/models", headers=auth(served["keys"]["clinic"])).json()
    other = httpx.get(f"{url}/v1/models", headers=auth(served["keys"]["other"])).json()
    assert [m["name"] for m in clinic["models"]] == ["cxr", "shared"]
    assert [m["name"] for m in other["models"]] == ["shared"]
    info = httpx.get(f"{url}/v1/models/cxr", headers=auth(served["keys"]["clinic"])).json()
    assert info["version"] == 1 and [v["stage"] for v in info["versions"]] == ["production", "none"]
    assert info["card_summary"].startswith("# Model card") and info["input"]["size"] == [32, 32]
    assert info["cost"]["forward_passes_per_image"] == 1 and info["cost"]["serving_batch"] == 32  # native metadata


def test_predict_every_encoding_matches_the_run(url, served):
    key = served["keys"]["clinic"]
    data = png_bytes(3)
    expected = served["run"].predict_proba([np.asarray(Image.open(io.BytesIO(data)), np.float32)[None] / 255])[0]
    multipart = httpx.post(f"{url}/v1/models/cxr/predict", headers=auth(key), files={"file": ("x.png", data)})
    as_json = httpx.post(f"{url}/v1/models/cxr/predict", headers=auth(key),
                         json={"image": base64.b64encode(data).decode()})
    array = (np.asarray(Image.open(io.BytesIO(data)), np.float32) / 255).tolist()
    as_array = httpx.post(f"{url}/v1/models/cxr/predict", headers=auth(key), json={"array": array})
    raw = httpx.post(f"{url}/v1/models/cxr/predict", headers={**auth(key), "content-type": "image/png"}, content=data)
    for response in (multipart, as_json, as_array, raw):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "cxr" and body["version"] == 1 and body["request_id"]
        got = [body["probabilities"]["normal"], body["probabilities"]["opacity"]]
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert response.headers["x-request-id"] == body["request_id"]


def test_a_gzip_nifti_without_a_file_name_is_read_by_its_content(url, served):
    import gzip

    import nibabel as nib

    key = served["keys"]["clinic"]
    image = np.asarray(Image.open(io.BytesIO(png_bytes(4))), np.float32)
    nifti = gzip.compress(nib.Nifti1Image(np.flipud(image).T.copy(), np.eye(4)).to_bytes())  # the PNG's orientation
    named = httpx.post(f"{url}/v1/models/cxr/predict", content=nifti, headers={**auth(key), "x-filename": "x.nii.gz"})
    bare = httpx.post(f"{url}/v1/models/cxr/predict", content=nifti, headers=auth(key))  # curl --data-binary @x.nii.gz
    assert named.status_code == 200 and bare.status_code == 200, bare.text
    assert bare.json()["probabilities"] == named.json()["probabilities"]


@pytest.mark.parametrize(
    "kwargs,status,code",
    [
        ({"content": b""}, 400, "empty_body"),
        ({"content": b"definitely not an image"}, 422, "invalid_input"),
        ({"content": b"\x89PNG\r\n\x1a\n" + b"\0" * 30}, 422, "invalid_input"),
        ({"content": b"{bad json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"json": {"image": "%%%not base64%%%"}}, 422, "invalid_base64"),
        ({"json": {"array": [[2.0, 3.0], [0.0, 1.0]]}}, 422, "invalid_input"),
        ({"json": {"array": [[[1]]] * 5}}, 422, "invalid_input"),
        ({"json": {"other": 1}}, 422, "invalid_request"),
        ({"files": {"wrong": ("x.png", b"abc")}}, 400, "missing_file"),
    ],
)
def test_client_mistakes_are_4xx_json_and_server_keeps_serving(url, served, kwargs, status, code):
    headers = {**auth(served["keys"]["clinic"]), **kwargs.pop("headers", {})}
    response = httpx.post(f"{url}/v1/models/cxr/predict", headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_oversized_and_bomb_uploads(url, served):
    key = served["keys"]["clinic"]
    buf = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buf, format="PNG")  # a few KB on the wire, 100 M pixels decoded
    bomb = httpx.post(f"{url}/v1/models/cxr/predict", headers=auth(key), files={"file": ("bomb.png", buf.getvalue())})
    message = bomb.json()["error"]["message"]
    assert bomb.status_code == 422 and ("bomb" in message or "over the limit" in message)
    assert message.startswith("upload") and "/tmp" not in message
    small = ServeConfig(models=["shared"], registry=served["registry"], rate_limit=0, max_upload_bytes=50_000)
    with running(small) as base:
        big = httpx.post(f"{base}/v1/models/shared/predict", headers=auth(key), content=b"x" * 200_000)
        assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
        assert httpx.post(f"{base}/v1/models/shared/predict", headers=auth(key), content=png_bytes()).status_code == 200


def test_small_pngs_decode_inline_and_the_rest_in_a_thread(url, served):
    from lepton.serve.inputs import INLINE_DECODE_PIXELS, decodes_inline
    from lepton.serve.middleware import RequestIds

    def png(size: tuple[int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("L", size).save(buf, format="PNG")
        return buf.getvalue()

    side = int(INLINE_DECODE_PIXELS**0.5)
    assert decodes_inline(png_bytes()) and decodes_inline(png((side, side)))
    assert not decodes_inline(png((side + 1, side)))  # judged by the header's pixel count, not the byte count
    jpeg = io.BytesIO()
    Image.new("L", (8, 8)).save(jpeg, format="JPEG")
    padded = png_bytes() + b"\0" * (4 * INLINE_DECODE_PIXELS + 4096)  # a small header, megabytes behind it
    assert not any(decodes_inline(b) for b in (jpeg.getvalue(), b"\x89PNG\r\n\x1a\n", b"", b"x" * 64, padded))
    # A truncated PNG whose header passes the inline test is still a 422 naming the upload, on either path.
    for data in (png_bytes()[:60], png((side + 1, side))[:60]):
        response = httpx.post(f"{url}/v1/models/cxr/predict", headers=auth(served["keys"]["clinic"]), content=data)
        assert response.status_code == 422 and response.json()["error"]["message"].startswith("upload")
    assert httpx.get(f"{url}/healthz").status_code == 200
    ids, other = RequestIds(), RequestIds()
    first = [ids() for _ in range(1000)]
    assert len(set(first)) == 1000 and first[0][:12] != other()[:12]


def test_auth_and_tenant_isolation(url, served):
    data = png_bytes()
    assert httpx.post(f"{url}/v1/models/cxr/predict", content=data).status_code == 401
    bad = httpx.post(f"{url}/v1/models/cxr/predict", headers=auth("lpt_000000000000_" + "x" * 43), content=data)
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"
    hidden = httpx.post(f"{url}/v1/models/cxr/predict", headers=auth(served["keys"]["other"]), content=data)
    assert hidden.status_code == 404  # another tenant's model does not exist for this key
    assert httpx.post(f"{url}/v1/models/shared/predict", headers=auth(served["keys"]["other"]),
                      content=data).status_code == 200
    assert httpx.post(f"{url}/v1/admin/reload", headers=auth(served["keys"]["clinic"])).status_code == 403


def test_open_inference_protocol_v2(url, served):
    key = auth(served["keys"]["clinic"])
    assert httpx.get(f"{url}/v2").json()["name"] == "lepton"
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    meta = httpx.get(f"{url}/v2/models/cxr", headers=key).json()
    assert meta["platform"] == "pytorch" and meta["inputs"][0] == {"name": "input", "datatype": "FP32",
                                                                   "shape": [-1, 1, 32, 32]}
    assert httpx.get(f"{url}/v2/models/cxr/versions/1/ready", headers=key).json() == {"name": "cxr", "ready": True}
    x = np.random.default_rng(0).random((3, 1, 32, 32)).astype(np.float32)
    body = {"id": "req-7", "inputs": [{"name": "input", "shape": [3, 1, 32, 32], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}
    response = httpx.post(f"{url}/v2/models/cxr/versions/1/infer", headers=key, json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["model_name"] == "cxr" and out["model_version"] == "1" and out["id"] == "req-7"
    probs = next(o for o in out["outputs"] if o["name"] == "probabilities")
    assert probs["shape"] == [3, 2] and probs["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(probs["data"]).reshape(3, 2), served["run"].predict_proba(list(x)), atol=1e-5)
    nested = {**body, "inputs": [{**body["inputs"][0], "data": x.tolist()}], "outputs": [{"name": "label"}]}
    out = httpx.post(f"{url}/v2/models/cxr/infer", headers=key, json=nested).json()
    assert [o["name"] for o in out["outputs"]] == ["label"] and len(out["outputs"][0]["data"]) == 3
    wrong = httpx.post(f"{url}/v2/models/cxr/infer", headers=key,
                       json={"inputs": [{**body["inputs"][0], "shape": [3, 1, 28, 28]}]})
    assert wrong.status_code == 400 and isinstance(wrong.json()["error"], str)
    missing = httpx.get(f"{url}/v2/models/cxr/versions/9", headers=key)
    assert missing.status_code == 404 and isinstance(missing.json()["error"], str)


def _metric(text: str, prefix: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(prefix)))


def test_batching_groups_concurrent_requests_and_metrics(served):
    key = auth(served["keys"]["clinic"])
    data = png_bytes(5)
    config = ServeConfig(models=["cxr@production"], registry=served["registry"], rate_limit=0, max_wait_ms=50,
                         max_batch_size=16)
    with running(config) as base:
        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=60) as client:
                responses = await asyncio.gather(*(client.post(f"{base}/v1/models/cxr/predict", headers=key,
                                                               content=data) for _ in range(48)))
            return [r.status_code for r in responses]

        assert asyncio.run(burst()) == [200] * 48
        text = httpx.get(f"{base}/metrics").text
    count = _metric(text, 'lepton_batch_size_count{model="cxr",version="1"}')
    total = _metric(text, 'lepton_batch_size_sum{model="cxr",version="1"}')
    assert total == 48 and total / count > 2, (total, count)  # concurrent requests share batches
    assert _metric(text, 'lepton_requests_total{model="cxr",status="200",version="1"}') == 48
    assert "lepton_request_latency_seconds_bucket" in text and 'lepton_predictions_total{label=' in text
    assert 'lepton_input_drift{model="cxr"}' in text and "lepton_queue_depth" in text


def test_batcher_idle_gap_closes_batches_and_model_thread_yields_cpu():
    from lepton.serve.batching import Batcher

    sizes: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if hasattr(os, "getpriority") else 0
        return np.full((len(batch), 2), nice, np.float32)

    async def main():
        batcher = Batcher(np.stack, predict, max_batch_size=64, max_wait_ms=10_000, idle_ms=30)
        batcher.start()
        start = time.perf_counter()
        lone = await batcher.submit(np.zeros(3, np.float32))
        waited = time.perf_counter() - start
        burst = await asyncio.gather(*(batcher.submit(np.zeros(3, np.float32)) for _ in range(20)))
        await batcher.drain_and_stop()
        return lone, waited, burst

    lone, waited, burst = asyncio.run(main())
    assert waited < 5  # closed by the 30 ms pause in arrivals, not by the 10 s window
    assert sizes == [1, 20] and len(burst) == 20
    if hasattr(os, "getpriority"):
        assert lone[0] >= 10  # the model thread runs below the event loop's priority


def test_unbatched_requests_run_side_by_side_on_a_share_of_the_cores():
    """max_batch_size 1: single requests run concurrently (one per core by default), each model thread with its
    share of PyTorch's threads, every answer to its own request, and a drain waits for the running ones."""
    import torch

    from lepton.serve.batching import Batcher, model_concurrency

    assert model_concurrency(32) == 1 and model_concurrency(1) == len(os.sched_getaffinity(0))
    active, peak, threads = [0], [0], set()
    lock = threading.Lock()

    def predict(batch: np.ndarray) -> np.ndarray:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threads.add(torch.get_num_threads())
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return batch * 2

    async def main():
        batcher = Batcher(np.stack, predict, max_batch_size=1, max_wait_ms=0, concurrency=4)
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit(np.full(2, i, np.float32)) for i in range(12)))
        pending = [asyncio.ensure_future(batcher.submit(np.ones(2, np.float32))) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert batcher.depth == 3
        await batcher.drain_and_stop()
        assert all(p.done() for p in pending)
        return answers

    before = torch.get_num_threads()
    answers = asyncio.run(main())
    assert [a[0] for a in answers] == [2 * i for i in range(12)]
    assert peak[0] == 4  # four at a time, never more
    assert threads == {max(1, len(os.sched_getaffinity(0)) // 4)}
    assert torch.get_num_threads() == before  # only the model threads' own count changed


def test_rate_limit_answers_429(served):
    config = ServeConfig(models=["shared"], registry=served["registry"], rate_limit=0.2, rate_burst=2)
    with running(config) as base:
        key = auth(served["keys"]["other"])
        codes = [httpx.post(f"{base}/v1/models/shared/predict", headers=key, content=png_bytes()).status_code
                 for _ in range(4)]
        assert codes[:2] == [200, 200] and 429 in codes[2:]
        limited = httpx.post(f"{base}/v1/models/shared/predict", headers=key, content=png_bytes())
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1




def test_revoked_key_stops_working_within_the_key_cache_window(served):
    reg = Registry.open(served["registry"])
    config = ServeConfig(models=["shared"], registry=served["registry"], rate_limit=0, key_cache_seconds=0.5)
    key = reg.create_key("temp")
    with running(config) as base:
        call = lambda: httpx.get(f"{base}/v1/models", headers=auth(key)).status_code  # noqa: E731
        assert call() == 200
        reg.revoke_key(key.split("_")[1])
        time.sleep(0.6)
        assert call() == 401
        assert call() == 401  # refusals are never cached as acceptances
@pytest.mark.slow
def test_hot_swap_under_load_and_canary_routing(served):
    reg = Registry.open(served["registry"])
    config = ServeConfig(models=["cxr@production"], registry=served["registry"], rate_limit=0)
    admin = auth(served["keys"]["admin"])
    clinic = auth(served["keys"]["clinic"])
    data = png_bytes(9)
    with running(config) as base:
        stop = time.monotonic() + 8
        results: list[tuple[int, int]] = []

        async def load() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                async def worker() -> None:
                    while time.monotonic() < stop:
                        r = await client.post(f"{base}/v1/models/cxr/predict", headers=clinic, content=data)
                        results.append((r.status_code, r.json().get("version", -1)))
                await asyncio.gather(*(worker() for _ in range(8)))

        thread = threading.Thread(target=lambda: asyncio.run(load()))
        thread.start()
        time.sleep(2)
        reg.promote("cxr", 2, "production")
        swap = httpx.post(f"{base}/v1/admin/reload", headers=admin, timeout=60)
        assert swap.status_code == 200 and swap.json()["changes"]["cxr"]["primary"] == 2
        thread.join(timeout=60)
        assert results and all(code == 200 for code, _ in results), {c for c, _ in results}
        versions = [v for _, v in results]
        assert versions[0] == 1 and versions[-1] == 2 and set(versions) == {1, 2}
        assert versions.index(2) > 0 and 1 not in versions[versions.index(2) + 50:]

        reg.set_route("cxr", {1: 80, 2: 20}, shadow=None)
        httpx.post(f"{base}/v1/admin/reload", headers=admin, timeout=60)
        seen = {}
        for client_id in range(60):
            hdr = {**clinic, "X-Lepton-Client": f"site-{client_id}"}
            a = httpx.post(f"{base}/v1/models/cxr/predict", headers=hdr, content=data).json()["version"]
            b = httpx.post(f"{base}/v1/models/cxr/predict", headers=hdr, content=data).json()["version"]
            assert a == b  # sticky per client
            seen[client_id] = a
        share = sum(v == 2 for v in seen.values()) / len(seen)
        assert 0.05 <= share <= 0.45, share
        reg.set_route("cxr", {2: 100}, shadow=1)
        httpx.post(f"{base}/v1/admin/reload", headers=admin, timeout=60)
        for _ in range(5):
            assert httpx.post(f"{base}/v1/models/cxr/predict", headers=clinic, content=data).json()["version"] == 2
        deadline = time.monotonic() + 10
        while 'lepton_shadow_predictions_total{model="cxr"' not in httpx.get(f"{base}/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    reg.set_route("cxr", {})
    reg.promote("cxr", 1, "production")


def test_worker_config_shares_or_splits_rate_limits_and_turns_on_polling(tmp_path):
    config = ServeConfig(models=["m"], rate_limit=50, rate_burst=101)
    assert worker_config(config, 1) is config
    four = worker_config(config, 4)  # nothing shared: each worker gets its part of the limit
    assert four.rate_limit == 12.5 and four.rate_burst == 26 and four.poll_seconds == 2.0
    shared = worker_config(config, 4, str(tmp_path))
    assert (shared.rate_limit, shared.rate_burst, shared.shared_dir) == (50, 101, str(tmp_path))
    assert worker_config(ServeConfig(models=["m"], poll_seconds=7), 2).poll_seconds == 7


def test_shared_buckets_hold_one_limit_across_processes(tmp_path):
    import multiprocessing

    from lepton.serve.shared import PROBES, SLOTS, SharedBuckets

    path = tmp_path / "buckets.bin"
    with multiprocessing.get_context("spawn").Pool(3) as pool:  # three processes race for 40 tokens
        taken = pool.starmap(_take_tokens, [(str(path), "key-a", 30)] * 3)
    assert sum(taken) == 40  # never more than the burst in total, however the processes interleave
    # A token every 0.1 s: slow enough that a descheduled test process does not see one refill between takes.
    a, b = SharedBuckets(path, 10.0, 2), SharedBuckets(path, 10.0, 2)
    assert a.take("fresh") == 0 and b.take("fresh") == 0 and 0 < a.take("fresh") <= 0.1
    time.sleep(0.11)
    assert b.take("fresh") == 0  # refilled at the shared rate
    slow = SharedBuckets(path, 0.001, 1)
    for i in range(PROBES + 5):  # more live keys than one neighbourhood holds: the oldest is taken over
        assert slow.take(f"k{i}") == 0
    assert os.path.getsize(path) == SLOTS * 24
    with pytest.raises(ValueError, match="rate must be"):
        SharedBuckets(path, 0, 1)


def _take_tokens(path: str, ident: str, tries: int) -> int:
    from lepton.serve.shared import SharedBuckets

    buckets = SharedBuckets(path, 1e-6, 40)
    return sum(buckets.take(ident) == 0 for _ in range(tries))


def test_workers_share_admin_reloads_and_rate_limits(served, tmp_path):
    """Two servers on one shared directory, as `serve --workers` sets them up: an admin reload answered by
    one reaches the other (no registry polling), and one key's burst is spent once across both."""
    root = tmp_path / "reg"
    shutil.copytree(served["registry"], root)
    shared = tmp_path / "shared"
    shared.mkdir()
    config = ServeConfig(models=["cxr@production"], registry=str(root), rate_limit=0.001, rate_burst=6,
                         shared_dir=str(shared))
    key, data = auth(served["keys"]["clinic"]), png_bytes(2)
    admin = auth(served["keys"]["admin"])
    frozen = gc.get_freeze_count()
    with running(config) as first, running(config) as second:
        assert gc.get_freeze_count() > frozen  # the heap with the loaded models is out of the collector's sight
        frozen = gc.get_freeze_count()
        answers = [httpx.post(f"{base}/v1/models/cxr/predict", headers=key, content=data)
                   for base in (first, second, first, second)]
        assert [r.json()["version"] for r in answers] == [1, 1, 1, 1]
        Registry.open(root).promote("cxr", 2, "production")
        swap = httpx.post(f"{first}/v1/admin/reload", headers=admin, timeout=60)
        assert swap.json()["changes"]["cxr"]["primary"] == 2 and gc.get_freeze_count() > frozen  # v2 frozen too
        deadline = time.monotonic() + 20
        while httpx.get(f"{second}/readyz").json()["models"]["cxr"] != 2:
            assert time.monotonic() < deadline, "the other server never followed the admin reload"
            time.sleep(0.05)
        assert httpx.post(f"{second}/v1/models/cxr/predict", headers=key, content=data).json()["version"] == 2
        assert httpx.post(f"{first}/v1/models/cxr/predict", headers=key, content=data).status_code == 200
        # Six requests spent the key's burst of six: both servers refuse the seventh.
        limited = httpx.post(f"{first}/v1/models/cxr/predict", headers=key, content=data)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert httpx.post(f"{second}/v1/models/cxr/predict", headers=key, content=data).status_code == 429
    Registry.open(root).promote("cxr", 1, "production")


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_several_workers_share_a_port_sum_their_metrics_and_all_swap(served, tmp_path):
    """`lepton serve --workers 2`: two processes on one port; /metrics adds up both; a promotion reaches both;
    one key's rate limit holds across both."""
    root = tmp_path / "reg"
    shutil.copytree(served["registry"], root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base, key = f"http://127.0.0.1:{port}", auth(served["keys"]["clinic"])
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(lepton_cmd("serve", "--model", "cxr@production", "--registry", str(root), "--port",
                                           str(port), "--workers", "2", "--poll-seconds", "0.5",
                                           "--rate-limit", "0.001", "--rate-burst", "400"),
                                stdout=subprocess.DEVNULL, stderr=fh, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(set(re.findall(r"cxr@1 loaded \(pytorch\) in process (\d+)", log.read_text()))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        # A worker logs "loaded" before it starts listening: until one listens, connections are refused.
        while not _ready(f"{base}/readyz"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        data = png_bytes(5)
        answered: set[str] = set()
        sent = 0
        # A fresh connection each, so the kernel may hand them to either worker; a worker still finishing its
        # start-up accepts none yet, hence a bounded number of tries instead of a fixed count.
        while len(answered) < 2 or sent < 24:
            assert sent < 200 and proc.poll() is None, f"only workers {answered} answered {sent} requests"
            r = httpx.post(f"{base}/v1/models/cxr/predict", headers=key, content=data)
            assert r.status_code == 200 and r.json()["version"] == 1, r.text
            sent += 1
            answered = set(re.findall(r'"worker": (\d+)', log.read_text()))
        text = httpx.get(f"{base}/metrics").text
        count = re.search(r'lepton_requests_total\{model="cxr",status="200",version="1"\} (\S+)', text)
        assert count and float(count.group(1)) == sent, text[:2000]
        Registry.open(root).promote("cxr", 2, "production")
        streak, deadline = 0, time.monotonic() + 30
        while streak < 20:
            assert time.monotonic() < deadline, "a worker never picked up the promotion"
            version = httpx.post(f"{base}/v1/models/cxr/predict", headers=key, content=data).json()["version"]
            streak = streak + 1 if version == 2 else 0
            sent += 1
        # One keep-alive connection reaches one worker, yet the key's whole burst is spent before the 429:
        # the workers share their token buckets.
        with httpx.Client(headers=key) as client:
            for _ in range(450):
                if client.post(f"{base}/v1/models/cxr/predict", content=data).status_code == 429:
                    break
                sent += 1
        assert sent == 400, sent
        # The access log is bare JSON lines, one object per request, apart from the other log lines.
        access = [line for line in log.read_text().splitlines() if '"request_id"' in line]
        assert len(access) >= sent and all(json.loads(line)["request_id"] for line in access), access[:3]
        assert "alembic" not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_explain_overlay_in_predict(url, served):
    key = auth(served["keys"]["clinic"])
    response = httpx.post(f"{url}/v1/models/cxr/predict?explain=gradcam", headers=key, content=png_bytes(4))
    assert response.status_code == 200, response.text
    explanation = response.json()["explanation"]
    assert explanation["method"] == "gradcam" and explanation["class"] == response.json()["label"]
    overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png_base64"])))
    assert overlay.size == (32, 32) and overlay.mode == "RGB"
    bad = httpx.post(f"{url}/v1/models/cxr/predict?explain=lime", headers=key, content=png_bytes(4))
    assert bad.status_code == 422


def test_onnx_backend_and_foreign_onnx_models(served, tmp_path):
    from test_registry import _onnx_classifier

    reg = Registry.open(served["registry"])
    reg.register_run(served["root"] / "run", "cxr-onnx", onnx=True)
    reg.register_onnx(_onnx_classifier(tmp_path / "keras.onnx"), "foreign", labels=["normal", "pneumonia"],
                      image_size=28)
    key = auth(served["keys"]["admin"])
    data = png_bytes(6)
    config = ServeConfig(models=["cxr-onnx", "foreign"], registry=served["registry"], rate_limit=0, backend="onnx")
    with running(config) as base:
        models = {m["name"]: m for m in httpx.get(f"{base}/v1/models", headers=key).json()["models"]}
        assert models["cxr-onnx"]["platform"] == models["foreign"]["platform"] == "onnxruntime_onnx"
        onnx_answer = httpx.post(f"{base}/v1/models/cxr-onnx/predict", headers=key, content=data).json()
        expected = served["run"].predict_proba([np.asarray(Image.open(io.BytesIO(data)), np.float32)[None] / 255])[0]
        np.testing.assert_allclose(list(onnx_answer["probabilities"].values()), expected, atol=1e-4)
        foreign = httpx.post(f"{base}/v1/models/foreign/predict", headers=key, content=png_bytes(1, size=28))
        assert foreign.status_code == 200 and set(foreign.json()["probabilities"]) == {"normal", "pneumonia"}
        no_cam = httpx.post(f"{base}/v1/models/foreign/predict?explain=gradcam", headers=key, content=data)
        assert no_cam.status_code == 422 and "PyTorch" in no_cam.json()["error"]["message"]
    from lepton.errors import DataError
    from lepton.serve.adapters import make_adapter

    with pytest.raises(DataError, match="no ONNX artifact"):
        make_adapter(reg, "cxr@1", backend="onnx")


def test_every_route_and_dependency_runs_on_the_event_loop(tmp_path):
    """A plain ``def`` endpoint or dependency would be run in FastAPI's thread pool: a thread hand-off per
    request on the hot path."""
    import inspect

    from fastapi.routing import APIRoute

    from lepton.serve import create_app

    app = create_app(ServeConfig(models=[], registry=str(tmp_path / "reg")))

    def calls(dependant):
        yield dependant.call
        for sub in dependant.dependencies:
            yield from calls(sub)

    def api_routes(routes):
        for r in routes:
            if isinstance(r, APIRoute):
                yield r
            elif hasattr(r, "original_router"):  # FastAPI's included router
                yield from api_routes(r.original_router.routes)

    routes = list(api_routes(app.routes))
    assert len(routes) >= 16 and all(isinstance(r, APIRoute) for r in app.routes[-16:])  # mounted flat
    blocking = {f"{r.path}: {c.__name__}" for r in routes for c in calls(r.dependant)
                if not inspect.iscoroutinefunction(c)}
    assert blocking == set()
