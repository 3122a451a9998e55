"""Replicas on different hosts share state through a real Redis (``serve --redis``): one key's rate limit across
two servers on different ports, an admin reload answered by one reaching the other, and clear failures."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from conftest import auth, png_bytes, running
from lepton.errors import ConfigError
from lepton.registry import Registry
from lepton.serve import ServeConfig


def test_two_servers_share_one_keys_limit_and_reloads_through_redis(served, redis_url, tmp_path):
    root = tmp_path / "reg"
    shutil.copytree(served["registry"], root)
    prefix = f"test-{tmp_path.name}"  # a fresh namespace: nothing left from another test
    config = ServeConfig(models=["cxr@production"], registry=str(root), rate_limit=0.001, rate_burst=6,
                         redis=redis_url, redis_prefix=prefix)
    key, data = auth(served["keys"]["clinic"]), png_bytes(4)
    admin = auth(served["keys"]["admin"])
    with running(config) as first, running(config) as second:
        assert first.rsplit(":", 1)[1] != second.rsplit(":", 1)[1]
        answers = [httpx.post(f"{base}/v1/models/cxr/predict", headers=key, content=data)
                   for base in (first, second, first, second)]
        assert [r.status_code for r in answers] == [200] * 4
        Registry.open(root).promote("cxr", 2, "production")
        swap = httpx.post(f"{first}/v1/admin/reload", headers=admin, timeout=60)
        assert swap.json()["changes"]["cxr"]["primary"] == 2
        deadline = time.monotonic() + 20
        while httpx.get(f"{second}/readyz").json()["models"]["cxr"] != 2:  # no registry polling: only Redis
            assert time.monotonic() < deadline, "the other server never followed the admin reload"
            time.sleep(0.05)
        assert httpx.post(f"{second}/v1/models/cxr/predict", headers=key, content=data).json()["version"] == 2
        assert httpx.post(f"{first}/v1/models/cxr/predict", headers=key, content=data).status_code == 200
        # Six requests spent the key's burst of six, three on each server: both refuse the seventh.
        limited = httpx.post(f"{first}/v1/models/cxr/predict", headers=key, content=data)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert httpx.post(f"{second}/v1/models/cxr/predict", headers=key, content=data).status_code == 429
        # Another key has its own bucket.
        other = auth(served["keys"]["other"])
        assert httpx.post(f"{second}/v1/models/shared/predict", headers=other, content=data).status_code in (200, 404)
    import redis

    client = redis.Redis.from_url(redis_url)
    stored = [k.decode() for k in client.scan_iter(f"{prefix}:*")]
    assert f"{prefix}:reload-generation" in stored
    assert all(served["keys"]["clinic"].split("_")[1] not in k for k in stored)  # key ids are hashed


def test_redis_buckets_refill_at_the_rate(redis_url, tmp_path):
    from lepton.serve.redis_store import RedisBuckets, connect

    buckets = RedisBuckets(connect(redis_url), rate=20.0, burst=2, prefix=f"refill-{tmp_path.name}")
    assert [buckets.take("k") for _ in range(2)] == [0.0, 0.0]
    wait = buckets.take("k")
    assert 0 < wait <= 0.05 + 1e-6
    time.sleep(wait + 0.02)
    assert buckets.take("k") == 0.0


def test_unreachable_redis_is_a_clear_error_and_hides_the_password(served):
    from lepton.serve.state import Server

    with pytest.raises(ConfigError, match=r"cannot reach Redis at redis://user:\*\*\*@127\.0\.0\.1:1/0"):
        Server(ServeConfig(models=["cxr"], registry=served["registry"], redis="redis://user:secret@127.0.0.1:1/0"))


def test_redis_outage_lets_requests_through(caplog):
    import redis

    from lepton.serve.redis_store import RedisBuckets, RedisReloadSignal

    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens there
    buckets = RedisBuckets(gone, rate=1.0, burst=1)
    assert buckets.take("k") == 0.0 and buckets.take("k") == 0.0  # over the limit, but let through
    assert "Redis unavailable for rate limits" in caplog.text
    signal = RedisReloadSignal.__new__(RedisReloadSignal)  # as if Redis went away after start-up
    signal.client, signal.key, signal.seen = gone, "lepton:reload-generation", 3
    signal._outage = type(buckets._outage)("reload signals")
    assert signal.changed() is False and signal.bump() == 3
