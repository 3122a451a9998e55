"""Segmentation metrics: overlap and surface distances per case and class (MONAI's distance metrics, in mm),
lesions as connected components with their size and position, lesion-level detection and FROC, bootstrap CIs,
voxel calibration and the report's figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lepton.tasks.metrics import calibration


def dice_iou(pred: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float]:
    """Dice and IoU of class ``k``; both masks empty counts as full agreement (1.0)."""
    p, t = pred == k, truth == k
    inter, ps, ts = int(np.logical_and(p, t).sum()), int(p.sum()), int(t.sum())
    if ps + ts == 0:
        return 1.0, 1.0
    return 2.0 * inter / (ps + ts), inter / (ps + ts - inter)


def surface_distances(pred: np.ndarray, truth: np.ndarray, k: int, spacing: tuple[float, ...]) -> tuple[float, float]:
    """95th-percentile Hausdorff and average symmetric surface distance (mm) of class ``k``; NaN when either mask is
    empty (the distance is undefined)."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p, t = pred == k, truth == k
    if not p.any() or not t.any():
        return float("nan"), float("nan")
    yp = torch.from_numpy(p[None, None].astype(np.float32))
    yt = torch.from_numpy(t[None, None].astype(np.float32))
    import warnings

    with warnings.catch_warnings():  # MONAI 1.5+ warns about an argument its own code passes
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(yp, yt, include_background=True, percentile=95, spacing=list(spacing))
        asd = compute_average_surface_distance(yp, yt, include_background=True, symmetric=True,
                                               spacing=list(spacing))
    return float(hd.item()), float(asd.item())


def voxel_volume(spacing: tuple[float, ...]) -> float:
    """One voxel in mL (3-D, spacing in mm), or one pixel in mm² (2-D)."""
    return float(np.prod(spacing)) / (1000.0 if len(spacing) == 3 else 1.0)


def case_metrics(pred: np.ndarray, truth: np.ndarray, labels: list[str], spacing: tuple[float, ...]) -> dict[str, Any]:
    """Per foreground class: Dice, IoU, HD95 and ASD (mm), predicted and true size (mL for volumes, mm² or pixels
    for images)."""
    unit = voxel_volume(spacing)
    out = {}
    for k in range(1, len(labels)):
        dice, iou = dice_iou(pred, truth, k)
        hd95, asd = surface_distances(pred, truth, k, spacing)
        out[labels[k]] = {"dice": dice, "iou": iou, "hd95": hd95, "asd": asd,
                          "pred_size": float((pred == k).sum() * unit), "true_size": float((truth == k).sum() * unit)}
    return out


def mean_ci(values: list[float], n: int = 1000, seed: int = 0) -> tuple[float, list[float] | None]:
    """Mean of the finite values and its 95 % bootstrap CI over cases (None with fewer than 2 values)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), None
    if len(v) < 2 or n <= 0:
        return float(v.mean()), None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n, len(v)))].mean(1)
    return float(v.mean()), [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def components(mask: np.ndarray):
    """Connected components of a boolean mask (faces, edges and corners connect): (labelled array, count)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return ndimage.label(mask, structure=structure)


def lesions(label_map: np.ndarray, probs: np.ndarray | None, labels: list[str], spacing: tuple[float, ...],
            affine: np.ndarray | None = None, *, min_voxels: int = 1) -> list[dict[str, Any]]:
    """Every connected component of every foreground class: class, voxel count, size (mL, or mm²/pixels in 2-D),
    centroid (RAS mm when ``affine`` is given, else voxel indices), bounding box (voxel indices, inclusive) and
    the highest class probability inside it; largest first."""
    from scipy import ndimage

    unit = voxel_volume(spacing)
    out = []
    for k in range(1, len(labels)):
        comp, count = components(label_map == k)
        if count == 0:
            continue
        index = np.arange(1, count + 1)
        sizes = ndimage.sum_labels(np.ones_like(comp), comp, index)
        centres = ndimage.center_of_mass(np.ones_like(comp), comp, index)
        boxes = ndimage.find_objects(comp)
        peaks = ndimage.maximum(probs[k], comp, index) if probs is not None else [None] * count
        for i in range(count):
            if sizes[i] < min_voxels:
                continue
            centre = np.asarray(centres[i], dtype=np.float64)
            item: dict[str, Any] = {"class": labels[k], "voxels": int(sizes[i]),
                                    ("volume_ml" if len(spacing) == 3 else "area"): round(float(sizes[i] * unit), 4),
                                    "bbox": [[int(s.start), int(s.stop - 1)] for s in boxes[i]],
                                    "max_probability": None if peaks[i] is None else round(float(peaks[i]), 4)}
            if affine is not None:
                item["centroid_mm"] = [round(float(v), 2) for v in (affine @ [*centre, 1.0])[:3]]
            else:
                item["centroid"] = [round(float(v), 2) for v in centre]
            out.append(item)
    return sorted(out, key=lambda d: -d["voxels"])


