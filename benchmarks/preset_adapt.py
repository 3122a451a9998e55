"""Does the automatic preset spend its budget well on MedMNIST-format data it was not tuned on?

Builds small MedMNIST-format sets from the shared data, each scored on images the run never sees (the shared
files' official val split becomes the test split; the run's own train/val come from the shared train split):

* ``pneumonia-546``: 546 train + 78 val PneumoniaMNIST images (the size of the small set of issue #15);
* ``pneumonia-1500``: 1,500 + 200;
* ``adrenal-2d`` / ``vessel-2d``: the middle axial slice of AdrenalMNIST3D / VesselMNIST3D volumes (28x28 grey),
  a domain the preset never saw, 85 % / 15 % of the shared train split.

Each set trains with ``lepton.train(preset="auto")`` under ``--time-budget`` seconds (default: the preset's) and
prints epochs, the seconds used, the best epoch, val and held-out test AUC/ACC. ``--set K=V`` passes a config
override (for comparing variants); ``--quick`` uses a 40-second budget. Files that are absent are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _split(rng, labels: np.ndarray, n_train: int | None, n_val: int | None, val_share: float = 0.15):
    """Stratified train/val indices of ``labels`` (fixed sizes, or ``val_share`` of everything)."""
    idx = rng.permutation(len(labels))
    if n_train is None:
        n_val = round(len(idx) * val_share)
        n_train = len(idx) - n_val
    train, val = [], []
    for c in np.unique(labels):
        members = idx[labels[idx] == c]
        share = len(members) / len(idx)
        k_val, k_train = round(n_val * share), round(n_train * share)
        val += list(members[:k_val])
        train += list(members[k_val:k_val + k_train])
    return np.array(sorted(train)), np.array(sorted(val))


def make_sets(data: Path, out: Path) -> dict[str, Path]:
    """The MedMNIST-format files (train, val, test) this benchmark trains on; absent sources are skipped."""
    sets: dict[str, Path] = {}
    rng = np.random.default_rng(15)
    src = data / "pneumoniamnist.npz"
    if src.exists():
        with np.load(src) as z:
            x, y, xt, yt = z["train_images"], z["train_labels"], z["val_images"], z["val_labels"]
        for name, n_train, n_val in (("pneumonia-546", 546, 78), ("pneumonia-1500", 1500, 200)):
            tr, va = _split(rng, y[:, 0], n_train, n_val)
            sets[name] = out / f"{name}.npz"
            np.savez(sets[name], train_images=x[tr], train_labels=y[tr], val_images=x[va], val_labels=y[va],
                     test_images=xt, test_labels=yt)
    for stem in ("adrenal", "vessel"):
        src = data / f"{stem}mnist3d.npz"
        if not src.exists():
            continue
        with np.load(src) as z:
            x, y = z["train_images"][:, 14], z["train_labels"]
            xt, yt = z["val_images"][:, 14], z["val_labels"]
        tr, va = _split(rng, y[:, 0], None, None)
        sets[f"{stem}-2d"] = out / f"{stem}-2d.npz"
        np.savez(sets[f"{stem}-2d"], train_images=x[tr], train_labels=y[tr], val_images=x[va], val_labels=y[va],
                 test_images=xt, test_labels=yt)
    return sets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--sets", default="pneumonia-546,pneumonia-1500,adrenal-2d,vessel-2d")
    parser.add_argument("--time-budget", type=float, help="seconds of training per set (default: the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, e.g. --set epochs=40 (values read as YAML)")
    parser.add_argument("--quick", action="store_true", help="a 40-second budget per set")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench-preset")
    args = parser.parse_args()

    import yaml

    from lepton.evaluate import evaluate
    from lepton.train import train

    print(f"CPU: {cpu_summary()}")
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    if args.quick:
        overrides["time_budget_s"] = 40.0
    if args.time_budget:
        overrides["time_budget_s"] = args.time_budget
    tmp = Path(tempfile.mkdtemp(prefix="lepton-preset-"))
    sets = make_sets(args.data, tmp)
    wanted = [s for s in args.sets.split(",") if s]
    if not any(s in sets for s in wanted):
        print(f"skipped: none of {', '.join(wanted)} can be made from {args.data}")
        return 0
    print(f"overrides: {overrides or 'none'}")
    print("| set | train | epochs | members kept/trained | seconds | val AUC | test AUC [95% CI] | test ACC |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in wanted:
        if name not in sets:
            print(f"| {name} | skipped: source absent | | | | | | |")
            continue
        t0 = time.perf_counter()
        run = train(sets[name], preset="auto", quiet=True, output_dir=str(args.output),
                    name=f"{name}-{int(time.time())}", **overrides)
        seconds = time.perf_counter() - t0
        report = evaluate(run, split="test", plots=False, n_bootstrap=500)
        test = report["metrics"][report["primary_threshold"]]
        ci = test["ci95"]["auc"]
        row = {"set": name, "train": run.info["train_images"], "epochs": run.info["epochs"], "seconds": seconds,
               "best_epoch": run.info["best_epoch"], "val_auc": run.info.get("val_auc"), "test_auc": test["auc"],
               "test_acc": test["acc"], "members": run.info.get("members", 1),
               "members_trained": run.info.get("members_trained", 1)}
        rows.append(row)
        members = f"{row['members']}/{row['members_trained']}"
        print(f"| {name} | {row['train']} | {row['epochs']} | {members} | {seconds:.0f} | {row['val_auc']:.3f} | "
              f"{test['auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {test['acc']:.3f} |", flush=True)
    (args.output).mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps({"cpu": cpu_summary(), "overrides": overrides,
                                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
