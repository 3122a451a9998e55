"""Serving load test on loopback: (a) Lepton with dynamic batching, (a2) the same with one worker process
per core, (b) Lepton without batching, and (c) a plain FastAPI endpoint that runs one forward pass per
request — same model, same run, same uvicorn.

Each server runs in its own process on 127.0.0.1, all started up front; they take turns under a bounded
asyncio load generator that keeps N requests in flight (four turns each by default, so that a drift in the
machine's speed falls on every server alike). It prints requests/s, p50/p95/p99 latency and errors for each
server, the ratios, each batching server's mean batch size with the model's own latency at that size, and
the model's peak batched throughput — the ceiling no server can pass here. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from machine import cpu_summary

PLAIN_SERVER = '''
import io, sys, numpy as np, torch
from fastapi import FastAPI, Request
from PIL import Image
import uvicorn
from lepton.registry import Registry
reg = Registry.open(sys.argv[1])
run = reg.load_run(sys.argv[2])
spec = run.preprocessing
app = FastAPI()

@app.post("/predict")
def predict(body: bytes = __import__("fastapi").Body(..., media_type="image/png")):
    img = np.asarray(Image.open(io.BytesIO(body)), dtype=np.float32)[None] / 255
    with torch.inference_mode():
        probs = torch.softmax(run.model(spec([img]).contiguous(memory_format=torch.channels_last)), 1)[0]
    return {"label": run.label_names[int(probs.argmax())], "probabilities": probs.tolist()}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one pre-built request on a keep-alive connection; read the whole response; its status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def load(url: str, body: bytes, clients: int, seconds: float, headers: dict[str, str]) -> dict[str, float]:
    """``clients`` keep-alive connections, each sending the next request as soon as the last is answered.

    The client is deliberately lean (pre-built request bytes, no HTTP library) so that on a small machine the
    load generator takes as little CPU from the server under test as possible; every server gets the same one.
    """
    parts = urlsplit(url)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"POST {parts.path} HTTP/1.1\r\nhost: {parts.netloc}\r\n{head}"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal errors
        reader = writer = None
        while time.monotonic() < stop:
            start = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                ok = await asyncio.wait_for(_exchange(reader, writer, request), 30) == 200
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
                ok = False
                if writer is not None:
                    writer.close()
                reader = writer = None
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
        if writer is not None:
            writer.close()

    begin = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return {"latencies": latencies, "errors": errors, "elapsed": time.perf_counter() - begin}


def summarise(latencies: list[float], errors: int, elapsed: float) -> dict[str, float]:
    """requests/s and latency percentiles (ms) of one server over all its measured rounds."""
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"requests_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
            "ok": len(latencies), "errors": errors}


def batch_totals(url: str) -> tuple[float, float]:
    """(images, batches) the server has run so far, from its batch-size histogram on ``/metrics``."""
    import httpx

    total = count = 0.0
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith("lepton_batch_size_sum{"):
            total += float(line.split()[-1])
        elif line.startswith("lepton_batch_size_count{"):
            count += float(line.split()[-1])
    return total, count


def model_latency_ms(model, batch_size: int, threads: int, repeats: int = 30) -> float:
    """Median time of one forward pass at ``batch_size`` with ``threads`` torch threads (in this process)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randn(batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    torch.set_num_threads(before)
    return float(np.median(times) * 1000)


def precision_peaks(reg, precisions: list[str], batch: int, seconds: float = 2.0) -> dict[str, float]:
    """Images/s of the served model alone in each precision (the server's own adapter), one batch of ``batch``."""
    from lepton.serve.adapters import OnnxAdapter, TorchAdapter

    out = {}
    for p in precisions:  # refused ones too: the speed is measured whatever the accuracy check said
        adapter = (OnnxAdapter(reg, "bench@1", reg.get("bench@1").artifacts["onnx_int8"]) if p == "int8"
                   else TorchAdapter(reg, "bench@1"))
        adapter.use_precision(p, None)
        adapter.setup()
        x = adapter.prepare([np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)] * batch)
        adapter.predict(x)
        n, start = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - start < seconds:
            adapter.predict(x)
            n += 1
        out[p] = n * batch / (time.perf_counter() - start)
    return out


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def peak_rss_mb(pid: int) -> float:
    """A live process's peak resident memory (VmHWM), MB; NaN where /proc has no such figure."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def count_forward_passes(registry: Path, body: bytes, clients: int, max_batch_size: int,
                         max_wait_ms: float) -> tuple[int, int]:
    """In this process: ``clients`` concurrent segmentation requests through the server's own code path (the window
    batcher), the network's forward calls counted by a hook on the module itself. Returns (forward calls, windows)."""
    from lepton.data.readers.io import read_image_bytes
    from lepton.serve import ServeConfig
    from lepton.serve.state import Server

    frame = read_image_bytes(body, "upload.png")[0]

    async def main() -> tuple[int, int]:
        srv = Server(ServeConfig(models=["seg"], registry=str(registry), max_batch_size=max_batch_size,
                                 max_wait_ms=max_wait_ms, rate_limit=0, max_queue=65536))
        await srv.reload()
        dep = srv.deployments["seg"]
        handle = dep.handles[dep.primary]
        calls, windows, lock = [0], [0], threading.Lock()

        def hook(module, inputs, output) -> None:  # model threads run side by side without batching
            with lock:
                calls[0] += 1
                windows[0] += int(inputs[0].shape[0])

        remove = handle.adapter.run.model.register_forward_hook(hook)
        try:
            await asyncio.gather(*(srv.segment(dep, frame, None) for _ in range(clients)))
        finally:
            remove.remove()
            await srv.close()
        return calls[0], windows[0]

    return asyncio.run(main())