def detection(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]], labels: list[str],
              fp_rates: tuple[float, ...] = (0.125, 0.25, 0.5, 1, 2, 4, 8)) -> dict[str, Any]:
    """Lesion-level detection over cases of (predicted label map, true label map, probabilities): a true lesion is
    found when a predicted lesion of its class overlaps it. Returns sensitivity, false positives per case and the
    FROC curve (sensitivity at each rate of false positives per case, sweeping the lesions' peak probability)."""
    from scipy import ndimage

    found_peaks: list[float] = []  # per true lesion: the best peak probability of a predicted lesion touching it
    fp_peaks: list[float] = []
    n_true = 0
    for pred, truth, probs in cases:
        for k in range(1, len(labels)):
            true_comp, n_t = components(truth == k)
            pred_comp, n_p = components(pred == k)
            n_true += n_t
            if n_p == 0:
                found_peaks += [-1.0] * n_t
                continue
            peaks = ndimage.maximum(probs[k], pred_comp, np.arange(1, n_p + 1))
            touching = [set() for _ in range(n_p)]
            for t in range(1, n_t + 1):
                hit = np.unique(pred_comp[(true_comp == t) & (pred_comp > 0)])
                found_peaks.append(max((peaks[h - 1] for h in hit), default=-1.0))
                for h in hit:
                    touching[h - 1].add(t)
            fp_peaks += [float(peaks[i]) for i in range(n_p) if not touching[i]]
    n_cases = max(1, len(cases))
    found = np.asarray(found_peaks, dtype=np.float64)
    fps = np.asarray(fp_peaks, dtype=np.float64)
    thresholds = np.unique(np.concatenate([found[found >= 0], fps, [0.0]]))[::-1]
    curve = [{"threshold": float(t), "sensitivity": float((found >= t).sum() / max(1, n_true)),
              "fp_per_case": float((fps >= t).sum() / n_cases)} for t in thresholds]
    froc = {}
    for rate in fp_rates:
        ok = [c["sensitivity"] for c in curve if c["fp_per_case"] <= rate]
        froc[str(rate)] = max(ok) if ok else 0.0
    return {"true_lesions": n_true, "found": int((found >= 0).sum()),
            "sensitivity": float((found >= 0).sum() / n_true) if n_true else float("nan"),
            "fp_per_case": float(len(fps) / n_cases), "froc": froc,
            "froc_mean": float(np.mean(list(froc.values()))) if froc else float("nan"), "curve": curve}


def voxel_calibration(cases, limit: int = 200_000, seed: int = 0) -> dict[str, Any]:
    """Reliability of voxel probabilities on a seeded sample of voxels from every case."""
    rng = np.random.default_rng(seed)
    ys, ps = [], []
    per_case = max(1, limit // max(1, len(cases)))
    for _, truth, probs in cases:
        flat_t, flat_p = truth.reshape(-1), probs.reshape(probs.shape[0], -1)
        pick = rng.choice(flat_t.size, size=min(per_case, flat_t.size), replace=False)
        ys.append(flat_t[pick])
        ps.append(flat_p[:, pick].T)
    return calibration(np.concatenate(ys).astype(np.int64), np.concatenate(ps))


def report_plots(body, cases, case_dice, meta, labels, folder: Path) -> list[str]:
    """Overlay montages of the best, median and worst cases, the reliability diagram and the FROC curve."""
    from lepton.plots import plot_froc, plot_reliability, plot_segmentation_cases

    order = np.argsort(case_dice)
    picks = {"worst": int(order[0]), "median": int(order[len(order) // 2]), "best": int(order[-1])}
    images = meta.get("images")
    out = []
    if images is not None:
        shown = [(name, np.asarray(images[i])[0], cases[i][1], cases[i][0], case_dice[i]) for name, i in picks.items()]
        out.append(str(plot_segmentation_cases(shown, labels, folder / "cases.png")))
    plot_reliability(body["calibration"], folder / "reliability.png")
    out += [str(folder / "reliability.png"), str(plot_froc(body["detection"]["curve"], folder / "froc.png"))]
    return out
