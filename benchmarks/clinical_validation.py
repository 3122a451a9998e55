"""Clinical validation on real data: subgroups on chest radiographs, external validation and recalibration.

1. NIH ChestX-ray14 subset with clinical metadata (``../shared/data/nih_cxr_clinical``: 800 radiographs at 64 px
   with age, sex and view position). A manifest is written with those columns and the patient id and no split, so
   Lepton re-splits by patient (the repository's own splits leak 30 patients); a small CNN is trained on 2 cores;
   the test split is evaluated by sex, age band and view: AUC, sensitivity and specificity per subgroup with
   bootstrap 95 % CIs, each subgroup's gap to the rest with its CI, and the too-small flags. Same-run reference:
   Fairlearn's own ``MetricFrame`` bootstrap (``n_boot``) on the same predictions — its CIs beside Lepton's, and
   the time of each.
2. PneumoniaMNIST (``../shared/data/pneumoniamnist.npz``, train/val only): a CNN trained on its train split (val
   for model selection); a
   shifted copy of its val split made with the robustness corruptions (``lepton.data.transforms.corruptions``:
   contrast and Gaussian noise) plays the external site, split in two halves. The external report (domain classifier,
   calibration) runs on the held-apart half; Platt and isotonic recalibrations are fitted on the other half and measured
   on the held-apart one: calibration slope and in-the-large before and after, with CIs.

Skips with a message when the data are absent. ``--quick`` trains for fewer epochs with fewer resamples.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nih_manifest(folder: Path, out: Path) -> Path:
    """A Lepton manifest of the NIH subset: absolute paths, labels, patient ids and the clinical columns."""
    with open(folder / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient_id", "sex", "age", "view"])
        for r in rows:
            writer.writerow([str((folder / r["image_path"]).resolve()), "abnormal" if r["label_binary"] == "1"
                             else "normal", r["patient_id"], r["patient_sex"], r["patient_age"], r["view_position"]])
    return out


def fairlearn_reference(report_dir: Path, columns: dict[str, np.ndarray], n_boot: int) -> dict:
    """Fairlearn's MetricFrame with its own bootstrap on the same predictions: AUC CIs per subgroup and the time."""
    import pandas as pd
    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import roc_auc_score

    with open(report_dir / "predictions.csv", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    y = np.array([int(r[1]) for r in rows])
    p = np.array([float(r[3]) for r in rows])
    out = {}
    start = time.perf_counter()
    for name, values in columns.items():
        frame = MetricFrame(metrics={"auc": lambda t, s: roc_auc_score(t, s) if len(set(t)) > 1 else np.nan},
                            y_true=y, y_pred=p, sensitive_features=pd.Series(list(values), name=name),
                            n_boot=n_boot, ci_quantiles=[0.025, 0.975], random_state=0)
        lo, hi = frame.by_group_ci
        out[name] = {g: [round(float(lo.loc[g, "auc"]), 3), round(float(hi.loc[g, "auc"]), 3)] for g in lo.index}
    return {"ci": out, "seconds": time.perf_counter() - start}


def part_nih(args, tmp: Path) -> dict | None:
    from lepton.evaluate import evaluate
    from lepton.train import train
    from lepton.validation.covariates import subgroup_columns

    folder = SHARED / "nih_cxr_clinical"
    if not (folder / "metadata.csv").is_file():
        print(f"skip part 1: {folder} is absent")
        return None
    manifest = nih_manifest(folder, tmp / "nih.csv")
    start = time.perf_counter()
    run = train(str(manifest), preset="default", name="nih", output_dir=str(tmp / "runs"),
                epochs=3 if args.quick else 8, batch_size=32, lr=2e-3, image_size=64, channels=1,
                val_fraction=0.15, test_fraction=0.3, seed=0, quiet=True, threads=2)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    report = evaluate(run, split="test", by=["sex", "age_band", "view"], n_bootstrap=args.bootstrap,
                      output=tmp / "nih-eval", track=[])
    evaluated = time.perf_counter() - start
    table = report["subgroups"]
    print(f"\n== 1. NIH ChestX-ray14 subset: {report['images']} test images (patient-grouped re-split), "
          f"trained {trained:.0f} s, evaluated with {args.bootstrap} resamples in {evaluated:.1f} s")
    print(f"   overall: {report['summary'][-2] if len(report['summary']) > 1 else report['summary'][0]}")
    print("   subgroup        n (pos)   AUC [95 % CI]          gap to rest [95 % CI]   sens   spec   flag")
    for column, entry in table["columns"].items():
        for g in entry["groups"]:
            auc, ci = g["metrics"]["auc"], g["ci95"]["auc"]
            gap, gci = g["gap"]["auc"], g["gap_ci95"]["auc"]
            print(f"   {column}={g['group']:<9} {g['n']:>4} ({g.get('positives', 0):>3})  "
                  f"{_f(auc)} {_ci(ci):<16} {_s(gap)} {_ci(gci):<16} {_f(g['metrics']['sensitivity'])}  "
                  f"{_f(g['metrics']['specificity'])}  {'too small' if g['too_small'] else ''}")
        gap = entry["largest_gap"]["auc"]
        print(f"   largest AUC gap by {column}: " + ("none judged" if gap is None else
              f"{gap['group']} {gap['gap']:+.3f} {_ci(gap['ci95'])}{' (CI excludes 0)' if gap['clear'] else ''}"))
    from lepton.runs import load_run

    subset_columns = _test_columns(load_run(run.path), subgroup_columns)
    start = time.perf_counter()
    ref = fairlearn_reference(tmp / "nih-eval", subset_columns, args.bootstrap)
    print(f"   same-run reference, Fairlearn MetricFrame n_boot={args.bootstrap} (AUC only): {ref['seconds']:.1f} s;"
          f" Lepton's whole evaluation above (AUC, sensitivity, specificity, gaps): {evaluated:.1f} s")
    for column, cis in ref["ci"].items():
        ours = {g["group"]: g["ci95"]["auc"] for g in table["columns"][column]["groups"]}
        print(f"   {column}: " + "; ".join(f"{g} Fairlearn {v} / Lepton {_ci(ours.get(g))}" for g, v in cis.items()))
    return {"test_images": report["images"], "train_s": trained, "eval_s": evaluated, "fairlearn_s": ref["seconds"],
            "subgroups": {c: {g["group"]: {"n": g["n"], "auc": g["metrics"]["auc"], "ci": g["ci95"]["auc"],
                                           "gap": g["gap"]["auc"], "gap_ci": g["gap_ci95"]["auc"],
                                           "too_small": g["too_small"]} for g in e["groups"]}
                          for c, e in table["columns"].items()}}


def _test_columns(run, subgroup_columns) -> dict[str, np.ndarray]:
    from lepton.evaluate import select_split

    subset, _ = select_split(run, None, "test")
    return subgroup_columns(subset, ["sex", "age_band", "view"])


def shifted_copy(source: Path, out: Path, names: list[str], seed: int = 0) -> Path:
    """The val split under contrast loss and Gaussian noise (severity 3 each), halves as ``val`` (to fit a
    recalibration) and ``test`` (held apart)."""
    import torch

    from lepton.data.transforms.corruptions import corrupt

    npz = np.load(source)
    x = torch.from_numpy(npz["val_images"].astype(np.float32)[:, None] / 255)
    x = corrupt(corrupt(x, "contrast", 3, seed), "gaussian_noise", 3, seed + 1)
    images = (x[:, 0].numpy() * 255).round().astype(np.uint8)
    labels = npz["val_labels"]
    order = np.random.default_rng(seed).permutation(len(labels))
    half = len(order) // 2
    arrays = {"val_images": images[order[:half]], "val_labels": labels[order[:half]],
              "test_images": images[order[half:]], "test_labels": labels[order[half:]]}
    arrays["label_names"] = np.array(names)  # the run's names (the shared file has none)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    out.write_bytes(buf.getvalue())
    return out


def part_pneumonia(args, tmp: Path) -> dict | None:
    from lepton.evaluate import evaluate
    from lepton.train import train
    from lepton.validation.calibrate import calibrate

    source = SHARED / "pneumoniamnist.npz"
    if not source.is_file():
        print(f"skip part 2: {source} is absent")
        return None
    start = time.perf_counter()
    run = train(str(source), preset="default", name="pneu", output_dir=str(tmp / "runs"),
                epochs=2 if args.quick else 3, batch_size=64, lr=2e-3, image_size=28, seed=0, quiet=True, threads=2)
    trained = time.perf_counter() - start
    shifted = shifted_copy(source, tmp / "shifted.npz", run.label_names)
    start = time.perf_counter()
    own = evaluate(run, split="val", n_bootstrap=args.bootstrap, output=tmp / "pneu-val", track=[], plots=False)
    ext = evaluate(run, shifted, split="test", external=True, n_bootstrap=args.bootstrap,
                   output=tmp / "pneu-external", track=[])
    external_s = time.perf_counter() - start
    e = ext["external"]
    dc, cal = e["domain_classifier"], e["calibration"]
    print(f"\n== 2. PneumoniaMNIST against a shifted copy of its val split (contrast 3 + Gaussian noise 3): "
          f"trained {trained:.0f} s, external report {external_s:.1f} s")
    print(f"   own val split: {own['summary'][-2]}")
    print(f"   shifted, held-apart half ({ext['images']} images): {ext['summary'][-2]}")
    print(f"   domain classifier AUC {dc['auc']:.3f} {_ci(dc['ci95'])}: shift "
          f"{'FLAGGED' if e['shift_flagged'] else 'not flagged'}; features that differ: "
          f"{', '.join(e['shifted_features']) or 'none'}")
    fp = e.get("fingerprint") or {}
    print(f"   mean preprocessed intensity {fp.get('external_mean')} vs training {fp.get('training_mean'):.4f} "
          f"({fp.get('difference_in_sd')} training SDs)")
    rows = [("none", cal)]
    results = {"domain_auc": dc["auc"], "domain_ci": dc["ci95"], "shift_flagged": e["shift_flagged"],
               "before": _cal(cal)}
    for method in ("platt", "isotonic"):
        fitted = calibrate(run, shifted, method=method, split="val", output=tmp / f"pneu-{method}", plots=False)
        after = evaluate(fitted["output"], shifted, split="test", external=True, n_bootstrap=args.bootstrap,
                         output=tmp / f"pneu-{method}-external", track=[], plots=False)
        rows.append((method, after["external"]["calibration"]))
        results[method] = {**_cal(after["external"]["calibration"]), "fit_images": fitted["images"],
                           "auc": after["metrics"][after["primary_threshold"]]["auc"]}
    print("   recalibration fitted on one half, measured on the held-apart half:")
    print("   method     slope [95 % CI]          in-the-large [95 % CI]    O/E     AUC")
    for method, c in rows:
        auc = ext["metrics"][ext["primary_threshold"]]["auc"] if method == "none" else results[method]["auc"]
        print(f"   {method:<9}  {_f(c['slope'])} {_ci(c['slope_ci95']):<16}  {_s(c['citl'])} "
              f"{_ci(c['citl_ci95']):<16}  {_f(c['observed_expected'])}  {_f(auc)}")
    results.update(train_s=trained, external_s=external_s)
    return results


def _cal(c: dict) -> dict:
    return {k: c.get(k) for k in ("slope", "slope_ci95", "citl", "citl_ci95", "observed_expected")}


def _f(x) -> str:
    return "  n/a" if x is None else f"{x:.3f}"


def _s(x) -> str:
    return "   n/a" if x is None else f"{x:+.3f}"


def _ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and resamples")
    parser.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default 1000, quick 200)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--only", choices=["nih", "pneumoniamnist"], help="run one part")
    args = parser.parse_args()
    args.bootstrap = args.bootstrap or (200 if args.quick else 1000)
    import torch

    torch.set_num_threads(2)
    print(cpu_summary())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        figures = {"nih": part_nih(args, Path(tmp)) if args.only in (None, "nih") else None,
                   "pneumoniamnist": part_pneumonia(args, Path(tmp)) if args.only in (None, "pneumoniamnist")
                   else None}
    figures["wall_s"] = time.perf_counter() - start
    figures["peak_rss_mb"] = peak_rss_mb()
    print(f"\nwall {figures['wall_s']:.0f} s, peak RSS {figures['peak_rss_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