def segmentation_rows(tmp: Path, clients: int, seconds: float, rounds: int, env: dict[str, str],
                      max_wait_ms: float) -> None:
    """Dense serving, same run: a 2-D segmentation model (a UNet on synthetic chest images, 64 px windows) served
    with its sliding windows batched across requests (d) and one window per forward pass (e), 128 px uploads (nine
    windows each), the two servers taking turns; requests/s, latency percentiles, windows and forward passes per
    request (from each server's batch-size histogram: one forward pass per batch), the servers' peak RSS — and, in
    this process, the network's forward calls counted by a module hook for ``clients`` concurrent requests."""
    from PIL import Image

    import lepton
    from lepton.data.tools.synthetic import write_segmentation_cases
    from lepton.registry import Registry

    load_before = _loadavg()
    cases = write_segmentation_cases(tmp / "seg-cases", n=16, dims=2, seed=0)
    run = lepton.train(cases, task="segmentation", epochs=1, batch_size=8, time_budget_s=0, quiet=True,
                       output_dir=str(tmp / "seg-runs"), name="seg")
    reg = Registry.open(tmp / "seg-reg")
    reg.register_run(run.path, "seg")
    image = np.asarray(Image.open(sorted((cases / "images").iterdir())[0]).resize((128, 128)))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    body = buf.getvalue()
    servers = {"d) segmentation, windows batched": ["--max-batch-size", str(4 * clients), "--max-wait-ms",
                                                    str(max_wait_ms)],
               "e) segmentation, one window per forward": ["--max-batch-size", "1"]}
    counted = {"d) segmentation, windows batched": count_forward_passes(tmp / "seg-reg", body, clients, 4 * clients,
                                                                         max_wait_ms),
               "e) segmentation, one window per forward": count_forward_passes(tmp / "seg-reg", body, clients, 1,
                                                                                max_wait_ms)}
    procs, urls, rss = [], {}, {}
    try:
        for label, extra in servers.items():
            port = free_port()
            log = tmp / f"seg-server-{port}.log"
            with open(log, "wb") as log_fh:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "lepton.cli", "serve", "--model", "seg", "--registry", str(tmp / "seg-reg"),
                     "--port", str(port), "--no-auth", "--rate-limit", "0", "--max-queue", "65536", *extra],
                    stdout=subprocess.DEVNULL, stderr=log_fh, env=env))
            wait_ready(f"http://127.0.0.1:{port}/readyz", procs[-1], log, timeout=600)
            url = f"http://127.0.0.1:{port}/v1/models/seg/predict"
            asyncio.run(load(url, body, clients, 2.0, {"content-type": "image/png"}))  # warm-up
            urls[label] = (url, f"http://127.0.0.1:{port}/metrics")
        acc = {label: {"latencies": [], "errors": 0, "elapsed": 0.0, "windows": 0.0, "batches": 0.0}
               for label in servers}
        for _ in range(max(1, rounds)):
            for label, (url, metrics) in urls.items():
                before = batch_totals(metrics)
                got = asyncio.run(load(url, body, clients, seconds / max(1, rounds), {"content-type": "image/png"}))
                windows, batches = (a - b for a, b in zip(batch_totals(metrics), before, strict=True))
                a = acc[label]
                a["latencies"] += got["latencies"]
                a["errors"] += got["errors"]
                a["elapsed"] += got["elapsed"]
                a["windows"] += windows
                a["batches"] += batches
        rss = {label: peak_rss_mb(proc.pid) for label, proc in zip(servers, procs, strict=True)}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    print(f"\nCPU: {cpu_summary()}; load average before: {load_before}, after: {_loadavg()}")
    per_request = counted["e) segmentation, one window per forward"][1] / clients
    print(f"Dense serving: a UNet on 128 x 128 uploads (64 px windows, overlap 0.25: {per_request:.0f} windows a "
          f"request with the run's flip TTA), {clients} concurrent clients for {seconds:.0f} s each in "
          f"{max(1, rounds)} turns; ratio against (e)")
    print(f"{'server':<42}{'req/s':>8}{'ratio':>7}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}{'windows/pass':>13}"
          f"{'passes/req':>11}{'peak RSS MB':>12}")
    results = {label: summarise(a["latencies"], a["errors"], a["elapsed"]) for label, a in acc.items()}
    unbatched = results["e) segmentation, one window per forward"]["requests_per_s"]
    for label, r in results.items():
        per_pass = acc[label]["windows"] / acc[label]["batches"] if acc[label]["batches"] else float("nan")
        per_request = acc[label]["batches"] / r["ok"] if r["ok"] else float("nan")
        print(f"{label:<42}{r['requests_per_s']:>8.1f}{r['requests_per_s'] / unbatched:>6.2f}x{r['p50_ms']:>9.1f}"
              f"{r['p99_ms']:>9.1f}{r['errors']:>7d}{per_pass:>13.1f}{per_request:>11.2f}"
              f"{rss.get(label, float('nan')):>12.0f}")
    print(f"forward calls counted by a hook on the network, {clients} concurrent requests in this process "
          "(the servers' code path):")
    for label, (calls, windows) in counted.items():
        print(f"  {label:<42}{calls:>6d} forward calls for {windows} windows = {calls / clients:.2f} per request, "
              f"{windows / max(calls, 1):.1f} windows per call")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per server, in all")
    parser.add_argument("--rounds", type=int, default=4,
                        help="the servers take turns this many times (seconds / rounds each turn), so that a "
                             "drift in the machine's speed falls on all of them alike")
    parser.add_argument("--model", default="resnet18", help="network served by every server")
    parser.add_argument("--workers", type=int, default=0,
                        help="worker processes of the extra row a2 (default: one per core; 1 skips the row)")
    parser.add_argument("--max-batch-size", type=int, default=0,
                        help="batching servers' largest batch (default: clients)")
    parser.add_argument("--max-wait-ms", type=float, default=100.0,
                        help="batching servers' longest wait to fill a batch (long enough for every client's next "
                             "request to join the one batch)")
    parser.add_argument("--batch-idle-ms", type=float, default=0.0, help="batching servers' idle gap (0: off)")
    parser.add_argument("--only", default="", help="comma-separated row letters to run, e.g. a,a2,c (default: all)")
    parser.add_argument("--quick", action="store_true", help="8 clients, 4 s each, lepton_cnn")
    parser.add_argument("--no-segmentation", dest="segmentation", action="store_false",
                        help="skip the dense rows (d, e): a segmentation model with and without window batching")
    parser.add_argument("--segmentation-only", action="store_true",
                        help="only the dense rows (d, e) and the forward-pass count (a few minutes)")
    parser.add_argument("--precisions", default="fp32,bf16,int8",
                        help="a row (a) per serving precision (`lepton serve --precision P`), each checked on the "
                             "version's val set first; its AUC delta against fp32 is printed")
    parser.add_argument("--reference", type=Path, default=None,
                        help="another Lepton source tree (e.g. `git worktree add /tmp/ref COMMIT`): rows (a) and (b) "
                             "also run from its src/, in the same turns, and the same-run ratios are printed")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds, args.model = 8, 4.0, "lepton_cnn"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = args.workers or cores
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if args.segmentation_only:
        segmentation_rows(Path(tempfile.mkdtemp(prefix="lepton-serve-bench-")), args.clients, args.seconds,
                          args.rounds, env, args.max_wait_ms)
        return 0

    from PIL import Image

    import lepton
    from lepton.data.tools.synthetic import make_synthetic, write_synthetic_npz
    from lepton.registry import Registry

    tmp = Path(tempfile.mkdtemp(prefix="lepton-serve-bench-"))
    data = write_synthetic_npz(tmp / "d.npz", n=300, size=28, seed=0)
    run = lepton.train(data, preset="default", name="served", output_dir=str(tmp), model=args.model, epochs=1,
                       quiet=True)
    reg = Registry.open(tmp / "reg")
    reg.register_run(run.path, "bench")
    from lepton.precision import check_precision

    precisions = [p for p in args.precisions.split(",") if p]
    records = {p: check_precision(reg, "bench@1", p) for p in precisions}
    images, _, _ = make_synthetic(1, 28, seed=1)
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    body = buf.getvalue()
    # The same OpenMP policy for every server (`lepton serve` defaults to passive waiting): ``env`` above.
    batching = ["--max-batch-size", str(args.max_batch_size or args.clients), "--max-wait-ms", str(args.max_wait_ms),
                "--batch-idle-ms", str(args.batch_idle_ms)]
    # label -> (lepton serve options or None for the plain server, torch threads per process, extra environment)
    servers: dict[str, tuple[list[str] | None, int, dict[str, str]]] = {"a) lepton, batching": (batching, cores, {})}
    for p in precisions:
        if p != "fp32" and records[p]["accepted"]:
            servers[f"a-{p}) lepton, batching, {p}"] = ([*batching, "--precision", p], cores, {})
    if workers > 1:
        servers[f"a2) lepton, batching, {workers} workers"] = ([*batching, "--workers", str(workers)],
                                                              max(1, cores // workers), {})
    servers["b) lepton, no batching"] = (["--max-batch-size", "1"], cores, {})
    servers["c) plain FastAPI, one forward per request"] = (None, cores, {})
    if args.reference is not None:
        ref_env = {"PYTHONPATH": str((args.reference / "src").resolve())}
        servers["a-ref) reference, batching"] = (batching, cores, ref_env)
        servers["b-ref) reference, no batching"] = (["--max-batch-size", "1"], cores, ref_env)
        servers = {k: v for k, v in servers.items() if not k.startswith("a-") or "--precision" in (v[0] or [])}
    if args.only:
        wanted = set(args.only.split(",")) | {"c"}  # ratios are against (c)
        if args.reference is not None:
            wanted |= {f"{w}-ref" for w in wanted}
        servers = {k: v for k, v in servers.items() if k.split(")")[0] in wanted}
    model = reg.load_run("bench@1").model
    headers = {"content-type": "image/png"}
    procs: list[subprocess.Popen] = []
    urls: dict[str, tuple[str, str | None]] = {}
    try:
        for label, (extra, _, extra_env) in servers.items():  # all up at once; only one is under load at a time
            port = free_port()
            if extra is None:
                cmd = [sys.executable, "-c", PLAIN_SERVER, str(tmp / "reg"), "bench@1", str(port)]
                url, probe = f"http://127.0.0.1:{port}/predict", f"http://127.0.0.1:{port}/docs"
            else:
                cmd = [sys.executable, "-m", "lepton.cli", "serve", "--model", "bench", "--registry",
                       str(tmp / "reg"), "--port", str(port), "--no-auth", "--rate-limit", "0", "--max-queue",
                       "4096", *extra]
                url, probe = f"http://127.0.0.1:{port}/v1/models/bench/predict", f"http://127.0.0.1:{port}/readyz"
            log = tmp / f"server-{port}.log"  # a file, not a pipe: access logs must never block the server
            with open(log, "wb") as log_fh:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_fh, env={**env, **extra_env}))
            wait_ready(probe, procs[-1], log)
            if "--workers" in (extra or []):  # every worker has loaded its model before the clock starts
                deadline = time.monotonic() + 120
                while log.read_text().count("bench@1 loaded") < workers and time.monotonic() < deadline:
                    time.sleep(0.2)
            # Warm-up at the measured concurrency: first calls at a new batch size build the kernels for it.
            asyncio.run(load(url, body, args.clients, 3.0, headers))
            urls[label] = (url, None if extra is None else f"http://127.0.0.1:{port}/metrics")
        runs: dict[str, dict[str, list]] = {label: {"latencies": [], "errors": [], "elapsed": [], "images": [],
                                                    "batches": [], "model_ms": [], "peak": []} for label in servers}
        for _ in range(max(1, args.rounds)):
            for label, (extra, threads, _) in servers.items():
                url, metrics = urls[label]
                acc = runs[label]
                before = batch_totals(metrics) if metrics else (0.0, 0.0)
                got = asyncio.run(load(url, body, args.clients, args.seconds / max(1, args.rounds), headers))
                acc["latencies"] += got["latencies"]
                acc["errors"].append(got["errors"])
                acc["elapsed"].append(got["elapsed"])
                # Measured right after each turn (this VM's speed drifts over minutes): the model's own latency
                # at the mean batch size the server formed in that turn, with its threads, and the most images
                # per second the model gives on this machine at all (one batch of `clients` on every core).
                if metrics:
                    images, batches = (a - b for a, b in zip(batch_totals(metrics), before, strict=True))
                    acc["images"].append(images)
                    acc["batches"].append(batches)
                    if extra[:2] != ["--max-batch-size", "1"] and batches:
                        acc["model_ms"].append(model_latency_ms(model, max(1, round(images / batches)), threads, 10))
                acc["peak"].append(args.clients / model_latency_ms(model, args.clients, cores, 5) * 1000)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    results: dict[str, dict[str, float]] = {}
    for label, acc in runs.items():
        r = results[label] = summarise(acc["latencies"], sum(acc["errors"]), sum(acc["elapsed"]))
        r["peak_images_per_s"] = float(np.median(acc["peak"]))
        if acc["batches"] and sum(acc["batches"]):
            r["mean_batch"] = sum(acc["images"]) / sum(acc["batches"])
        if acc["model_ms"]:
            r["batch"] = max(1, round(r["mean_batch"]))
            r["model_ms"] = float(np.median(acc["model_ms"]))

    print(f"\nCPU: {cpu_summary()}")
    print(f"Serving {args.model} @28 px, {args.clients} concurrent clients for {args.seconds:.0f} s each in "
          f"{max(1, args.rounds)} turns, {cores} cores, loopback; ratios against (c)")
    print(f"{'server':<44}{'req/s':>9}{'ratio':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'batch':>7}{'model ms':>10}{'p99/model':>10}")
    plain = results["c) plain FastAPI, one forward per request"]["requests_per_s"]
    for label, r in results.items():
        extra = (f"{r['batch']:>7d}{r['model_ms']:>10.1f}{r['p99_ms'] / r['model_ms']:>10.2f}" if "model_ms" in r
                 else f"{'':>7}{'':>10}{'':>10}")
        print(f"{label:<44}{r['requests_per_s']:>9.1f}{r['requests_per_s'] / plain:>6.2f}x{r['p50_ms']:>9.1f}"
              f"{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['errors']:>8d}{extra}")
    for row in ("a", "b"):
        mine = next((r for k, r in results.items() if k.startswith(f"{row})")), None)
        ref = next((r for k, r in results.items() if k.startswith(f"{row}-ref)")), None)
        if mine and ref:
            print(f"({row}) against the reference ({args.reference}), same run: requests/s "
                  f"{mine['requests_per_s'] / ref['requests_per_s']:.3f}x, p99 {mine['p99_ms'] / ref['p99_ms']:.3f}x")
    print("targets: (a) >= 3x (c) requests/s, 0 errors, p99 <= 2x the model's latency at its mean batch size")
    peaks_by_precision = precision_peaks(reg, precisions, args.clients)
    print(f"per precision (checked on the version's {records[precisions[0]]['val_images']} val images; the model alone "
          f"in that precision, one batch of {args.clients}, same run):")
    for p in precisions:
        r = records[p]
        label = "a)" if p == "fp32" else f"a-{p})"
        row = next((res for k, res in results.items() if k.startswith(label)), None)
        served = (f"(a) {row['requests_per_s']:.1f} req/s = {row['requests_per_s'] / peaks_by_precision[p]:.0%} of it"
                  if row else "no (a) row")
        verdict = "accepted" if r["accepted"] else "refused"
        ratio = peaks_by_precision[p] / peaks_by_precision[precisions[0]]
        print(f"  {p:<5} val AUC {r['val_auc']:.4f} (delta {r['auc_delta']:+.4f}, {verdict}), model "
              f"{peaks_by_precision[p]:.1f} images/s = {ratio:.2f}x {precisions[0]}; {served}")
    peaks = [p for acc in runs.values() for p in acc["peak"]]
    print(f"the model alone, one batch of {args.clients} on {cores} cores: {np.median(peaks):.1f} images/s "
          f"(median over the turns, {min(peaks):.1f}-{max(peaks):.1f}) = {np.median(peaks) / plain:.2f}x (c): "
          "no server can answer more requests/s than that on this machine")
    if args.segmentation:
        segmentation_rows(tmp, args.clients, args.seconds, args.rounds, env, args.max_wait_ms)
    out = Path(__file__).resolve().parents[1] / "runs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve-load-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(
        {"clients": args.clients, "seconds": args.seconds, "rounds": args.rounds, "model": args.model, "cores": cores,
         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
