"""Evaluation: metrics with bootstrap CIs, calibration, decision thresholds, reports and plots."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import DataError

log = logging.getLogger("lepton.evaluate")


def auc_score(y: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC: binary on P(class 1), macro one-vs-rest for multi-class; NaN if one class only."""
    from sklearn.metrics import roc_auc_score

    k = probs.shape[1]
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if k == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    if len(present) < k:  # macro OvR over the classes present
        cols = probs[:, present] / probs[:, present].sum(1, keepdims=True)
        return float(roc_auc_score(y, cols, multi_class="ovr", average="macro", labels=present))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(k))))


def youden_threshold(y: np.ndarray, p_positive: np.ndarray) -> float:
    """The threshold on P(positive) maximising sensitivity + specificity − 1 (Youden's J)."""
    from sklearn.metrics import roc_curve

    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p_positive)
    j = tpr - fpr
    best = int(np.argmax(j))
    return float(np.clip(thresholds[best], 0.0, 1.0))


def calibration(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Expected calibration error of the top-class confidence, with the per-bin table."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            acc, c = float(correct[m].mean()), float(conf[m].mean())
            ece += m.mean() * abs(acc - c)
            table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(m.sum()),
                          "accuracy": acc, "confidence": c})
    return {"ece": float(ece), "bins": table}


