"""The SDK against a real server (sync and async)."""

import asyncio

import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes, running
from lepton.client import AsyncClient, AuthenticationError, Client, InvalidInputError, NotFoundError
from lepton.serve import ServeConfig


@pytest.fixture(scope="module")
def server(served):
    with running(ServeConfig(models=["cxr@production", "shared"], registry=served["registry"], rate_limit=0)) as url:
        yield url


def test_sync_client_inputs_and_errors(server, served, tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(2))
    array = np.asarray(Image.open(path), np.float32) / 255
    with Client(server, served["keys"]["clinic"]) as client:
        assert [m["name"] for m in client.models()] == ["cxr", "shared"]
        by_path = client.predict("cxr", path)
        for other in (client.predict("cxr", array), client.predict("cxr", Image.open(path)),
                      client.predict("cxr", path.read_bytes())):
            np.testing.assert_allclose(list(other["probabilities"].values()),
                                       list(by_path["probabilities"].values()), atol=1e-5)
        many = client.predict_many("cxr", [path] * 10, concurrency=4)
        assert len(many) == 10 and {r["label"] for r in many} == {by_path["label"]}
        with pytest.raises(NotFoundError):
            client.predict("nope", path)
        with pytest.raises(InvalidInputError) as info:
            client.predict("cxr", b"garbage bytes")
        assert info.value.status == 422 and info.value.code == "invalid_input"
        with pytest.raises(TypeError):
            client.predict("cxr", 42)
    with Client(server, "lpt_000000000000_" + "x" * 43) as bad, pytest.raises(AuthenticationError):
        bad.models()


def test_retries_on_429_then_succeeds(served):
    config = ServeConfig(models=["shared"], registry=served["registry"], rate_limit=2.0, rate_burst=1)
    with running(config) as url, Client(url, served["keys"]["other"], retries=4) as client:
        results = [client.predict("shared", png_bytes()) for _ in range(3)]  # later calls wait out 429s
        assert all(r["model"] == "shared" for r in results)


def test_async_client(server, served):
    async def main():
        async with AsyncClient(server, served["keys"]["clinic"]) as client:
            models = await client.models()
            results = await client.predict_many("cxr", [png_bytes(i) for i in range(12)], concurrency=6)
            with pytest.raises(NotFoundError):
                await client.predict("missing", png_bytes())
            return models, results

    models, results = asyncio.run(main())
    assert len(models) == 2 and len(results) == 12 and all(r["version"] == 1 for r in results)
