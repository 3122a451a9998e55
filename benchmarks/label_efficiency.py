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

``--part hippo``: **hippocampus segmentation** (MSD Task04, ``../shared/data/hippocampus``: its training cases only —
the held-out cases are never read) with 5 and 20 labelled cases. A seeded draw of 40 cases is the val set every model
is scored on; the labelled cases are drawn from the rest, and every other case is the unlabelled pool (its labels
never read). Per labelled count: **supervised** (the labelled cases alone), **mean-teacher** and **fixmatch**
(``--semi``, the pool as unlabelled volumes, checked against val by ``check_pool``) and, unless ``--no-pretrain``,
**pretrained** (the U-Net pretrained once by masked-volume reconstruction on the labelled + unlabelled cases, then
supervised). Every model gets the same number of optimiser steps at batch 2 (the semi-supervised ones see 2 x 2
unlabelled volumes beside each batch); the figure is the last step's, Dice per class with 95 % bootstrap CIs over the
val cases.
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


HIPPO = ROOT.parent / "shared" / "data" / "hippocampus"
HIPPO_FULL = {"steps": 200, "val": 40, "labelled": (5, 20), "pretrain_epochs": 4}
HIPPO_QUICK = {"steps": 12, "val": 8, "labelled": (5,), "pretrain_epochs": 1, "cases": 40}
HIPPO_LABELS = ["background", "anterior", "posterior"]