def bootstrap_ci(
    y: np.ndarray, probs: np.ndarray, pred: np.ndarray, *, n: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """Percentile bootstrap CIs for accuracy and AUC (resampling images with replacement)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n, len(y)))
    accs = (pred[idx] == y[idx]).mean(1)
    aucs = np.array([auc_score(y[i], probs[i]) for i in idx])
    aucs = aucs[np.isfinite(aucs)]
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {"acc": [float(np.percentile(accs, lo)), float(np.percentile(accs, hi))]}
    out["auc"] = [float(np.percentile(aucs, lo)), float(np.percentile(aucs, hi))] if len(aucs) else [math.nan] * 2
    return out


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, label_names: list[str], threshold: float | None = None
) -> dict[str, Any]:
    """ACC, balanced ACC, AUC, per-class sensitivity/specificity/precision/F1 and the confusion matrix.

    For binary tasks ``threshold`` applies to P(class 1); otherwise the arg-max class is taken.
    """
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    k = len(label_names)
    pred = (probs[:, 1] >= threshold).astype(np.int64) if (k == 2 and threshold is not None) else probs.argmax(1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=list(range(k)), zero_division=0)
    per_class = {}
    total = cm.sum()
    for i, name in enumerate(label_names):
        tp, fn, fp = cm[i, i], cm[i].sum() - cm[i, i], cm[:, i].sum() - cm[i, i]
        tn = total - tp - fn - fp
        per_class[name] = {
            "sensitivity": float(recall[i]), "specificity": float(tn / (tn + fp)) if tn + fp else math.nan,
            "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
            "support": int(support[i]),
        }
    return {
        "threshold": threshold if k == 2 else None,
        "acc": float((pred == y).mean()),
        "balanced_acc": float(balanced_accuracy_score(y, pred)) if len(np.unique(y)) > 1 else math.nan,
        "auc": auc_score(y, probs),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "_pred": pred,
    }


def evaluate(
    run,
    data: str | Path | None = None,
    *,
    split: str = "test",
    output: str | Path | None = None,
    n_bootstrap: int = 1000,
    skip_bad: bool = False,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate a run (a ``Run`` or its directory) on a split and write a report.

    Without ``data`` the run's own source is re-split exactly as in training. A different source
    is evaluated on its ``split`` if it defines splits, else on all of its images. Writes
    ``report.json``, ``report.md`` and ROC, confusion-matrix and reliability PNGs to ``output``
    (default ``RUN/eval/<split>``) and returns the report.
    """
    from lepton.runs import Run, load_run
    from lepton.utils import atomic_write_json, atomic_write_text

    run = run if isinstance(run, Run) else load_run(run)
    cfg = run.config
    source = str(data) if data is not None else cfg.data
    subset, used = select_split(run, data, split, skip_bad=skip_bad)
    same_source = source == cfg.data
    y = subset.labels
    probs = run.predict_proba(subset.images)
    names = run.label_names
    report: dict[str, Any] = {
        "run": str(run.path), "model": cfg.model, "data": source, "split": used, "images": len(y),
        "class_counts": {n: int((y == i).sum()) for i, n in enumerate(names)},
    }
    thresholds = {"argmax": None} if len(names) != 2 else {"0.5": 0.5}
    if len(names) == 2 and run.threshold is not None:
        thresholds["val_youden"] = run.threshold
    results = {}
    for key, thr in thresholds.items():
        metrics = classification_metrics(y, probs, names, thr)
        pred = metrics.pop("_pred")
        metrics["ci95"] = bootstrap_ci(y, probs, pred, n=n_bootstrap) if n_bootstrap else None
        results[key] = metrics
    primary = "val_youden" if "val_youden" in results else next(iter(results))
    report["primary_threshold"] = primary
    report["metrics"] = results
    report["calibration"] = calibration(y, probs)
    report["ece"] = report["calibration"]["ece"]
    out = Path(output) if output else run.path / "eval" / (used if same_source else f"{Path(source).stem}-{used}")
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        from lepton.plots import plot_confusion, plot_reliability, plot_roc

        plot_roc(y, probs, names, out / "roc.png")
        plot_confusion(np.array(results[primary]["confusion_matrix"]), names, out / "confusion.png")
        plot_reliability(report["calibration"], out / "reliability.png")
        report["plots"] = [str(out / f) for f in ("roc.png", "confusion.png", "reliability.png")]
    report["output"] = str(out)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def select_split(run, data: str | Path | None, split: str, *, skip_bad: bool = False):
    """The images a run is evaluated on, and the split name actually used.

    Without ``data`` the run's own source is re-split exactly as in training; another source is used
    at its ``split`` if it defines splits, else whole (split name ``all``).
    """
    from lepton.data import load_dataset
    from lepton.data.splits import assign_splits

    cfg, spec = run.config, run.preprocessing
    source = str(data) if data is not None else cfg.data
    same_source = source == cfg.data
    dataset = load_dataset(source, window=spec.window, slices=spec.slices,
                           skip_bad=skip_bad or (same_source and cfg.skip_bad))
    _check_labels(dataset.label_names, run.label_names, source)
    if same_source:
        splits = assign_splits(dataset, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                               seed=cfg.seed)
    else:
        splits = dataset.splits
    available = sorted(set(splits.tolist()) - {""})
    if not available:
        log.info("%s defines no splits: using all %d images", source, len(dataset))
        return dataset, "all"
    if split not in available:
        raise DataError(f"{source}: has no {split!r} split; available: {', '.join(available)}")
    if same_source and split == "train":
        log.warning("evaluating on the training split: figures are optimistic")
    return dataset.subset(splits == split), split


def _check_labels(found: list[str], expected: list[str], source: str) -> None:
    if found == expected:
        return
    if found == [str(i) for i in range(len(found))] and len(found) <= len(expected):
        log.warning("%s has unnamed labels; taking 0..%d as %s", source, len(found) - 1, expected)
        return
    raise DataError(f"{source}: classes {found} do not match the run's classes {expected}")


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable evaluation report."""
    lines = [f"# Evaluation: {Path(report['run']).name}", "",
             f"- Model: `{report['model']}`", f"- Data: `{report['data']}`, split **{report['split']}**, "
             f"{report['images']} images ({', '.join(f'{k}: {v}' for k, v in report['class_counts'].items())})",
             f"- Expected calibration error (15 bins): {_fmt(report['ece'])}", ""]
    for key, m in report["metrics"].items():
        ci = m.get("ci95") or {}
        thr = "arg-max" if m["threshold"] is None else f"threshold {m['threshold']:.4f} ({key})"
        lines += [f"## Decision rule: {thr}", "", "| metric | value | 95 % CI |", "|---|---|---|",
                  f"| accuracy | {_fmt(m['acc'])} | {' – '.join(_fmt(v) for v in ci.get('acc', [])) or '-'} |",
                  f"| AUC | {_fmt(m['auc'])} | {' – '.join(_fmt(v) for v in ci.get('auc', [])) or '-'} |",
                  f"| balanced accuracy | {_fmt(m['balanced_acc'])} | |", "",
                  "| class | sensitivity | specificity | precision | F1 | support |", "|---|---|---|---|---|---|"]
        for name, c in m["per_class"].items():
            lines.append(f"| {name} | {_fmt(c['sensitivity'])} | {_fmt(c['specificity'])} | "
                         f"{_fmt(c['precision'])} | {_fmt(c['f1'])} | {c['support']} |")
        lines += ["", "Confusion matrix (rows: true, columns: predicted):", "", "```"]
        lines += ["  ".join(f"{v:6d}" for v in row) for row in m["confusion_matrix"]]
        lines += ["```", ""]
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in report["plots"]]
    return "\n".join(lines) + "\n"
