"""Classification metrics: AUC, Youden threshold, calibration, bootstrap CIs, per-class figures."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


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


def fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, R² (1 − SSE/SST; NaN for a constant target) and Pearson's r of predictions against values."""
    y, pred = np.asarray(y, np.float64).ravel(), np.asarray(pred, np.float64).ravel()
    err = pred - y
    sst = float(((y - y.mean()) ** 2).sum())
    r = float(np.corrcoef(y, pred)[0, 1]) if len(y) > 1 and y.std() > 0 and pred.std() > 0 else math.nan
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "r2": 1.0 - float((err ** 2).sum()) / sst if sst > 0 else math.nan, "pearson_r": r}


def bootstrap_regression_ci(y: np.ndarray, pred: np.ndarray, *, n: int = 1000, seed: int = 0,
                            level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap CIs of MAE, RMSE and R² (resampling cases with replacement)."""
    y, pred = np.asarray(y, np.float64).ravel(), np.asarray(pred, np.float64).ravel()
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n, len(y)))
    err = pred[idx] - y[idx]
    mae, rmse = np.abs(err).mean(1), np.sqrt((err ** 2).mean(1))
    sst = ((y[idx] - y[idx].mean(1, keepdims=True)) ** 2).sum(1)
    ok = sst > 0
    r2 = 1.0 - (err[ok] ** 2).sum(1) / sst[ok]
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def ci(v: np.ndarray) -> list[float]:
        return [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if len(v) else [math.nan] * 2

    return {"mae": ci(mae), "rmse": ci(rmse), "r2": ci(r2)}
