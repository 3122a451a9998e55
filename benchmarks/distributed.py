"""Data-parallel training on this machine: one process against ``--nproc`` processes (torchrun, gloo), the same
recipe and the same effective batch, on the shared PneumoniaMNIST (synthetic data when it is absent).

Each arrangement trains ``lepton train`` from the command line, as a user would; the figures are the job's training
images per second (all processes together), the wall time of the whole command (start-up, rendezvous and the
final evaluation included) and the val AUC of the selected epoch. The same-run ratio is N processes against one.
On a machine with C cores, one process uses C threads and each of N processes C/N: the comparison is of how the
cores are used, not of more hardware. Multi-node speed-ups need more machines than this one and are not measured.

    python benchmarks/distributed.py [--nproc 2] [--epochs 3] [--model lepton_cnn] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"


def run(data: Path, out: Path, name: str, nproc: int, args: argparse.Namespace, sync_bn: bool = True) -> dict:
    cores = os.cpu_count() or 1
    cmd = [sys.executable, "-m", "lepton", "train", str(data), "--preset", "default", "--model", args.model,
           "--epochs", str(args.epochs), "--batch-size", str(args.batch // nproc), "--augment", "light",
           "--ema-decay", "0", "--output-dir", str(out), "--name", name, "--quiet", "--nproc", str(nproc),
           "--sync-bn" if sync_bn else "--no-sync-bn"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    info = json.loads((out / name / "run.json").read_text())
    rows = list(csv.DictReader((out / name / "history.csv").open()))
    train_s = sum(float(r["seconds"]) for r in rows)
    return {"name": name, "processes": nproc,
            "batchnorm": "-" if nproc == 1 else ("synced" if sync_bn else "own"),
            "threads_each": max(1, cores // nproc),
            "images_per_s": info["images_per_s"], "epoch_s": train_s / len(rows), "wall_s": wall,
            "val_auc": info["val_auc"], "best_epoch": info["best_epoch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128, help="effective (global) batch")
    parser.add_argument("--model", default="lepton_cnn")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 1,000 images")
    args = parser.parse_args()
    print(f"CPU: {cpu_summary()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import numpy as np

        if DATA.exists():
            data = DATA
            source = "shared PneumoniaMNIST (train 4,708 / val 524, 28x28)"
        else:
            from lepton.data.tools.synthetic import write_synthetic_npz

            data = write_synthetic_npz(tmp / "synthetic.npz", n=2000, size=28, seed=0)
            source = "synthetic (shared data absent)"
        if args.quick:
            args.epochs = 1
            with np.load(data) as z:
                small = {k: (z[k][:1000] if k.startswith("train") else z[k]) for k in z.files}
            np.savez(tmp / "quick.npz", **small)
            data, source = tmp / "quick.npz", source + ", first 1,000 train images"
        print(f"data: {source}; {args.model}, {args.epochs} epochs, effective batch {args.batch}")
        results = [run(data, tmp, "one", 1, args), run(data, tmp, f"n{args.nproc}", args.nproc, args),
                   run(data, tmp, f"n{args.nproc}-own-bn", args.nproc, args, sync_bn=False)]
    print("\n| processes x threads | BatchNorm | train images/s | s/epoch | wall s (whole command) | val AUC |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['processes']} x {r['threads_each']} | {r['batchnorm']} | {r['images_per_s']:.0f} | "
              f"{r['epoch_s']:.1f} | {r['wall_s']:.1f} | {r['val_auc']:.4f} |")
    one = results[0]
    for many in results[1:]:
        print(f"same-run ratio, {many['processes']} processes ({many['batchnorm']} BatchNorm) / 1: training "
              f"throughput {many['images_per_s'] / one['images_per_s']:.2f}x, wall time "
              f"{many['wall_s'] / one['wall_s']:.2f}x, val AUC {many['val_auc'] - one['val_auc']:+.4f}")

if __name__ == "__main__":
    main()
