"""Batch inference over an archive: images/s and peak RSS of (a) the old path (`lepton predict RUN FOLDER`: the
folder listed, then one file at a time through ``Run.predict``), (b) the streaming local engine
(``lepton.batch.predict_batch``: decoding processes, the run's batch size, Parquet parts) and (c) the same job on Ray
Data in local mode with 2 model actors, against (d) the model's own batched forward ceiling (``predict_outputs`` on
already-normalised tensors at the run's batch size), all measured in the same run on the same trained run.

It writes N generated 256 × 256 PNGs (20,000; 4,000 under ``--quick``), trains one small run (the default preset's
network on 64-px synthetic images, one epoch), and runs each case in a process of its own so that its peak RSS
(sampled from /proc: the process, and the tree of it with its decoding processes) is its own. The streaming
engine also runs on the first quarter of the images (5,000; 1,000 under ``--quick``): its peak RSS should not grow
with the number of images. The old path runs on N/4 only (a file at a time: its rate does not depend on N). Under
Ray the process tree includes the local Ray's own processes (raylet, GCS, workers); its shared-memory object store
counts once per process that maps it.

Goals (issue #28), on 2 cores: (b) ≥ 0.9× (d); (b)'s peak RSS the same at N/4 and N; (c) ≥ 0.8× (b).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def write_pngs(root: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """``n`` chest-X-ray-like 256² PNGs (a few hundred distinct images, saved under distinct names)."""
    import numpy as np
    from PIL import Image

    from lepton.data.tools.synthetic import make_synthetic

    images, _, _ = make_synthetic(min(n, 256), size, seed=seed)
    for i in range(n):
        folder = root / f"{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(images[i % len(images)])).save(folder / f"img{i:06d}.png")
    return root


def train_run(root: Path) -> Path:
    from lepton.data.tools.synthetic import write_synthetic_npz
    from lepton.train import train

    npz = write_synthetic_npz(root / "synth.npz", n=256, size=64, seed=1)
    return train(npz, preset="default", name="bench", output_dir=str(root / "runs"), epochs=1, quiet=True,
                 seed=0).path


def tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants (kB, from /proc; Linux)."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            total += next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                total += sum(tree_rss_kb(int(child)) for child in fh.read().split())
    except (OSError, ValueError):
        pass
    return total


def sample_peak(stop, peak: list[int], interval: float = 0.1) -> None:
    """Sample this process tree's RSS until ``stop`` is set; the peak goes in ``peak[0]``."""
    while not stop.is_set():
        peak[0] = max(peak[0], tree_rss_kb(os.getpid()))
        stop.wait(interval)


def case(args) -> dict:
    """One measurement, in this process (started by ``main``), with the peak RSS of the process tree (this process,
    its decoding processes; under Ray, the local Ray's processes too) sampled every 0.1 s."""
    import threading

    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=sample_peak, args=(stop, peak), daemon=True)
    sampler.start()
    try:
        result = _case(args)
    finally:
        stop.set()
        sampler.join()
    with open("/proc/self/status") as fh:
        own = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return {**result, "tree_peak_rss_mb": round(peak[0] / 1024, 1), "process_peak_rss_mb": round(own / 1024, 1)}


