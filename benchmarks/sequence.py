"""Sequences and covariates on CPU: temporal heads and a video network on generated cine loops, the multimodal report on
real radiographs with clinical covariates, and real ECG records through the same temporal heads.

1. **Generated loops** (``lepton.data.tools.cine``: a beating chamber whose contraction sets an EF-like target,
written as
   multi-frame ultrasound DICOM; age and sex shift the EF): ``seq_gru``, ``seq_lstm``, ``seq_attention`` (frame_cnn
   per frame) and ``r2plus1d``, image only, side by side — test MAE with a 95 % bootstrap CI, R², seconds per epoch —
   then the attention head with covariates (late fusion and FiLM) and a covariates-only ridge regression, on the same
   seeded patient split (60 / 20 / 20).
2. **NIH ChestX-ray14 with clinical data** (``../shared/data/nih_cxr_clinical``: 800 radiographs, 64 px, normal vs
   abnormal, age, sex, view position), re-split by patient (its 30 patients that span the source's splits stay in one
   split): image only (``seq_attention`` over one-frame clips), covariates only (logistic regression) and both (late
   fusion), test AUC with 95 % bootstrap CIs. The source's held-out test split is not in the shared copy, not used.
3. **ECG** (``../shared/data/ecg/100``, MIT-BIH record 100, 2 leads at 360 Hz, 30 min): 4-s windows, the target the
   heart rate in beats per minute from the record's own expert beat annotations (``100.atr``) — a continuous target
   that depends on beat spacing, which only a model that integrates over time can read; the record's rhythm classes are
   too few (33 atrial premature beats) to train on. Split by time (first 60 % train, next 20 % val, last 20 % test, no
   window overlaps another split), the same GRU/LSTM/attention heads behind a 1-D convolution encoder.

Each training is short for 2 shared CPU cores (budgets printed). ``--quick`` shrinks every part (a smoke run). Prints
the CPU, peak RSS and same-run ratios against the attention head (speed) and the image-only model (MAE, AUC).
"""

from __future__ import annotations

import argparse
import csv
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HEADS = ("seq_gru", "seq_lstm", "seq_attention", "r2plus1d")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_rows(manifest: Path, options: dict, seed: int):
    """The seeded test split train() draws for this manifest: targets, covariate rows, paths, the data set and every
    clip's split."""
    from lepton.data.index.splits import assign_splits
    from lepton.data.readers.clips import load_clips
    from lepton.data.readers.covariates import parse_covariates

    data = load_clips(manifest, fps=options["fps"], length=options["frames"], size=options["size"],
                      target="value" if options["target"] == "value" else "class",
                      covariates=parse_covariates(options.get("covariates")))
    splits = assign_splits(data, val_fraction=0.2, test_fraction=0.2, seed=seed)
    keep = splits == "test"
    y = data.values[keep] if data.values is not None else data.labels[keep]
    rows = [data.covariates[i] for i in np.flatnonzero(keep)] if data.covariates else []
    return y, rows, [data.names[i] for i in np.flatnonzero(keep)], data, splits


def fit(manifest: Path, out: Path, name: str, model: str, options: dict, epochs: int, batch: int, seed: int):
    from lepton.train import train

    t0 = time.perf_counter()
    run = train(manifest, task="sequence", model=model, epochs=epochs, batch_size=batch, output_dir=str(out),
                name=name, quiet=True, seed=seed, val_fraction=0.2, test_fraction=0.2, precision="fp32",
                augment="none", task_options=options)
    with open(run.path / "history.csv", newline="") as fh:
        seconds = [float(r["seconds"]) for r in csv.DictReader(fh)]
    return run, float(np.mean(seconds)), time.perf_counter() - t0


def predict(run, names: list[str], rows: list[dict]) -> np.ndarray:
    clips = [run.task.read(p, run.preprocessing)[0][1] for p in names]
    extras = run.task.side_inputs(rows, run.preprocessing) if rows else None
    return run.predict_proba(clips, extras)


