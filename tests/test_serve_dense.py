"""Dense serving through the batcher: the sliding windows of concurrent segmentation requests share forward passes
(fewer batches than windows) and give the same label maps as one request alone; a shadow version is compared per
request; a full window queue answers 503; batch metrics count windows."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(seg_run, tmp_path_factory):
    from lepton.registry import Registry

    run, _ = seg_run
    location = tmp_path_factory.mktemp("dense") / "reg"
    reg = Registry.open(location)
    reg.register_run(run.path, "lungseg")
    reg.register_run(run.path, "lungseg")
    reg.promote("lungseg", 1, "production")
    return str(location)


def test_windows_of_concurrent_requests_share_forward_passes(seg_run, registry):
    from lepton.data.readers.io import read_image_bytes
    from lepton.serve import ServeConfig
    from lepton.serve.errors import ApiError
    from lepton.serve.state import Server

    run, cases = seg_run
    files = sorted((cases / "images").iterdir())[:6]
    frames = [read_image_bytes(p.read_bytes(), p.name)[0] for p in files]
    alone = [run.segment(f.pixels, f.affine).argmax(0) for f in frames]

    async def main():
        srv = Server(ServeConfig(models=["lungseg@production"], registry=registry, max_batch_size=16,
                                 max_wait_ms=50, rate_limit=0))
        await srv.reload()
        dep = srv.deployments["lungseg"]
        answers = await asyncio.gather(*(srv.segment(dep, f, None) for f in frames))
        handle = dep.handles[dep.primary]
        probs = await asyncio.gather(*(srv._windows(dep, handle, f) for f in frames))
        # a shadow version: each request also segmented by version 2 in the background, and compared
        dep.shadow = 2
        dep.handles[2] = await srv._load("lungseg", 2)
        await asyncio.gather(*(srv.segment(dep, f, None) for f in frames[:2]))
        for _ in range(200):
            if "lepton_shadow_predictions_total{" in srv.metrics_text().decode():
                break
            await asyncio.sleep(0.05)
        handle.windows.max_queue = 0  # no room: refused at once
        with pytest.raises(ApiError) as refused:
            await srv.segment(dep, frames[0], None)
        text = srv.metrics_text().decode()
        await srv.close()
        return answers, probs, text, refused.value

    answers, probs, text, refused = asyncio.run(main())
    assert [v for v, _ in answers] == [1] * 6
    for served, expected in zip(probs, alone, strict=True):
        assert (served.argmax(0) == expected).mean() > 0.999
    assert all("label_map" in body for _, body in answers)
    windows = float(next(line.split()[-1] for line in text.splitlines()
                         if line.startswith('lepton_batch_size_sum{model="lungseg",version="1"}')))
    batches = float(next(line.split()[-1] for line in text.splitlines()
                         if line.startswith('lepton_batch_size_count{model="lungseg",version="1"}')))
    assert windows >= 12 and batches < windows  # windows of several requests in one forward pass
    assert 'lepton_shadow_predictions_total{model="lungseg",outcome="agree",version="2"} 2.0' in text
    assert refused.status == 503 and 'lepton_rejected_total{model="lungseg"} 1.0' in text
