"""Detection metrics: COCO-style average precision over IoU thresholds, per-class AP, FROC and its CPM (LUNA16), a
score threshold chosen on val, with 95 % bootstrap CIs over images.

Inputs are the detection task's arrays: targets (N, M, 2·dims + 1) — coordinates, class; rows of class -1 are padding
— and outputs (N, K, 2·dims + 2) — coordinates, score, class. Matching is greedy by score, one truth per detection,
within a class. Each image is matched once per IoU threshold; the bootstrap only resamples the matched images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: IoU thresholds averaged by mAP (lesion detection's range: nnDetection and MONAI's LUNA16 report 0.1…0.5).
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)
#: A detection hits a finding at this IoU for FROC, CPM, sensitivity and the chosen threshold.
HIT_IOU = 0.1
#: False positives per image at which CPM averages the sensitivity (LUNA16).
FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of boxes ``(lo…, hi…)`` in any dimension."""
    dims = a.shape[1] // 2
    lo = np.maximum(a[:, None, :dims], b[None, :, :dims])
    hi = np.minimum(a[:, None, dims:], b[None, :, dims:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    va = np.clip(a[:, dims:] - a[:, :dims], 0, None).prod(-1)
    vb = np.clip(b[:, dims:] - b[:, :dims], 0, None).prod(-1)
    return inter / np.maximum(va[:, None] + vb[None, :] - inter, 1e-12)


def split_rows(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                               np.ndarray]:
    """One image's padded rows as (truth boxes, truth classes, predicted boxes, scores, predicted classes)."""
    truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
    t = truth[truth[:, -1] >= 0]
    p = pred[pred[:, -1] >= 0]
    return t[:, :-1], t[:, -1].astype(int), p[:, :-2], p[:, -2], p[:, -1].astype(int)


def match(gt: np.ndarray, boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy matching by score: whether each detection (in the given order) hits a not yet matched truth."""
    hit = np.zeros(len(boxes), bool)
    if not len(gt) or not len(boxes):
        return hit
    overlaps = box_iou(boxes, gt)
    taken = np.zeros(len(gt), bool)
    for j in np.argsort(-scores, kind="stable"):
        cand = np.where(taken, -1.0, overlaps[j])
        best = int(np.argmax(cand))
        if cand[best] >= iou:
            taken[best] = hit[j] = True
    return hit


@dataclass
class Matched:
    """Per image, per IoU threshold, per class: detection scores, hits and the number of findings."""

    scores: list[dict[int, np.ndarray]]
    hits: list[dict[tuple[float, int], np.ndarray]]
    findings: list[dict[int, int]]
    classes: int


def match_all(y: np.ndarray, outputs: np.ndarray, classes: int,
              thresholds: Sequence[float] = (*IOU_THRESHOLDS,)) -> Matched:
    """Match every image's detections to its findings at each IoU threshold, class by class."""
    ts = sorted(set(thresholds) | {HIT_IOU})
    scores, hits, findings = [], [], []
    for truth, pred in zip(y, outputs, strict=True):
        gt, gc, pb, ps, pc = split_rows(truth, pred)
        s, h, f = {}, {}, {}
        for c in range(classes):
            sel = pc == c
            s[c] = ps[sel]
            f[c] = int((gc == c).sum())
            for t in ts:
                h[(t, c)] = match(gt[gc == c], pb[sel], ps[sel], t)
        scores.append(s)
        hits.append(h)
        findings.append(f)
    return Matched(scores, hits, findings, classes)


def average_precision(scores: np.ndarray, hits: np.ndarray, findings: int) -> float:
    """COCO's 101-point interpolated AP of detections (scores, hit flags) against ``findings`` truths; NaN without
    findings."""
    if findings == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    fp = np.cumsum(~hits[order])
    recall = tp / findings
    precision = tp / np.maximum(tp + fp, 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    ap = 0.0
    for r in np.linspace(0, 1, 101):
        above = np.searchsorted(recall, r, side="left")
        ap += envelope[above] if above < len(envelope) else 0.0
    return float(ap / 101)


def _pooled(m: Matched, images: np.ndarray, t: float, c: int) -> tuple[np.ndarray, np.ndarray, int]:
    s = np.concatenate([m.scores[i][c] for i in images]) if len(images) else np.zeros(0)
    h = np.concatenate([m.hits[i][(t, c)] for i in images]) if len(images) else np.zeros(0, bool)
    return s, h, int(sum(m.findings[i][c] for i in images))


def ap_table(m: Matched, images: np.ndarray, thresholds: Sequence[float] = IOU_THRESHOLDS) -> np.ndarray:
    """AP per (IoU threshold, class) over the chosen images: (len(thresholds), classes)."""
    return np.array([[average_precision(*_pooled(m, images, t, c)) for c in range(m.classes)] for t in thresholds])


def froc_points(m: Matched, images: np.ndarray, iou: float = HIT_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The FROC curve over all classes: (false positives per image, sensitivity, score threshold), by threshold."""
    parts = [_pooled(m, images, iou, c) for c in range(m.classes)]
    scores = np.concatenate([p[0] for p in parts])
    hits = np.concatenate([p[1] for p in parts])
    total = sum(p[2] for p in parts)
    order = np.argsort(-scores, kind="stable")
    tp, fp = np.cumsum(hits[order]), np.cumsum(~hits[order])
    n = max(len(images), 1)
    return fp / n, tp / max(total, 1), scores[order]


def cpm(fp_per_image: np.ndarray, sensitivity: np.ndarray, rates: Sequence[float] = FP_RATES) -> tuple[float,
                                                                                                      list[float]]:
    """The competition performance metric: the mean of the sensitivities reached at each false-positive rate (the
    highest sensitivity with no more false positives per image than the rate), and those sensitivities."""
    at = []
    for r in rates:
        ok = fp_per_image <= r
        at.append(float(sensitivity[ok].max()) if ok.any() else 0.0)
    return float(np.mean(at)), at


def headline(m: Matched, images: np.ndarray) -> dict[str, float]:
    """mAP over IoU 0.1…0.5, AP at IoU 0.5 and CPM for the chosen images (NaN where no class has findings)."""
    table = ap_table(m, images)
    valid = ~np.all(np.isnan(table), axis=0)
    fp, sens, _ = froc_points(m, images)
    return {"map": float(np.nanmean(table[:, valid])) if valid.any() else float("nan"),
            "ap50": float(np.nanmean(table[-1, valid])) if valid.any() else float("nan"),
            "cpm": cpm(fp, sens)[0]}


def bootstrap(m: Matched, n: int, n_bootstrap: int, seed: int = 0) -> dict[str, list[float] | None]:
    """95 % percentile CIs of the headline figures from ``n_bootstrap`` resamples of the images."""
    if n_bootstrap <= 0 or n < 2:
        return {"map": None, "ap50": None, "cpm": None}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"map": [], "ap50": [], "cpm": []}
    for _ in range(n_bootstrap):
        figures = headline(m, rng.integers(0, n, n))
        for k, v in figures.items():
            if np.isfinite(v):
                draws[k].append(v)
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) > 10 else None
            for k, v in draws.items()}


def choose_threshold(m: Matched, n: int) -> dict[str, float]:
    """The score threshold that maximises F1 (detections hitting findings at ``HIT_IOU``) on these images, with the
    sensitivity and false positives per image it gives; 0.5 when nothing is found."""
    fp, sens, thr = froc_points(m, np.arange(n))
    total = sum(sum(f.values()) for f in m.findings)
    if not len(thr) or total == 0:
        return {"threshold": 0.5, "sensitivity": 0.0, "fp_per_image": 0.0, "f1": 0.0}
    tp = sens * total
    f1 = 2 * tp / np.maximum(tp + fp * n + total, 1e-12)
    # a threshold only separates distinct scores: take the last row of each run of equal scores
    last = np.r_[thr[1:] != thr[:-1], True]
    best = int(np.flatnonzero(last)[np.argmax(f1[last])])
    return {"threshold": float(thr[best]), "sensitivity": float(sens[best]), "fp_per_image": float(fp[best]),
            "f1": float(f1[best])}


def at_threshold(m: Matched, n: int, threshold: float) -> dict[str, float]:
    """Sensitivity, false positives per image and precision of the detections scoring at least ``threshold``."""
    tp = fp = 0
    total = 0
    for i in range(n):
        for c in range(m.classes):
            keep = m.scores[i][c] >= threshold
            h = m.hits[i][(HIT_IOU, c)][keep]
            tp += int(h.sum())
            fp += int((~h).sum())
            total += m.findings[i][c]
    return {"sensitivity": tp / max(total, 1), "fp_per_image": fp / max(n, 1), "precision": tp / max(tp + fp, 1),
            "findings": total, "true_positives": tp, "false_positives": fp}


def detection_report(y: np.ndarray, outputs: np.ndarray, labels: list[str], threshold: float,
                     n_bootstrap: int) -> dict:
    """mAP@0.1…0.5 and AP@0.5 (overall and per class), FROC and CPM with bootstrap CIs, and the figures at the chosen
    threshold — the body of a detection evaluation."""
    n = len(y)
    m = match_all(y, outputs, len(labels))
    images = np.arange(n)
    table = ap_table(m, images)
    fp, sens, _ = froc_points(m, images)
    score, at_rates = cpm(fp, sens)
    heads = headline(m, images)
    ci = bootstrap(m, n, n_bootstrap)
    per_class = {}
    for c, name in enumerate(labels):
        col = table[:, c]
        per_class[name] = {"findings": int(sum(f[c] for f in m.findings)),
                           "ap": None if np.all(np.isnan(col)) else float(np.nanmean(col)),
                           "ap50": None if np.isnan(col[-1]) else float(col[-1]),
                           **{f"ap{int(t * 100):02d}": None if np.isnan(v) else float(v)
                              for t, v in zip(IOU_THRESHOLDS, col, strict=True)}}
    keep = np.unique(np.r_[np.searchsorted(fp, np.geomspace(1 / 16, 16, 40)), len(fp) - 1]) if len(fp) else []
    keep = [int(k) for k in keep if 0 <= k < len(fp)]
    return {"classes": labels, "map": heads["map"], "map_ci95": ci["map"], "ap50": heads["ap50"],
            "ap50_ci95": ci["ap50"], "cpm": score, "cpm_ci95": ci["cpm"],
            "froc": {"fp_per_image": list(FP_RATES), "sensitivity": at_rates, "hit_iou": HIT_IOU},
            "froc_curve": {"fp_per_image": [float(fp[k]) for k in keep], "sensitivity": [float(sens[k]) for k in keep]},
            "iou_thresholds": list(IOU_THRESHOLDS), "per_class": per_class,
            "at_threshold": {"threshold": threshold, **at_threshold(m, n, threshold)}}
