"""Hippocampus segmentation on CPU: the ``segmentation`` preset on MSD Task04 against nnU-Net's published Dice.

It trains through the CLI with no option, as a user would, on ``../shared/data/hippocampus`` (a Decathlon folder:
its layout picks the task and the preset; the cases are split by a seeded, grouped draw: 70 % train, 15 % val for
model selection, 15 % test kept out of training), within the preset's 15-minute budget, then prints per-class Dice,
IoU, HD95 and ASD (mm) with 95 % bootstrap CIs over cases on the test cases, wall time and peak memory.
``--test-dir DIR`` also scores a held-out Decathlon folder (labels included). The anchor is nnU-Net's mean Dice on
this task (Isensee et al., Nature Methods 2021: about 0.90 anterior, 0.89 posterior, GPU training, 5-fold
cross-validation), not a same-split comparison. Absent data is skipped with a message. ``--quick`` trains 3 epochs
on 40 cases (about a minute).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
NNUNET = {"anterior": 0.90, "posterior": 0.89}


def subset(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` cases of a Decathlon folder, as a folder of links."""
    spec = json.loads((src / "dataset.json").read_text())
    spec["training"] = spec["training"][:n]
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for item in spec["training"]:
        for key in ("image", "label"):
            target = dst / item[key]
            if not target.exists():
                target.symlink_to((src / item[key]).resolve())
    (dst / "dataset.json").write_text(json.dumps(spec))
    return dst


def table(report: dict) -> list[str]:
    lines = []
    for c, m in report["per_class"].items():
        ci = m["dice_ci95"] or [float("nan")] * 2
        hci = m["hd95_ci95"] or [float("nan")] * 2
        lines.append(f"  {c:<10} Dice {m['dice']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]  IoU {m['iou']:.4f}  "
                     f"HD95 {m['hd95']:.2f} mm [{hci[0]:.2f}, {hci[1]:.2f}]  ASD {m['asd']:.2f} mm"
                     + (f"   (nnU-Net {NNUNET[c]:.2f})" if c in NNUNET else ""))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--test-dir", type=Path, help="a held-out Decathlon folder to score")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench-segmentation")
    parser.add_argument("--model", help="another segmentation network (default: the preset's)")
    parser.add_argument("--time-budget", type=float, help="seconds of training (default: the preset's 840)")
    parser.add_argument("--quick", action="store_true", help="3 epochs on 40 cases")
    args = parser.parse_args()
    print(f"Segmentation benchmark ({'quick' if args.quick else 'full'}); CPU: {cpu_summary()}")
    if not (args.data / "dataset.json").is_file():
        print(f"SKIP: {args.data} not found (the benchmark reads ../shared/data/hippocampus)")
        return 0
    from lepton.evaluate import evaluate

    tmp = Path(tempfile.mkdtemp(prefix="lepton-bench-seg-"))
    data = subset(args.data, tmp / "hippocampus", 40) if args.quick else args.data
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"hippocampus-segmentation-{stamp}"
    # No --task and no --preset: the Decathlon layout picks segmentation and its preset, as for a user.
    cmd = [sys.executable, "-m", "lepton.cli", "train", str(data), "--name", name, "--output-dir", str(args.output),
           "--quiet"]
    cmd += ["--epochs", "3"] if args.quick else []
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--time-budget", str(args.time_budget)] if args.time_budget else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return 1
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(next((line for line in proc.stderr.splitlines() if line.startswith("task: ")), "task: (not printed)"))
    run_dir = args.output / name
    info = json.loads((run_dir / "run.json").read_text())
    print(f"\ntrained {info['epochs']} epochs (best {info['best_epoch']}) in {wall:.0f} s wall, peak {peak:.0f} MiB; "
          f"val mean Dice {info['val_dice']:.4f}")
    results = {"cpu": cpu_summary(), "run": str(run_dir), "wall_seconds": wall, "peak_memory_mib": peak,
               "epochs": info["epochs"], "val_dice": info["val_dice"]}
    t0 = time.perf_counter()
    test = evaluate(run_dir, split="test", n_bootstrap=1000)
    print(f"test split of the shared cases ({test['images']} cases, never trained on; "
          f"evaluated in {time.perf_counter() - t0:.0f} s):")
    print("\n".join(table(test)))
    print(f"  mean Dice {test['mean_dice']:.4f}")
    results["test"] = {"cases": test["images"], "mean_dice": test["mean_dice"], "per_class": test["per_class"]}
    if args.test_dir:
        held = evaluate(run_dir, args.test_dir, split="test", n_bootstrap=1000, output=run_dir / "eval" / "held-out")
        print(f"held-out folder {args.test_dir} ({held['images']} cases):")
        print("\n".join(table(held)))
        results["held_out"] = {"cases": held["images"], "mean_dice": held["mean_dice"], "per_class": held["per_class"]}
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"segmentation-{stamp}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nfigures written to {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