def _case(args) -> dict:
    import torch

    from lepton.runs import load_run

    run = load_run(args.run)
    folder, n = Path(args.images), args.n
    if args.case == "ceiling":
        from lepton.runs import predict_outputs

        x = torch.randn(n, *run.preprocessing(torch.zeros(1, 1, 256, 256).numpy()).shape[1:])
        predict_outputs(run.model, x[:run.config.batch_size], run.task.activate, batch_size=run.config.batch_size)
        start = time.perf_counter()
        predict_outputs(run.model, x, run.task.activate, batch_size=run.config.batch_size, tta=run.config.tta)
        return {"seconds": time.perf_counter() - start, "images": n}
    if args.case == "old":  # lepton predict RUN FOLDER, as the CLI did it before batch mode
        from lepton.cli.predict import _expand

        start = time.perf_counter()
        count = 0
        with open(os.devnull, "w") as sink:
            for image in _expand([folder])[:n]:  # the folder listed whole, then a file at a time
                for row in run.predict([image]):
                    sink.write(json.dumps(row) + "\n")
                    count += 1
        return {"seconds": time.perf_counter() - start, "images": count}
    from lepton.batch import predict_batch

    paths = sorted(folder.rglob("*.png"))[:n]
    listing = Path(args.work) / f"list-{n}.txt"
    listing.write_text("\n".join(map(str, paths)) + "\n")
    output = Path(args.work) / f"{args.case}-{n}.parquet"
    if args.case == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        summary = predict_batch(run, listing, output, engine="ray", workers=2, overwrite=True, progress=False)
        ray.shutdown()
    else:
        summary = predict_batch(run, listing, output, workers=args.workers, overwrite=True, progress=False)
    assert summary.rows == n and summary.errors == 0, summary
    return {"seconds": summary.seconds, "images": summary.rows}


def measure(name: str, run: Path, images: Path, work: Path, n: int, workers: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--case", name, "--run", str(run), "--images", str(images), "--work", str(work),
           "--n", str(n)] + (["--workers", str(workers)] if workers is not None else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if proc.returncode != 0:
        raise SystemExit(f"{name} at {n} failed ({proc.returncode})")
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    result.update(case=name, n=n, rate=round(result["images"] / result["seconds"], 1),
                  load=round(os.getloadavg()[0], 1))
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4,000 images (and 1,000) instead of 20,000 (5,000)")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--case", choices=["old", "local", "ray", "ceiling"])
    parser.add_argument("--run"), parser.add_argument("--images"), parser.add_argument("--work")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--keep", help="a folder to keep the images and the run in (reused when there)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args)))
        return
    n = args.n or (4000 if args.quick else 20000)
    small = n // 4
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lepton-batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    images = work / "images"
    started = time.perf_counter()
    if len(list(images.rglob("*.png"))) < n if images.exists() else True:
        write_pngs(images, n)
    run = work / "runs" / "bench"
    if not (run / "best.pt").exists():
        run = train_run(work)
    print(f"# {cpu_summary()}; {n} PNGs of 256x256 and a run ready in {time.perf_counter() - started:.0f} s",
          flush=True)
    results = {"ceiling": measure("ceiling", run, images, work, 1024)}
    results["local"] = measure("local", run, images, work, n)
    results["local_small"] = measure("local", run, images, work, small)
    results["old"] = measure("old", run, images, work, small)  # a file at a time: its rate does not depend on N
    results["ray"] = measure("ray", run, images, work, n)
    c, b, a, r, s = (results[k]["rate"] for k in ("ceiling", "local", "old", "ray", "local_small"))
    print("\n| path | images | images/s | x ceiling | peak RSS, process (MB) | peak RSS, process tree (MB) |"
          "\n|---|---:|---:|---:|---:|---:|")
    for key, label in (("ceiling", "(d) batched forward ceiling"), ("old", "(a) old path"),
                       ("local_small", "(b) streaming local"), ("local", "(b) streaming local"),
                       ("ray", "(c) Ray local, 2 actors")):
        row = results[key]
        print(f"| {label} | {row['n']} | {row['rate']} | {row['rate'] / c:.2f} | {row['process_peak_rss_mb']} | "
              f"{row['tree_peak_rss_mb']} |")
    print(f"\n(b)/(d) = {b / c:.2f} (goal >= 0.9); (c)/(b) = {r / b:.2f} (goal >= 0.8); (b)/(a) = {b / a:.2f}; "
          f"(b) peak RSS (process tree) {results['local_small']['tree_peak_rss_mb']} MB at {small} and "
          f"{results['local']['tree_peak_rss_mb']} MB at {n}; small-set rate {s}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"# max RSS of this driver {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"files in {work}")


if __name__ == "__main__":
    main()
