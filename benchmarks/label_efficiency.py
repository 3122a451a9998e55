"""Label efficiency on CPU: how much of the labelled-data gap self-supervised pretraining, semi-supervised training
and active learning close on PneumoniaMNIST.

From ``../shared/data/pneumoniamnist.npz`` — train and val splits only; the file has no test split here and none is
used — it keeps 1 %, 5 %, 10 % and 100 % of the training labels (seeded, stratified) and trains, in one run:

- **supervised**: the labelled images only;
- **pretrained**: the same, starting from a backbone pretrained once by ``lepton.pretrain`` (SimCLR, contrastive) on
  all the training images with their labels ignored;
- **semi** (FixMatch, ``lepton.train.semi``): the labelled images plus the rest of the training images as the
  unlabelled pool (checked against val by ``check_pool``);

and reports val AUC with a 95 % bootstrap CI for each. Then an **active-learning simulation**: from the 1 % start,
rounds of 50 labels chosen by ``lepton.label.suggest``'s entropy score or at random, the model retrained each round,
val AUC with CIs per round at equal labels.

The budget is a number of optimiser steps (``FULL``: 100 at batch 32) for every low-label model, epochs for 100 %;
the network is ``lepton_cnn_tiny`` in one PyTorch thread, so that the whole run fits a shared 2-core CPU (4 and 9
minutes for the two parts side by side at a load average of ~20). Val selects nothing: the figure is the last
step's. ``--quick`` runs a slice for a smoke test.
Goals (issue #35): with 10 % of the labels, within 0.01 val AUC of 100 % supervised; with 1 %, at least 0.05 above
supervised-only at 1 %.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
MODEL = "lepton_cnn_tiny"
FRACTIONS = (0.01, 0.05, 0.10, 1.0)
#: Sized for a 2-core CPU shared with other jobs (the figures in docs/benchmarks.md: load average ~25, so one thread
#: got a small share of a core): about 30 minutes with the two parts run side by side (``--part table``, ``--part al``).
FULL = {"steps": 100, "full_epochs": 2, "pretrain_epochs": 10, "rounds": 4, "per_round": 50, "train": None,
        "semi_ratio": 1}
QUICK = {"steps": 40, "full_epochs": 1, "pretrain_epochs": 1, "rounds": 2, "per_round": 20, "train": 600,
         "semi_ratio": 1}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stratified(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of about ``fraction`` of the images, the classes in their proportions (at least 2 of each)."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == k))[:max(2, round(fraction * (labels == k).sum()))]
             for k in np.unique(labels)]
    return np.sort(np.concatenate(picks))


class Bench:
    """The data in memory and the files each training reads (a labelled subset + val; a pool of the rest)."""

    def __init__(self, tmp: Path, budget: dict):
        with np.load(DATA) as npz:
            self.x, self.y = npz["train_images"], npz["train_labels"].ravel()
            self.xv, self.yv = npz["val_images"], npz["val_labels"]
        if budget["train"]:
            keep = stratified(self.y, budget["train"] / len(self.y), seed=1)
            self.x, self.y = self.x[keep], self.y[keep]
        self.tmp, self.budget, self.backbone = tmp, budget, None
        self.times: dict[str, float] = {}
        # Training images with the very pixels of a val image never enter the unlabelled pool (check_pool refuses
        # them; PneumoniaMNIST has such duplicates).
        val = {hashlib.sha256(im.tobytes()).digest() for im in self.xv}
        self.val_duplicates = np.array([hashlib.sha256(im.tobytes()).digest() in val for im in self.x])

    def files(self, labelled: np.ndarray, tag: str) -> tuple[Path, Path]:
        lab, pool = self.tmp / f"{tag}.npz", self.tmp / f"{tag}-pool.npz"
        np.savez(lab, train_images=self.x[labelled], train_labels=self.y[labelled, None], val_images=self.xv,
                 val_labels=self.yv)
        outside = np.ones(len(self.x), bool)
        outside[labelled] = False
        np.savez(pool, images=self.x[outside & ~self.val_duplicates])
        return lab, pool

    def fit(self, labelled: np.ndarray, method: str, tag: str):
        """Train on the labelled indices by ``method``; the trainer and its val probabilities."""
        import torch

        from lepton.config import make_config
        from lepton.tasks import get_task
        from lepton.train.data import prepare_data
        from lepton.train.semi import make_trainer

        t0 = time.perf_counter()
        lab, pool = self.files(labelled, tag)
        full = len(labelled) == len(self.y)
        steps_per_epoch = -(-len(labelled) // 32)
        ratio = self.budget["semi_ratio"]
        extra = {"unlabelled": str(pool), "semi": "fixmatch", "semi_ratio": ratio} if method == "semi" else {}
        epochs = self.budget["full_epochs"] if full else -(-self.budget["steps"] // (
            max(1, (len(self.y) - len(labelled)) // (32 * ratio)) if method == "semi" else steps_per_epoch))
        config = make_config("default", data=str(lab), model=MODEL, epochs=epochs, batch_size=32, lr=3e-3,
                             augment="light", imbalance="weighted", threads=1, precision="fp32", seed=0,
                             output_dir=str(self.tmp / "runs"), **extra)
        torch.manual_seed(0)
        prepared = prepare_data(config, quiet=True)
        trainer = make_trainer(config, get_task("classification"), prepared, "cpu",
                               pretrained=str(self.backbone) if method == "pretrained" else None)
        for epoch in range(1, epochs + 1):
            trainer.train_epoch(epoch)
        probs = trainer.predict_val()
        self.times[tag] = time.perf_counter() - t0
        return trainer, prepared, probs

    def pretrain(self) -> None:
        from lepton.pretrain import pretrain

        t0 = time.perf_counter()
        np.savez(self.tmp / "all-train.npz", images=self.x)  # the training images, labels left out
        self.backbone = pretrain(self.tmp / "all-train.npz", self.tmp / "ssl", model=MODEL, method="contrastive",
                                 epochs=self.budget["pretrain_epochs"], batch_size=128, lr=2e-3, image_size=28,
                                 threads=1, quiet=True)
        self.times["pretrain"] = time.perf_counter() - t0


def score(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    from lepton.tasks.metrics import auc_score, bootstrap_ci

    y = np.asarray(y).ravel()
    ci = bootstrap_ci(y, probs, probs.argmax(1), n=1000, seed=0)["auc"]
    return {"auc": round(float(auc_score(y, probs)), 4), "ci": [round(v, 4) for v in ci]}


def active_learning(bench: Bench, start: np.ndarray) -> dict[str, list[dict]]:
    """Rounds of ``per_round`` labels from ``start``: entropy (lepton.label.suggest) against random, equal labels."""
    from lepton.label.suggest import class_scores
    from lepton.runs import Run

    out: dict[str, list[dict]] = {"entropy": [], "random": []}
    first = None
    for strategy in out:
        labelled = start.copy()
        rng = np.random.default_rng(7)
        for rnd in range(bench.budget["rounds"] + 1):
            if rnd == 0 and first is not None:
                trainer, prepared, probs = first
            else:
                trainer, prepared, probs = bench.fit(labelled, "supervised", f"al-{strategy}-{rnd}")
                first = first or (trainer, prepared, probs)
            out[strategy].append({"round": rnd, "labels": len(labelled), **score(prepared.y_val.numpy(), probs)})
            print(f"  AL {strategy:8s} round {rnd}: {len(labelled):5d} labels  AUC {out[strategy][-1]['auc']:.4f} "
                  f"{out[strategy][-1]['ci']}", flush=True)
            if rnd == bench.budget["rounds"]:
                break
            rest = np.setdiff1d(np.arange(len(bench.y)), labelled)
            if strategy == "random":
                chosen = rng.choice(rest, bench.budget["per_round"], replace=False)
            else:
                run = Run(bench.tmp, trainer.config, prepared.spec, prepared.label_names, {},
                          model=trainer.eval_model.eval())
                images = bench.x[rest][:, None].astype(np.float32) / 255.0
                _, s = class_scores(run, prepared.spec.resize(images), "entropy")
                chosen = rest[np.argsort(-s, kind="stable")[:bench.budget["per_round"]]]
            labelled = np.sort(np.concatenate([labelled, chosen]))  # the oracle's labels: the dataset's own
    return out


def label_fractions(bench: Bench) -> dict[str, dict]:
    """Supervised, pretrained and FixMatch at each fraction of the labels: val AUC with CIs."""
    bench.pretrain()
    print(f"pretraining: {bench.times['pretrain']:.0f} s", flush=True)
    table: dict[str, dict] = {}
    for fraction in FRACTIONS:
        labelled = np.arange(len(bench.y)) if fraction == 1.0 else stratified(bench.y, fraction)
        row = table.setdefault(f"{fraction:.0%}", {"labels": len(labelled)})
        for method in ("supervised", "pretrained", "semi"):
            if method == "semi" and fraction == 1.0:
                continue  # no image is left unlabelled
            tag = f"{method}-{fraction}"
            _, prepared, probs = bench.fit(labelled, method, tag)
            row[method] = {**score(prepared.y_val.numpy(), probs), "seconds": round(bench.times[tag], 1)}
            print(f"{fraction:>5.0%} {len(labelled):5d} labels {method:10s} AUC {row[method]['auc']:.4f} "
                  f"{row[method]['ci']}  {bench.times[tag]:.0f} s", flush=True)
    return table


def report(table: dict[str, dict], al: dict[str, list[dict]]) -> dict[str, float]:
    """Print the tables and the goals against what was measured; returns the goal figures."""
    goals: dict[str, float] = {}
    if table:
        print("\nlabels        supervised                pretrained                semi (FixMatch)")
        for key, row in table.items():
            cells = [f"{row[m]['auc']:.4f} [{row[m]['ci'][0]:.3f}, {row[m]['ci'][1]:.3f}]" if m in row else "-"
                     for m in ("supervised", "pretrained", "semi")]
            print(f"{key:>5s} ({row['labels']:4d})  " + "  ".join(f"{c:24s}" for c in cells))
        full = table["100%"]["supervised"]["auc"]
        best = {k: max(v[m]["auc"] for m in ("supervised", "pretrained", "semi") if m in v) for k, v in table.items()}
        goals = {"ten_percent_best_minus_full": round(best["10%"] - full, 4),
                 "one_percent_best_minus_supervised": round(best["1%"] - table["1%"]["supervised"]["auc"], 4)}
        print(f"\ngoals: 10 % (best method) against 100 % supervised {goals['ten_percent_best_minus_full']:+.4f} "
              f"({'met' if goals['ten_percent_best_minus_full'] >= -0.01 else 'not met'}: goal >= -0.01); 1 % (best "
              f"method) against 1 % supervised {goals['one_percent_best_minus_supervised']:+.4f} "
              f"({'met' if goals['one_percent_best_minus_supervised'] >= 0.05 else 'not met'}: goal >= +0.05)")
    if al:
        print("\nactive learning (val AUC per round, equal labels):")
        for e, r in zip(al["entropy"], al["random"], strict=True):
            print(f"  {e['labels']:4d} labels: entropy {e['auc']:.4f} {e['ci']}  random {r['auc']:.4f} {r['ci']}  "
                  f"(entropy - random {e['auc'] - r['auc']:+.4f})")
    return goals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small slice, one-epoch budgets (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--part", choices=("all", "table", "al"), default="all",
                        help="the label-fraction table, the active-learning simulation, or both (default)")
    args = parser.parse_args()
    print(f"CPU: {cpu_summary()}")
    if not DATA.is_file():
        print(f"skipped: {DATA} is absent (see ../shared/data/README.md)")
        return 0
    import torch

    torch.set_num_threads(1)
    budget = QUICK if args.quick else FULL
    print(f"budget: {MODEL}, 1 thread, batch 32, {budget['steps']} steps per low-label model, "
          f"{budget['full_epochs']} epochs at 100 %, SimCLR pretraining {budget['pretrain_epochs']} epochs "
          f"(batch 128), FixMatch ratio {budget['semi_ratio']} threshold 0.95", flush=True)
    t_all = time.perf_counter()
    table: dict[str, dict[str, dict]] = {}
    al: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), budget)
        print(f"data: {len(bench.y)} training images, {len(bench.yv)} val images; "
              f"{int(bench.val_duplicates.sum())} training image(s) identical to a val image kept out of the "
              "unlabelled pools", flush=True)
        if args.part in ("all", "table"):
            table = label_fractions(bench)
        if args.part in ("all", "al"):
            al = active_learning(bench, stratified(bench.y, 0.01))
    goals = report(table, al)
    print(f"wall {time.perf_counter() - t_all:.0f} s, peak RSS {peak_rss_mb():.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_summary(), "budget": budget, "table": table, "al": al,
                                         "goals": goals, "times": bench.times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