def mae_ci(y: np.ndarray, pred: np.ndarray, n: int = 1000) -> tuple[float, list[float], float]:
    from lepton.tasks.metrics import bootstrap_regression_ci, regression_metrics

    m = regression_metrics(y, pred)
    return m["mae"], bootstrap_regression_ci(y, pred, n=n)["mae"], m["r2"]


def auc_ci(y: np.ndarray, p: np.ndarray, n: int = 1000) -> tuple[float, list[float]]:
    from lepton.tasks.metrics import auc_score, bootstrap_ci

    probs = np.stack([1 - p, p], 1)
    return auc_score(y, probs), bootstrap_ci(y, probs, (p >= 0.5).astype(int), n=n)["auc"]


def loops(tmp: Path, quick: bool, only: tuple[str, ...] = ()) -> None:
    from sklearn.linear_model import RidgeCV

    from lepton.data.readers.covariates import encode, fit_schema, parse_covariates
    from lepton.data.tools.cine import write_cine_set

    n, epochs, frames = (30, 1, 8) if quick else (80, 6, 8)
    manifest = write_cine_set(tmp / "loops", n=n, size=64, seed=1)
    base = {"fps": 8, "frames": frames, "size": 32, "target": "value"}  # 1 s: a whole beat at 60-100 bpm
    print(f"\n## Generated cine loops: {n} clips (multi-frame US DICOM, 30 fps, 2 s), read at 8 fps x {frames} "
          f"frames of 32 px; {epochs} epochs, batch 4, lr 1e-3, fp32; split 60/20/20 by patient (seed 0)")
    cov = "age:numeric:years,sex:categorical"
    y, rows, names, data, splits = test_rows(manifest, {**base, "covariates": cov}, 0)
    results = {}
    print("| model | covariates | test MAE [95 % CI] | R² | s / epoch | train wall s |")
    print("|---|---|---|---|---|---|")
    for model in HEADS:
        if only and model not in only:
            continue
        run, per_epoch, wall = fit(manifest, tmp / "runs", f"{model}-img", model, base, epochs, 4, 0)
        pred = predict(run, names, [])[:, 0]
        mae, ci, r2 = mae_ci(y, pred)
        results[model] = (mae, per_epoch)
        print(f"| {model} | none | {mae:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | {r2:.3f} | {per_epoch:.1f} | {wall:.0f} |")
    for fusion in ("late", "film"):
        if only and f"att+{fusion}" not in only:
            continue
        options = {**base, "covariates": cov, "fusion": fusion}
        run, per_epoch, wall = fit(manifest, tmp / "runs", f"att-{fusion}", "seq_attention", options, epochs, 4, 0)
        pred = predict(run, names, rows)[:, 0]
        mae, ci, r2 = mae_ci(y, pred)
        results[f"att+{fusion}"] = (mae, per_epoch)
        print(f"| seq_attention | age, sex ({fusion}) | {mae:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | {r2:.3f} | "
              f"{per_epoch:.1f} | {wall:.0f} |")
    schema = fit_schema(parse_covariates(cov), [data.covariates[i] for i in np.flatnonzero(splits == "train")], "t")
    train_idx = np.flatnonzero(splits != "test")  # train + val: a ridge has no epochs to select
    ridge = RidgeCV(alphas=np.logspace(-2, 3, 12)).fit(encode(schema, [data.covariates[i] for i in train_idx]),
                                                        data.values[train_idx])
    pred = ridge.predict(encode(schema, rows))
    mae, ci, r2 = mae_ci(y, pred)
    print(f"| ridge regression | age, sex only | {mae:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | {r2:.3f} | - | - |")
    print(f"| predicting the train mean | - | {np.abs(y - data.values[splits == 'train'].mean()).mean():.2f} | - | - "
          "| - |")
    if "seq_attention" not in results:
        return
    ref_mae, ref_speed = results["seq_attention"]
    print("\nSame-run ratios against seq_attention (image only): " + ", ".join(
        f"{k} MAE x{v[0] / ref_mae:.2f}, s/epoch x{v[1] / ref_speed:.2f}" for k, v in results.items()))