class Hippo:
    """The hippocampus cases split once (val, then the labelled draws), and the files each training reads: a mask
    manifest of the labelled cases + val, and a CSV of the unlabelled volumes' paths."""

    def __init__(self, tmp: Path, budget: dict):
        spec = json.loads((HIPPO / "dataset.json").read_text())
        cases = [(HIPPO / c["image"], HIPPO / c["label"]) for c in spec["training"]][:budget.get("cases")]
        order = np.random.default_rng(0).permutation(len(cases))
        self.val = [cases[i] for i in order[:budget["val"]]]
        self.rest = [cases[i] for i in order[budget["val"]:]]
        self.tmp, self.budget, self.backbone = tmp, budget, None
        self.times: dict[str, float] = {}

    def files(self, n: int) -> tuple[Path, Path]:
        folder = self.tmp / f"hippo-{n}"
        folder.mkdir(exist_ok=True)
        rows = ["path,mask,split"] + [f"{i},{m},train" for i, m in self.rest[:n]] + \
            [f"{i},{m},val" for i, m in self.val]
        (folder / "labelled.csv").write_text("\n".join(rows) + "\n")
        (folder / "labels.json").write_text(json.dumps(HIPPO_LABELS))
        (folder / "pool.csv").write_text("\n".join(["path"] + [str(i) for i, _ in self.rest[n:]]) + "\n")
        return folder / "labelled.csv", folder / "pool.csv"

    def pretrain(self) -> None:
        from lepton.pretrain import pretrain

        t0 = time.perf_counter()
        source = self.tmp / "hippo-all.csv"
        source.write_text("\n".join(["path"] + [str(i) for i, _ in self.rest]) + "\n")
        self.backbone = pretrain(source, self.tmp / "hippo-ssl", model="unet", method="masked",
                                 epochs=self.budget["pretrain_epochs"], batch_size=8, lr=1e-3, slices="volume",
                                 image_size=self.size, threads=1, quiet=True)
        self.times["pretrain"] = time.perf_counter() - t0

    def fit(self, n: int, method: str):
        """Train with ``n`` labelled cases by ``method``; the prepared data and the val probabilities."""
        import torch

        from lepton.config import make_config
        from lepton.tasks import get_task
        from lepton.train.data import prepare_data
        from lepton.train.semi import make_trainer

        t0 = time.perf_counter()
        lab, pool = self.files(n)
        semi = method in ("mean-teacher", "fixmatch")
        batch, ratio = 2, 2
        # optimiser steps per epoch (a last batch of one is skipped: BatchNorm-free or not, the loop needs two)
        per_epoch = (len(self.rest) - n) // (batch * ratio) if semi else n // batch
        epochs = max(1, -(-self.budget["steps"] // max(1, per_epoch)))
        extra = {"unlabelled": str(pool), "semi": method, "semi_ratio": ratio, "semi_threshold": 0.9} if semi else {}
        config = make_config("segmentation", data=str(lab), epochs=epochs, batch_size=batch, threads=1,
                             precision="fp32", seed=0, warmup_epochs=0.0, tta=False,
                             output_dir=str(self.tmp / "runs"), **extra)
        torch.manual_seed(0)
        prepared = prepare_data(config, quiet=True)
        self.size = int(prepared.spec.size[-1])
        trainer = make_trainer(config, get_task("segmentation"), prepared, "cpu",
                               pretrained=str(self.backbone) if method == "pretrained" else None)
        rows = [trainer.train_epoch(epoch) for epoch in range(1, epochs + 1)]
        probs = trainer.predict_val()
        self.times[f"{method}-{n}"] = time.perf_counter() - t0
        return prepared, probs, epochs * per_epoch, rows[-1]


def dice_scores(y, probs) -> dict[str, dict]:
    """Dice per foreground class over the val cases: mean and 95 % bootstrap CI (1,000 resamples of the cases)."""
    from lepton.tasks.seg_metrics import mean_ci

    y, probs = np.asarray(y), np.asarray(probs)
    pred = probs.argmax(1)
    out = {}
    for k, name in enumerate(HIPPO_LABELS[1:], start=1):
        p, t = pred == k, y[:, 0] == k
        axes = tuple(range(1, p.ndim))
        inter, total = (p & t).sum(axes), p.sum(axes) + t.sum(axes)
        dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
        mean, ci = mean_ci(dice.tolist(), 1000)
        out[name] = {"dice": round(mean, 4), "ci": [round(v, 4) for v in ci] if ci else None}
    return out


def hippocampus(budget: dict, methods: tuple[str, ...]) -> dict[str, dict]:
    """Supervised, pretrained, Mean Teacher and FixMatch with 5 and 20 labelled cases: val Dice per class."""
    table: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        hippo = Hippo(Path(tmp), budget)
        print(f"hippocampus: {len(hippo.val)} val cases, {len(hippo.rest)} others (labelled + unlabelled); "
              f"{budget['steps']} steps per model at batch 2", flush=True)
        for n in budget["labelled"]:
            row = table.setdefault(f"{n} labelled", {"unlabelled": len(hippo.rest) - n})
            for method in methods:
                if method == "pretrained" and hippo.backbone is None:
                    hippo.pretrain()
                    print(f"  pretraining (masked, {budget['pretrain_epochs']} epochs): "
                          f"{hippo.times['pretrain']:.0f} s", flush=True)
                prepared, probs, steps, last = hippo.fit(n, method)
                tag = f"{method}-{n}"
                row[method] = {**dice_scores(prepared.y_val.numpy(), probs), "steps": steps,
                               "seconds": round(hippo.times[tag], 1),
                               **({"unsup_loss": round(last["unsup_loss"], 4),
                                   "pseudo_fraction": round(last["pseudo_fraction"], 3)} if "unsup_loss" in last
                                  else {})}
                cells = "  ".join(f"{c} {row[method][c]['dice']:.4f} {row[method][c]['ci']}" for c in HIPPO_LABELS[1:])
                print(f"  {n:3d} labelled {method:12s} {cells}  {steps} steps  {hippo.times[tag]:.0f} s  "
                      f"load {Path('/proc/loadavg').read_text().split()[0]}", flush=True)
        table["times"] = hippo.times
    return table


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
    parser.add_argument("--part", choices=("all", "table", "al", "hippo"), default="all",
                        help="the label-fraction table, the active-learning simulation, both (default), or the "
                             "hippocampus segmentation part")
    parser.add_argument("--no-pretrain", action="store_true", help="hippocampus: leave out the pretrained models")
    args = parser.parse_args()
    print(f"CPU: {cpu_summary()}")
    if args.part == "hippo":
        return main_hippo(args)
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


def main_hippo(args) -> int:
    """The hippocampus part on its own: its table and the peak memory."""
    if not (HIPPO / "dataset.json").is_file():
        print(f"skipped: {HIPPO} is absent (see ../shared/data/README.md)")
        return 0
    import torch

    torch.set_num_threads(1)
    budget = HIPPO_QUICK if args.quick else HIPPO_FULL
    methods = ("supervised", *(() if args.no_pretrain else ("pretrained",)), "mean-teacher", "fixmatch")
    t0 = time.perf_counter()
    table = hippocampus(budget, methods)
    print("\nval Dice per class [95 % CI over val cases]:")
    for key, row in table.items():
        if key == "times":
            continue
        for method in methods:
            m = row[method]
            print(f"  {key:12s} ({row['unlabelled']} unlabelled) {method:12s} "
                  + "  ".join(f"{c} {m[c]['dice']:.4f} {m[c]['ci']}" for c in HIPPO_LABELS[1:]))
        base = row["supervised"]
        for method in methods[1:]:
            gain = {c: round(row[method][c]["dice"] - base[c]["dice"], 4) for c in HIPPO_LABELS[1:]}
            print(f"  {key:12s} {method} - supervised: {gain}")
    print(f"wall {time.perf_counter() - t0:.0f} s, peak RSS {peak_rss_mb():.0f} MB, "
          f"load {Path('/proc/loadavg').read_text().strip()}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_summary(), "budget": budget, "hippocampus": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
