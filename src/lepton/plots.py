"""Matplotlib figures for runs and reports (Agg backend, written atomically)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from lepton.utils import atomic_write_bytes


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (5, 4)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(nrows, ncols, figsize=size)


def _save(plt, fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training/validation loss, and every other validation figure of the task (AUC, accuracy, …), per epoch."""
    plt, fig, (ax1, ax2) = _figure(1, 2, (10, 4))
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss")
    ax1.set_xlabel("epoch")
    ax1.legend()
    for key in (k for k in history[0] if k.startswith("val_") and k != "val_loss"):
        ax2.plot(epochs, [h[key] for h in history], "o-", label=key.replace("_", " ").replace("auc", "AUC")
                 .replace("acc", "ACC"))
    ax2.set_xlabel("epoch")
    ax2.legend()
    _save(plt, fig, path)


def plot_roc(y: np.ndarray, probs: np.ndarray, names: list[str], path: Path) -> None:
    """ROC curve (binary) or one-vs-rest curves per class."""
    from sklearn.metrics import auc, roc_curve

    plt, fig, ax = _figure()
    classes = [1] if len(names) == 2 else range(len(names))
    for k in classes:
        if len(np.unique(y == k)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y == k, probs[:, k])
        ax.plot(fpr, tpr, label=f"{names[k]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right")
    _save(plt, fig, path)


def plot_confusion(cm: np.ndarray, names: list[str], path: Path) -> None:
    plt, fig, ax = _figure()
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    _save(plt, fig, path)


def plot_reliability(calib: dict[str, Any], path: Path) -> None:
    plt, fig, ax = _figure()
    bins = calib["bins"]
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    ax.bar(centers, [b["accuracy"] for b in bins], width=1 / 15, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {calib['ece']:.4f}")
    ax.legend(loc="upper left")
    _save(plt, fig, path)


def plot_froc(curve: list[dict[str, float]], path: Path) -> Path:
    """Lesion-level FROC: sensitivity against false positives per case."""
    plt, fig, ax = _figure()
    pts = sorted((c["fp_per_case"], c["sensitivity"]) for c in curve)
    if pts:
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post")
    ax.set_xscale("symlog", linthresh=0.125)
    ax.set_xlabel("false positives per case")
    ax.set_ylabel("lesion sensitivity")
    ax.set_ylim(0, 1.02)
    ax.set_title("FROC")
    _save(plt, fig, path)
    return path


def plot_segmentation_cases(cases: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]], labels: list[str],
                            path: Path) -> Path:
    """Rows of (title, image, truth, prediction, Dice): the image, the truth and the prediction over it; volumes show
    the axial slice with the most true foreground."""
    from matplotlib import colormaps

    plt, fig, axes = _figure(len(cases), 3, (9, 3 * len(cases)))
    axes = np.atleast_2d(axes)
    colours = colormaps["tab10"]
    for row, (title, image, truth, pred, dice) in zip(axes, cases, strict=True):
        if image.ndim == 3:
            k = int(np.argmax((truth > 0).reshape(len(truth), -1).sum(1)))
            image, truth, pred = image[k], truth[k], pred[k]
        for ax, (name, mask) in zip(row, (("image", None), ("truth", truth), (f"prediction (Dice {dice:.3f})", pred)),
                                    strict=True):
            ax.imshow(image, cmap="gray")
            if mask is not None:
                rgba = np.zeros((*mask.shape, 4))
                for c in range(1, len(labels)):
                    rgba[mask == c] = (*colours((c - 1) % 10)[:3], 0.5)
                ax.imshow(rgba)
            ax.set_title(f"{title}: {name}" if mask is None else name, fontsize=9)
            ax.axis("off")
    _save(plt, fig, path)
    return path


def plot_decision_curve(curve: dict[str, Any], path: Path) -> Path:
    """Net benefit of the model against treating all and treating none, over threshold probabilities."""
    plt, fig, ax = _figure(size=(6, 4))
    rows = curve["curve"]
    t = [r["threshold"] for r in rows]
    model = [np.nan if r["model"] is None else r["model"] for r in rows]
    ax.plot(t, model, label="model", lw=2)
    ax.plot(t, [r["treat_all"] for r in rows], label="treat all", lw=1)
    ax.plot(t, [0.0] * len(t), "k--", label="treat none", lw=0.8)
    top = np.nanmax([*model, curve["prevalence"]]) if len(model) else 1.0
    ax.set_ylim(-0.05 * max(top, 0.05), max(top, 0.05) * 1.1)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit")
    ax.set_title(f"Decision curve (prevalence {curve['prevalence']:.3f}, {curve['prevalence_source']})")
    ax.legend()
    _save(plt, fig, path)
    return path


def plot_subgroups(table: dict[str, Any], metric: str, path: Path) -> Path:
    """A forest plot of one metric per subgroup with its 95 % CI, one block per column; too-small subgroups grey."""
    rows = [(column, g) for column, entry in table["columns"].items() for g in entry["groups"] if g["n"] > 0]
    plt, fig, ax = _figure(size=(6, 0.35 * len(rows) + 1.2))
    for i, (_column, g) in enumerate(rows):
        value, ci = g["metrics"].get(metric), g["ci95"].get(metric)
        colour = "0.6" if g["too_small"] else "C0"
        if ci:
            ax.plot(ci, [i, i], color=colour, lw=2)
        if value is not None:
            ax.plot([value], [i], "o", color=colour)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{c}={g['group']} (n={g['n']})" for c, g in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (95 % CI; grey: too small to judge)")
    _save(plt, fig, path)
    return path


def plot_calibration_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = 10) -> Path:
    """Observed event rate against mean predicted probability per decile of prediction, one line per named set of
    (labels, P(positive))."""
    plt, fig, ax = _figure(size=(5, 4.5))
    for name, (y, p) in curves.items():
        order = np.argsort(p)
        chunks = [c for c in np.array_split(order, min(bins, max(1, len(p)))) if len(c)]
        ax.plot([p[c].mean() for c in chunks], [y[c].mean() for c in chunks], "o-", label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.legend()
    _save(plt, fig, path)
    return path


def plot_rounds(rows: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """Active-learning rounds: the run's ``metric`` (with its 95 % CI as error bars, where known) against the labels
    in total after each round, each point marked with its round."""
    plt, fig, ax = _figure(size=(6, 4))
    x = [r["labels_total"] for r in rows]
    y = [r[metric] for r in rows]
    low = [r[metric] - r["ci95"][0] if r["ci95"] else 0.0 for r in rows]
    high = [r["ci95"][1] - r[metric] if r["ci95"] else 0.0 for r in rows]
    ax.errorbar(x, y, yerr=[low, high], fmt="o-", capsize=4)
    for r, xi, yi in zip(rows, x, y, strict=True):
        ax.annotate(f"round {r['round']}", (xi, yi), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlabel("labels in total")
    ax.set_ylabel(f"val {metric.upper() if metric == 'auc' else metric} (95 % CI)")
    _save(plt, fig, path)
    return path