def nih(tmp: Path, quick: bool) -> None:
    from sklearn.linear_model import LogisticRegressionCV

    from lepton.data.readers.covariates import encode, fit_schema, parse_covariates

    src = SHARED / "nih_cxr_clinical"
    if not (src / "metadata.csv").is_file():
        print("\n## NIH ChestX-ray14 with clinical data: skipped (../shared/data/nih_cxr_clinical is not here)")
        return
    with open(src / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if quick:
        rows = rows[::4]
    manifest = tmp / "nih.csv"
    with open(manifest, "w", newline="") as fh:  # no split column: train() re-splits by patient_id
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id", "age", "sex", "view"])
        for r in rows:
            w.writerow([str(src / r["image_path"]), "abnormal" if r["label_binary"] == "1" else "normal",
                        r["patient_id"], r["patient_age"], r["patient_sex"], r["view_position"]])
    epochs = 1 if quick else 5
    base = {"fps": 1, "frames": 1, "size": 32, "target": "class"}
    cov = "age:numeric:years,sex:categorical,view:categorical"
    print(f"\n## NIH ChestX-ray14 (64 px, read at 32 px) with age, sex, view: {len(rows)} radiographs re-split by "
          f"patient (60/20/20, seed 0); seq_attention (frame_cnn on a one-frame clip), {epochs} epochs, batch 32")
    y, test_cov, names, data, splits = test_rows(manifest, {**base, "covariates": cov}, 0)
    groups = {s: set(data.groups[splits == s]) for s in ("train", "val", "test")}
    assert not (groups["train"] & groups["test"]) and not (groups["val"] & groups["test"])
    print(f"test: {len(y)} images, {int(y.sum())} abnormal; no patient in two splits")
    print("| inputs | test AUC [95 % CI] |")
    print("|---|---|")
    out = {}
    run, _, wall = fit(manifest, tmp / "runs", "nih-img", "seq_attention", base, epochs, 32, 0)
    out["image"] = auc_ci(y, predict(run, names, [])[:, 1])
    print(f"| image only | {out['image'][0]:.3f} [{out['image'][1][0]:.3f}, {out['image'][1][1]:.3f}] |")
    schema = fit_schema(parse_covariates(cov), [data.covariates[i] for i in np.flatnonzero(splits == "train")], "t")
    keep = np.flatnonzero(splits != "test")
    clf = LogisticRegressionCV(max_iter=2000).fit(encode(schema, [data.covariates[i] for i in keep]),
                                                 data.labels[keep])
    out["covariates"] = auc_ci(y, clf.predict_proba(encode(schema, test_cov))[:, 1])
    print(f"| covariates only (logistic regression) | {out['covariates'][0]:.3f} "
          f"[{out['covariates'][1][0]:.3f}, {out['covariates'][1][1]:.3f}] |")
    run, _, wall2 = fit(manifest, tmp / "runs", "nih-both", "seq_attention", {**base, "covariates": cov}, epochs, 32,
                        0)
    out["both"] = auc_ci(y, predict(run, names, test_cov)[:, 1])
    print(f"| image + covariates (late fusion) | {out['both'][0]:.3f} [{out['both'][1][0]:.3f}, "
          f"{out['both'][1][1]:.3f}] |")
    print(f"Training wall time: image {wall:.0f} s, image + covariates {wall2:.0f} s. Same-run ratio: AUC both / image "
          f"x{out['both'][0] / out['image'][0]:.3f}")


def ecg(quick: bool) -> None:
    import torch

    from lepton.data.readers.sequence import read_wfdb
    from lepton.models.sequence import SignalNet

    record = SHARED / "ecg" / "100"
    if not record.with_suffix(".hea").is_file():
        print("\n## ECG: skipped (../shared/data/ecg is not here)")
        return
    import wfdb

    clip = read_wfdb(record.with_suffix(".hea"))
    ann = wfdb.rdann(str(record), "atr")
    beats = np.array([s for s, sym in zip(ann.sample, ann.symbol, strict=True) if sym in "NLRAaJSVFejE/fQ"])
    fs, win = 360, 4 * 360
    signal = clip.frames[::4]  # 90 Hz
    total = len(clip.frames)
    bounds = {"train": (0, int(0.6 * total)), "val": (int(0.6 * total), int(0.8 * total)),
              "test": (int(0.8 * total), total)}

    def windows(lo: int, hi: int, stride: int):
        xs, ys = [], []
        for start in range(lo, hi - win, stride):
            inside = beats[(beats >= start) & (beats < start + win)]
            if len(inside) < 3:
                continue
            ys.append(60.0 * fs / float(np.diff(inside).mean()))
            xs.append(signal[start // 4:(start + win) // 4].T)
        return torch.tensor(np.stack(xs), dtype=torch.float32), torch.tensor(ys, dtype=torch.float32)[:, None]

    sets = {k: windows(*v, stride=3 * fs if k == "train" else 4 * fs) for k, v in bounds.items()}
    mean, std = sets["train"][0].mean((0, 2), keepdim=True), sets["train"][0].std((0, 2), keepdim=True)
    sets = {k: ((x - mean) / std, y) for k, (x, y) in sets.items()}
    y_mean, y_std = float(sets["train"][1].mean()), float(sets["train"][1].std())
    epochs = 2 if quick else 6
    n_train = len(sets["train"][0]) if not quick else 300
    print(f"\n## ECG: MIT-BIH record 100, 4-s windows of 2 leads at 90 Hz; target heart rate (bpm) from the annotated "
          f"beats; split by time 60/20/20 (train {n_train} windows, stride 3 s; val {len(sets['val'][0])}, test "
          f"{len(sets['test'][0])}, stride 4 s); {epochs} epochs, batch 32, AdamW lr 3e-3, model chosen on val MAE")
    y_test = sets["test"][1][:, 0].numpy()
    print(f"target: train mean {y_mean:.1f} bpm (sd {y_std:.1f}); test sd {y_test.std():.1f}")
    print("| head | test MAE bpm [95 % CI] | R² | s / epoch |")
    print("|---|---|---|---|")
    torch.manual_seed(0)
    for head in ("gru", "lstm", "attention"):
        model = SignalNet(2, 1, head, target_mean=y_mean, target_std=y_std)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        x, y = sets["train"][0][:n_train], sets["train"][1][:n_train]
        best, best_state, times = np.inf, None, []
        for _ in range(epochs):
            model.train()
            t0 = time.perf_counter()
            for idx in torch.randperm(len(x)).split(32):
                loss = torch.nn.functional.smooth_l1_loss(model(x[idx]) / y_std, y[idx] / y_std)
                opt.zero_grad()
                loss.backward()
                opt.step()
            times.append(time.perf_counter() - t0)
            model.eval()
            with torch.inference_mode():
                val = float((model(sets["val"][0]) - sets["val"][1]).abs().mean())
            if val < best:
                best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
        with torch.inference_mode():
            pred = model(sets["test"][0])[:, 0].numpy()
        mae, ci, r2 = mae_ci(y_test, pred)
        print(f"| {head} | {mae:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | {r2:.3f} | {np.mean(times):.1f} |")
    print(f"| predicting the train mean | {np.abs(y_test - y_mean).mean():.2f} | - | - |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer clips, images and epochs")
    parser.add_argument("--only", choices=("loops", "nih", "ecg"), help="run one part")
    parser.add_argument("--rows", default="", help="loops: only these rows, comma-separated (seq_gru, seq_lstm, "
                                                   "seq_attention, r2plus1d, att+late, att+film); the ridge always")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    print(f"Sequence benchmark ({'quick' if args.quick else 'full'}); CPU: {cpu_summary()}; torch threads 2")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "loops"):
            loops(Path(tmp), args.quick, tuple(r for r in args.rows.split(",") if r))
        if args.only in (None, "nih"):
            nih(Path(tmp), args.quick)
        if args.only in (None, "ecg"):
            ecg(args.quick)
    print(f"\nWall time {time.perf_counter() - t0:.0f} s; peak RSS {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
