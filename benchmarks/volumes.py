"""MedMNIST-3D on CPU: the ``medmnist3d`` preset on AdrenalMNIST3D and VesselMNIST3D, against MedMNIST v2's
published test-split figures.

For each shared file (``../shared/data/{adrenal,vessel}mnist3d.npz``, train and val only) it trains the preset
through the CLI, as a user would, within its 10-minute budget, and prints val AUC/ACC with 95 % bootstrap CIs,
wall time and peak memory; with ``--test-file NAME=PATH`` it also scores a held-out test split. The published
rows are test-split figures (Yang et al., Scientific Data 2023, Table 3): compare them with test figures, the
val figures only show the run is sound. Files that are absent are skipped with a message. ``--quick`` trains
2 epochs on slices of each file, in about a minute.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
#: Published test-split figures (AUC, ACC) from the MedMNIST v2 paper: the best ResNet row, and auto-sklearn.
PUBLISHED = {
    "adrenalmnist3d": {"best ResNet (18/50, 3-D/2.5-D/ACS)": (0.839, 0.760), "auto-sklearn": (0.828, 0.802)},
    "vesselmnist3d": {"ResNet-18 + ACS": (0.930, 0.928), "auto-sklearn": (0.910, 0.915)},
}


def slice_file(src: Path, dst: Path, n_train: int, n_val: int) -> Path:
    with np.load(src) as npz:
        rng = np.random.default_rng(0)
        arrays = {}
        for split, n in (("train", n_train), ("val", n_val)):
            idx = rng.permutation(len(npz[f"{split}_labels"]))[:n]
            arrays |= {f"{split}_images": npz[f"{split}_images"][idx], f"{split}_labels": npz[f"{split}_labels"][idx]}
    np.savez(dst, **arrays)
    return dst


def fmt(m: dict) -> str:
    auc, acc = m["ci95"]["auc"], m["ci95"]["acc"]
    return f"AUC {m['auc']:.3f} [{auc[0]:.3f}, {auc[1]:.3f}]  ACC {m['acc']:.3f} [{acc[0]:.3f}, {acc[1]:.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--sets", default="adrenalmnist3d,vesselmnist3d")
    parser.add_argument("--test-file", action="append", default=[], help="NAME=PATH of a file with test_* arrays")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench-volumes")
    parser.add_argument("--quick", action="store_true", help="2 epochs on slices of each file")
    parser.add_argument("--slab", action="store_true", help="also train the 2.5-D variant (--slab) of the preset "
                                                            "and print its figures beside the 3-D run's")
    parser.add_argument("--time-budget", type=float, help="seconds of training per run (default: the preset's)")
    args = parser.parse_args()
    tests = dict(item.split("=", 1) for item in args.test_file)

    print(f"MedMNIST-3D benchmark ({'quick' if args.quick else 'full'}); CPU: {cpu_summary()}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {"cpu": cpu_summary(), "quick": args.quick, "sets": {}}
    tmp = Path(tempfile.mkdtemp(prefix="lepton-bench3d-"))
    for name in args.sets.split(","):
        source = args.data / f"{name}.npz"
        if not source.is_file():
            print(f"SKIP {name}: {source} not found (the benchmark reads ../shared/data)")
            continue
        data = slice_file(source, tmp / f"{name}.npz", 256, 64) if args.quick else source
        for variant in (["3d", "2.5d"] if args.slab else ["3d"]):
            row = run_one(args, name, data, variant, stamp, tests)
            if row is None:
                return 1
            results["sets"][f"{name}/{variant}" if args.slab else name] = row
        for label, (auc, acc) in PUBLISHED[name].items():
            print(f"  published (test) {label:<38} AUC {auc:.3f}  ACC {acc:.3f}")
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"volumes-{stamp}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nfigures written to {out}")
    return 0


def run_one(args, name: str, data: Path, variant: str, stamp: str, tests: dict[str, str]) -> dict | None:
    """Train one variant in a child process and evaluate it on val (and test when given)."""
    from lepton.evaluate import evaluate

    run_name = f"{name}-medmnist3d-{variant}-{stamp}"
    cmd = [sys.executable, "-m", "lepton.cli", "train", str(data), "--preset", "medmnist3d", "--name", run_name,
           "--output-dir", str(args.output), "--quiet"] + (["--epochs", "2"] if args.quick else [])
    cmd += (["--slab"] if variant == "2.5d" else []) + \
        (["--time-budget", str(args.time_budget)] if args.time_budget else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return None
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    run_dir = args.output / run_name
    info = json.loads((run_dir / "run.json").read_text())
    val = evaluate(run_dir, split="val", n_bootstrap=1000, plots=False)
    m = val["metrics"][val["primary_threshold"]]
    print(f"\n{name} ({variant}): {info['epochs']} epochs (best {info['best_epoch']}), {wall:.0f} s wall, "
          f"peak {peak:.0f} MiB")
    print(f"  val ({val['images']} images): {fmt(m)}")
    row = {"run": str(run_dir), "wall_seconds": wall, "peak_memory_mib": peak, "epochs": info["epochs"],
           "val": {"auc": m["auc"], "acc": m["acc"], "ci95": m["ci95"]}}
    if name in tests:
        test = evaluate(run_dir, tests[name], split="test", n_bootstrap=1000, plots=False)
        t = test["metrics"][test["primary_threshold"]]
        print(f"  test ({test['images']} images): {fmt(t)}")
        row["test"] = {"auc": t["auc"], "acc": t["acc"], "ci95": t["ci95"]}
    return row


if __name__ == "__main__":
    sys.exit(main())
