"""Federated against centralized and site-alone training on the shared PneumoniaMNIST, 4 sites, IID and label skew.

The train and val splits are shared between the sites with ``lepton data partition`` (IID; Dirichlet label skew
with alpha 0.5). Every arrangement trains the same recipe (lepton_cnn, AdamW at a constant 1e-3, batch 64, light
augmentation) for the same number of epochs over its data — ``rounds x local epochs``:

* centralized: one model on all the train images (what pooling would give);
* FedAvg and FedProx (mu 0.01): Flower's strategies on its simulation engine, every site every round;
* with ``--secagg``, FedAvg under secure aggregation (Flower's SecAgg+) too: what the protocol costs in time and
  whether its quantization costs accuracy;
* site alone: each site's own model on its own images.

Each model is scored on the whole val split (global) and on every site's own val share, AUC and ACC (threshold
0.5) with 95 % bootstrap CIs on the global figures. Also: rounds, bytes on the wire per round, wall time. The test
split is held out (not in the shared file). ``--quick``: one scheme, 1,000 train images, 2 rounds.

    python benchmarks/federated.py [--rounds 10] [--local-epochs 1] [--quick] [--secagg] [--schemes iid,label-skew]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
SITES = 4


def score(run_dir: Path, images: np.ndarray, labels: np.ndarray, ci: bool = False) -> dict:
    from lepton.runs import load_run
    from lepton.tasks.metrics import auc_score, bootstrap_ci

    run = load_run(run_dir)
    probs = run.predict_proba(images)
    pred = probs.argmax(1)
    out = {"auc": auc_score(labels, probs), "acc": float((pred == labels).mean())}
    if ci:
        out["ci"] = bootstrap_ci(labels, probs, pred, n=500)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--secagg", action="store_true", help="also FedAvg under SecAgg+")
    parser.add_argument("--schemes", default="iid,label-skew", help="comma-separated: iid, label-skew")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} is absent")
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    from lepton.data import load_dataset
    from lepton.data.index.partition import write_partition
    from lepton.federated.simulation import simulate
    from lepton.federated.site import SiteSettings
    from lepton.train import train

    print(f"CPU: {cpu_summary()}")
    wanted = {s.strip() for s in args.schemes.split(",")}
    schemes = [("label-skew", 0.5)] if args.quick else [(s, a) for s, a in (("iid", None), ("label-skew", 0.5))
                                                         if s in wanted]
    strategies = ("fedavg", "fedprox", "fedavg+secagg") if args.secagg else ("fedavg", "fedprox")
    rounds = 2 if args.quick else args.rounds
    epochs = rounds * args.local_epochs
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = DATA
        if args.quick:
            with np.load(DATA) as z:
                arrays = {k: z[k] for k in z.files}
            rng = np.random.default_rng(0)
            keep = np.sort(rng.choice(len(arrays["train_labels"]), 1000, replace=False))
            arrays["train_images"], arrays["train_labels"] = arrays["train_images"][keep], arrays["train_labels"][keep]
            source = tmp / "quick.npz"
            np.savez(source, **arrays)
        data = load_dataset(source)
        val = data.subset(data.splits == "val")
        val_x, val_y = np.asarray(val.images), val.labels
        settings = SiteSettings(batch_size=64, local_epochs=args.local_epochs)
        print(f"data: {source.name}, train {int((data.splits == 'train').sum())} / val {len(val_y)}; {SITES} sites; "
              f"{rounds} rounds x {args.local_epochs} local epoch(s) = {epochs} epochs for every arrangement")
        rows = []
        for scheme, alpha in schemes:
            manifests = write_partition(data, str(source), tmp / f"{scheme}-sites", SITES, scheme, alpha or 0.5, 0)
            site_val = []
            for m in manifests:
                idx = np.asarray(json.loads(m.read_text())["indices"])
                idx = idx[data.splits[idx] == "val"]
                site_val.append((np.asarray(data.images)[idx], data.labels[idx]))
            results = {}
            t0 = time.perf_counter()
            config = settings.train_config(str(source))
            config.epochs, config.name, config.output_dir = epochs, f"{scheme}-central", str(tmp / "runs")
            train(config=config, quiet=True)
            results["centralized"] = (tmp / "runs" / f"{scheme}-central", time.perf_counter() - t0, None)
            for strategy in strategies:
                t0 = time.perf_counter()
                tag = strategy.replace("+", "-")
                run_dir = simulate(str(source), SITES, {
                    "strategy": strategy.split("+")[0], "rounds": rounds, "local-epochs": args.local_epochs,
                    "batch-size": 64, "proximal-mu": 0.01 if strategy == "fedprox" else 0.0,
                    "secagg": strategy.endswith("+secagg"), "name": f"{scheme}-{tag}",
                    "output-dir": str(tmp / "runs")}, scheme=scheme, alpha=alpha or 0.5, seed=0,
                    sites_dir=tmp / f"{scheme}-{tag}-sites", cpus_per_site=1.0)
                info = json.loads((run_dir / "run.json").read_text())
                results[strategy] = (run_dir, time.perf_counter() - t0, info["federated"]["model_bytes_per_round"])
            local = []
            for k, m in enumerate(manifests):
                config = settings.train_config(str(m))
                config.epochs, config.name, config.output_dir = epochs, f"{scheme}-site{k}", str(tmp / "runs")
                t0 = time.perf_counter()
                try:
                    train(config=config, quiet=True)
                    local.append((tmp / "runs" / f"{scheme}-site{k}", time.perf_counter() - t0))
                except Exception as exc:  # a site without some class cannot train a classifier alone
                    local.append((None, f"{type(exc).__name__}: {str(exc)[:80]}"))
            for name, (run_dir, seconds, nbytes) in results.items():
                g = score(run_dir, val_x, val_y, ci=True)
                per_site = [score(run_dir, x, y) for x, y in site_val]
                rows.append((scheme, name, g, per_site, seconds, nbytes))
            for k, (run_dir, seconds) in enumerate(local):
                if run_dir is None:
                    rows.append((scheme, f"site {k} alone", None, [None] * SITES, seconds, None))
                    continue
                g = score(run_dir, val_x, val_y, ci=True)
                own = [score(run_dir, x, y) if j == k else None for j, (x, y) in enumerate(site_val)]
                rows.append((scheme, f"site {k} alone", g, own, seconds, None))
            counts = [json.loads(m.read_text())["counts"]["train"] for m in manifests]
            print(f"\n{scheme}: train images per site (normal/pneumonia): "
                  + ", ".join("/".join(str(v) for v in c.values()) for c in counts))
        print("\n| scheme | model | global val AUC [95 % CI] | global val ACC | own val AUC per site (0-3) | wall s "
              "| MB per round |")
        print("|---|---|---|---|---|---|---|")

        def f(x):
            return "n/a" if x is None or not np.isfinite(x) else f"{x:.4f}"

        for scheme, name, g, per_site, seconds, nbytes in rows:
            if g is None:
                print(f"| {scheme} | {name} | not trainable ({seconds}) | | | | |")
                continue
            ci = g["ci"]["auc"]
            sites = " / ".join(f(s["auc"]) if s else "-" for s in per_site)
            # SecAgg+: each site sends its masked weights as 64-bit integers (twice the float32 weights; checked
            # in tests/test_federated_secure.py) plus ~2 KB of keys and shares.
            mb = f"{(3 if name.endswith('+secagg') else 2) * SITES * nbytes / 1e6:.1f}" if nbytes else "-"
            print(f"| {scheme} | {name} | {g['auc']:.4f} [{ci[0]:.3f}, {ci[1]:.3f}] | {g['acc']:.4f} | {sites} | "
                  f"{seconds:.0f} | {mb} |")
        print("\nMB per round: the global weights to every site and each site's weights back "
              f"({SITES} sites x 2 x model size; under SecAgg+ the masked weights go back as 64-bit integers: "
              f"{SITES} x 3 x model size).")
        for scheme, _ in schemes:
            central = next(r for r in rows if r[0] == scheme and r[1] == "centralized")[2]["auc"]
            for strategy in strategies:
                fed = next(r for r in rows if r[0] == scheme and r[1] == strategy)
                gap = fed[2]["auc"] - central
                better = [fed[3][k]["auc"] > r[3][k]["auc"] for k in range(SITES)
                          for r in rows if r[0] == scheme and r[1] == f"site {k} alone" and r[2] is not None
                          and np.isfinite(r[3][k]["auc"]) and np.isfinite(fed[3][k]["auc"])]
                print(f"{scheme} {strategy}: global val AUC {gap:+.4f} against centralized "
                      f"(target: within 0.01); better than site-alone on its own val at {sum(better)} of "
                      f"{len(better)} sites with a local model")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
