"""Slide jobs on the server: a generated slide uploaded to `lepton serve` as a job, against the same prediction done
offline (``predict_slide``) in the same run.

A pyramidal TIFF of ``--size`` x ``--size`` px (JPEG tiles, 0.5 µm/px) and a slide model (gated-attention MIL over
the default frozen backbone, seeded and untrained: this measures the machinery, not a model) are made; the model is
registered, and ``lepton serve`` runs in a process of its own on loopback. First a 256 MiB body that only starts
like a TIFF is sent and refused (422): the server's peak RSS around it shows that a body is streamed to disk, not
held. Then the benchmark times the slide's upload (MB/s), the job from submission to its answer (and tiles/s), and
``predict_slide`` on the same slide in this process; it checks that both give the same probability, and prints the
server's peak RSS before the upload, right after it (the job only just queued) and after the job.
``--quick``: a 4,096 px slide.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=None)
    args = parser.parse_args()
    size = args.size or (4096 if args.quick else 12_000)
    print(cpu_summary())
    print(f"load average: {Path('/proc/loadavg').read_text().split()[:3]}")

    import httpx
    import numpy as np

    from lepton.data.tools.slidegen import plan_slide, write_slide
    from lepton.pathology.embed import Backbone
    from lepton.pathology.mil import SlideModel, abmil
    from lepton.pathology.workflow import predict_slide
    from lepton.registry import Registry

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        slide = write_slide(root / "slide.tiff", plan_slide(size, size, tumour=True, seed=1))
        mb = slide.stat().st_size / 2**20
        print(f"slide: {size}x{size} px, {mb:.1f} MB, written in {time.perf_counter() - started:.1f} s")
        import torch

        backbone = Backbone.random()
        torch.manual_seed(0)
        model = SlideModel(abmil(backbone.dim), np.zeros(backbone.dim, np.float32), np.ones(backbone.dim, np.float32),
                           ["normal", "tumour"], 0.5, backbone.identity,
                           {"mpp": 0.5, "size": 256, "overlap": 0, "min_tissue": 0.5})
        model.save(root / "model")
        Registry.open(root / "reg").register_slide_model(root / "model", "wsi")
        import socket

        with socket.socket() as sock:  # a free loopback port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "LEPTON_HOME": str(root / "home")}
        server = subprocess.Popen([sys.executable, "-m", "lepton", "serve", "--model", "wsi", "--registry",
                                   str(root / "reg"), "--no-auth", "--port", str(port), "--slide-dir",
                                   str(root / "jobs")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)
            # a 256 MiB body with a TIFF signature and nothing else: streamed to disk, then refused by the check
            junk = root / "junk.tiff"
            with open(junk, "wb") as fh:
                fh.write(b"II*\0")
                fh.truncate(256 << 20)
            idle = vm_hwm_mb(server.pid)
            with open(junk, "rb") as fh:
                refused = httpx.post(f"{base}/v1/slide-models/wsi/jobs", content=fh, timeout=600,
                                     headers={"Content-Type": "application/octet-stream"})
            junk_status, junk_rss = refused.status_code, vm_hwm_mb(server.pid)
            before = vm_hwm_mb(server.pid)
            t0 = time.perf_counter()
            with open(slide, "rb") as fh:
                r = httpx.post(f"{base}/v1/slide-models/wsi/jobs?filename=slide.tiff", content=fh,
                               headers={"Content-Type": "application/octet-stream"}, timeout=600)
            accepted = time.perf_counter() - t0
            uploaded = vm_hwm_mb(server.pid)  # the upload is on disk, the job only just queued
            assert r.status_code == 202, r.text
            job = r.json()["id"]
            while (state := httpx.get(f"{base}/v1/slide-jobs/{job}").json())["status"] not in ("done", "failed"):
                time.sleep(0.25)
            served = time.perf_counter() - t0
            after = vm_hwm_mb(server.pid)
            assert state["status"] == "done", state
        finally:
            server.terminate()
            server.wait(timeout=60)
        t1 = time.perf_counter()
        offline = predict_slide(root / "model", slide, root / "offline", cache=False)
        alone = time.perf_counter() - t1
        tiles = state["result"]["tiles"]
        same = state["result"]["probability"] == offline["prediction"]["probability"]
        print(json.dumps({"slide_mb": round(mb, 1), "tiles": tiles,
                          "submit_s (upload + check)": round(accepted, 2), "submit_mb_per_s": round(mb / accepted, 1),
                          "job_s": round(served, 2), "job_tiles_per_s": round(tiles / served, 1),
                          "offline_s": round(alone, 2), "offline_tiles_per_s": round(tiles / alone, 1),
                          "job_over_offline": round(served / alone, 2), "same_probability": same,
                          "junk_256mib_status": junk_status, "server_peak_rss_mb_idle": round(idle),
                          "server_peak_rss_mb_after_256mib_body": round(junk_rss),
                          "server_peak_rss_mb_before": round(before),
                          "server_peak_rss_mb_after_upload": round(uploaded),
                          "server_peak_rss_mb_after_job": round(after)},
                         indent=1))
        print(f"load average after: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
