"""Segmentation: a class per pixel or voxel (0 = background), 2-D or 3-D, with MONAI's Dice + cross-entropy loss,
Dice/IoU/HD95/ASD per class with bootstrap CIs, lesions as connected components and lesion-level detection."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError
from lepton.tasks.base import Loss, Task, register_task
from lepton.tasks.metrics import fmt
from lepton.tasks.seg_metrics import (
    case_metrics,
    detection,
    lesions,
    mean_ci,
    report_plots,
    voxel_calibration,
    voxel_volume,
)
from lepton.tasks.seg_serving import SegmentationServing
from lepton.tasks.seg_workflow import SegmentationWorkflow

#: Largest network input per axis chosen from the data (larger cases are cut to it; predictions slide over them).
MAX_SIDE = {2: 512, 3: 128}
#: The val set stored for checking serving precisions: at most this many val cases (a seeded pick) holding at most
#: this many voxels in all (float16 images, uint8 masks); a case larger than its share is cut around its foreground.
PRECISION_CASES = 16
PRECISION_VOXELS = 32 << 20
#: Training windows at the network's size kept for int8 calibration: at most 64, and at most this many voxels.
CALIBRATION_VOXELS = 4 << 20


#: Voxels per slab when val metrics walk a case (``_case_counts``).
SLAB_VOXELS = 1 << 22


def _case_counts(truth, probs) -> tuple[np.ndarray, np.ndarray, float, int]:
    """One case's per-class intersections and totals (prediction + truth voxels), summed negative log-likelihood and
    voxel count, slab by slab along the first spatial axis: a CT case's arg-max, int64 targets and log-likelihoods
    taken whole are ~1.5 GB of temporaries beside its probabilities. A function, so that no slab (a view that keeps
    the case's probabilities alive) outlives the call."""
    k = probs.shape[0]
    inter, total = np.zeros(k, np.int64), np.zeros(k, np.int64)
    nll, voxels = 0.0, 0
    step = max(1, SLAB_VOXELS // max(int(np.prod(probs.shape[2:])), 1))
    for lo in range(0, probs.shape[1], step):
        p = np.asarray(probs[:, lo:lo + step])
        t = np.asarray(truth[:, lo:lo + step]).astype(np.int64)
        pred = p.argmax(0)[None]
        for c in range(1, k):
            hit_p, hit_t = pred == c, t == c
            inter[c] += int(np.logical_and(hit_p, hit_t).sum())
            total[c] += int(hit_p.sum()) + int(hit_t.sum())
        p_true = np.take_along_axis(p, t, axis=0)
        nll += float(-np.log(np.clip(p_true, 1e-7, 1.0)).sum(dtype=np.float64))
        voxels += p_true.size
    return inter, total, nll, voxels


def _dice_per_class(pred: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """Dice of class ``k`` per case for batches (N, …); cases where both are empty count 1."""
    axes = tuple(range(1, pred.ndim))
    p, t = pred == k, truth == k
    inter = np.logical_and(p, t).sum(axes)
    total = p.sum(axes) + t.sum(axes)
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


@register_task
class Segmentation(SegmentationWorkflow, SegmentationServing, Task):
    """Per-pixel classes. Model selection on mean foreground Dice on val; decisions by arg-max (training and
    evaluation members from ``SegmentationWorkflow``, inference and serving members from ``SegmentationServing``)."""

    name = "segmentation"
    selection_metric = "val_dice"
    higher_is_better = True
    layouts = ("decathlon", "paired-folders", "mask-manifest")
    #: bf16/int8 serving is refused when its mean foreground Dice on the stored val cases (sliding windows, as
    #: served) is more than this below fp32's.
    precision_metric = "val_dice"
    precision_tolerance = 0.01
    semi_supervised = True

    # -- data -----------------------------------------------------------------------------------------------
    def load(self, source, *, window, slices, steps, skip_bad, validate=True):
        from lepton.data.readers.masks import load_segmentation

        return load_segmentation(source, window=window, steps=steps, skip_bad=skip_bad, validate=validate)

    def load_cases(self, source, *, window, steps, skip_bad, cache_dir=None, workers=0, quiet=False, slices="auto",
                   image_size=None):
        """The cases decoded into the on-disk case cache (parallel, reused across runs) as a ``CaseStore``."""
        from lepton.data.index.cache import CaseCache
        from lepton.data.index.cases import cache_segmentation

        return cache_segmentation(source, window=window, steps=steps, skip_bad=skip_bad, cache=CaseCache(cache_dir),
                                  workers=workers or None, quiet=quiet)

    def inspect(self, source, *, window, slices):
        from lepton.data.index.inspection import inspect_segmentation

        return inspect_segmentation(source, window=window)

    def input_size(self, train, config) -> tuple[int, ...]:
        """Every training case fits whole: the largest size per axis, rounded up to the network's divisor (capped at
        ``image_size`` when set, else 512 px / 128 voxels)."""
        from lepton.models import model_info

        div = model_info(config.model).divisor
        dims = train.spatial_dims
        cap = config.image_size or MAX_SIDE[dims]
        cap = max(div, cap // div * div)
        largest = np.max([s[1:] for s in train.shapes], axis=0)
        size = [int(min(cap, -(-int(s) // div) * div)) for s in largest]
        if all(s <= div for s in size):  # the deepest level must keep more than one voxel for its normalisation
            size[-1] = 2 * div
        return tuple(size)

    def tensors(self, data, spec):
        """Cases padded to one size: the network's input size, or — when some case is larger — the largest case
        (rounded up to a multiple of 16), from which ``batch`` cuts patches."""
        import dataclasses

        import torch

        from lepton.data.index.cases import CaseStore
        from lepton.data.transforms.preprocessing import Preprocessing, pad_or_crop

        largest = np.max([s[1:] for s in data.shapes], axis=0)
        full = tuple(max(int(s), -(-int(n) // 16) * 16) for s, n in zip(spec.size, largest, strict=True))
        if isinstance(data, CaseStore):  # cases stay on disk; patches are read per batch
            store = dataclasses.replace(data, pad_to=full)
            return store, store
        fit = spec if full == tuple(spec.size) else Preprocessing(full, spec.channels, spec.mean, spec.std, fit="pad")
        x = fit.resize(data.images)  # padded or cropped (fit="pad"), never interpolated
        y = torch.stack([pad_or_crop(torch.from_numpy(m.astype(np.int64)), full) for m in data.masks])
        return x, y

    def batch(self, x, y, spec, generator):
        """Patches of the network's size from cases larger than it: centred on a foreground voxel for a third of the
        patches (as nnU-Net oversamples foreground), anywhere for the rest. Not MONAI's ``RandCropByPosNegLabeld``
        (``pos=1, neg=2``): it indexes every foreground and background voxel per case and call, 3.3-20× slower on
        64 × 96² and 2 × 128³ batches (``benchmarks/transforms.py``), and its other patches centre on background."""
        import torch

        size = tuple(spec.size)
        if tuple(x.shape[2:]) == size:
            return x, y
        xs, ys = [], []
        for i in range(len(x)):
            limit = [n - s for n, s in zip(x.shape[2:], size, strict=True)]
            fg = torch.nonzero(y[i, 0] > 0) if float(torch.rand(1, generator=generator)) < 1 / 3 else None
            if fg is not None and len(fg):
                centre = fg[int(torch.randint(len(fg), (1,), generator=generator))]
                start = [int(min(max(int(c) - s // 2, 0), m)) for c, s, m in zip(centre, size, limit, strict=True)]
            else:
                start = [int(torch.randint(m + 1, (1,), generator=generator)) for m in limit]
            window = tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))
            xs.append(x[(i, slice(None), *window)])
            ys.append(y[(i, slice(None), *window)])
        return torch.stack(xs), torch.stack(ys)

    # -- training -----------------------------------------------------------------------------------------
    def num_outputs(self, label_names: list[str]) -> int:
        return len(label_names)

    def unlabelled_views(self, x, weak, strong, generator):
        """Views on one grid, so the guide's map and the network's compare voxel by voxel: the weak view's geometry
        (flips, shifts) once, then the strong view's intensity changes (exposure, gamma, noise, corruptions) alone
        on top of it."""
        from lepton.data.transforms.preprocessing import GEOMETRY_KEYS, augment_batch

        weak_view = augment_batch(x, weak, generator)
        return weak_view, augment_batch(weak_view, {k: v for k, v in strong.items() if k not in GEOMETRY_KEYS},
                                        generator)

    def targets(self, data) -> list[np.ndarray]:
        """The label maps (1, …) of a data set, each at its own size."""
        return list(data.masks)

    def criterion(self, y_train, config) -> Loss:
        """MONAI's Dice + cross-entropy (Dice over the foreground classes, batch-wise); with ``imbalance=weighted``
        the cross-entropy weighs classes by the square root of their inverse voxel frequency."""
        import torch
        from monai.losses import DiceCELoss

        from lepton.data.index.cases import CaseStore

        counts = None
        if config.imbalance == "weighted":
            counts = (torch.from_numpy(y_train.class_counts()).float() if isinstance(y_train, CaseStore)
                      else torch.bincount(y_train.flatten()).float())
        smoothing = config.label_smoothing
        built: dict[Any, Any] = {}

        def loss(logits, y):
            key = (logits.device, logits.shape[1])
            if key not in built:
                weight = None
                if counts is not None:
                    c = torch.nn.functional.pad(counts, (0, max(0, logits.shape[1] - len(counts))))
                    weight = (c.sum() / (len(c) * c.clamp_min(1))).sqrt()
                    weight = (weight / weight.mean()).to(logits.device)
                built[key] = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                                        weight=weight, label_smoothing=smoothing)
            return built[key](logits.float(), y)

        return loss

    def loss(self, logits, y):
        from monai.losses import DiceCELoss

        return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)(logits.float(), y)

    def activate(self, logits):
        import torch

        return torch.softmax(logits.float(), 1)

    def val_metrics(self, y, outputs) -> dict[str, float]:
        """Mean foreground Dice per class over cases and the voxel-mean negative log-likelihood. ``y`` (1, …) and
        ``outputs`` (K, …) per case, as stacked arrays or as iterables that yield one case at a time (cases read
        from the cache one by one are never all in memory)."""
        per_class: list[list[float]] = []
        nll, voxels = 0.0, 0
        cases = iter(outputs)
        for truth in y:  # not zip(): its reused result tuple would hold the last case until the next is predicted
            probs = next(cases, None)
            if probs is None:
                raise ValueError("val_metrics: fewer outputs than cases")
            k = probs.shape[0]
            inter, total, case_nll, case_voxels = _case_counts(truth, probs)
            nll += case_nll
            voxels += case_voxels
            per_class.append([2.0 * inter[c] / total[c] if total[c] else 1.0 for c in range(1, k)])
            del truth, probs  # let this case go before the next is predicted
        if next(cases, None) is not None:
            raise ValueError("val_metrics: more outputs than cases")
        dices = np.mean(per_class, axis=0).tolist()
        out = {"val_loss": nll / max(voxels, 1), "val_dice": float(np.mean(dices))}
        out.update({f"val_dice_{c}": d for c, d in enumerate(dices, start=1)})
        return out

    # -- serving precisions -----------------------------------------------------------------------------------
    def precision_val_set(self, x_val, y_val, x_train, spec, seed: int = 0) -> dict[str, np.ndarray] | None:
        """Up to ``PRECISION_CASES`` val cases (``PRECISION_VOXELS`` in all) as flat float16 images and uint8 masks
        with their shapes, and up to 64 training windows of the network's size for int8 calibration."""
        import torch

        from lepton.data.index.cases import CaseStore

        n = len(x_val)
        if n == 0:
            return None
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.permutation(n)[:PRECISION_CASES])
        share = PRECISION_VOXELS // len(pick)
        images, masks = [], []
        for i in pick:
            if isinstance(x_val, CaseStore):
                image, mask = x_val.image(int(i)), x_val.mask(int(i))
            else:
                image, mask = np.asarray(x_val[int(i)]), np.asarray(y_val[int(i)])
            image, mask = _cut(image, mask, share, tuple(spec.size))
            images.append(image.astype(np.float16))
            masks.append(mask.astype(np.uint8))
        windows = int(max(1, min(64, CALIBRATION_VOXELS // int(np.prod(spec.size)))))
        gen = torch.Generator().manual_seed(seed)
        idx = np.sort(rng.integers(len(x_train), size=windows))
        if isinstance(x_train, CaseStore):
            calib = x_train[idx].patches(tuple(spec.size), gen)[0]
        else:
            xs = x_train[torch.from_numpy(idx)]
            calib = self.batch(xs, torch.zeros((len(xs), 1, *xs.shape[2:]), dtype=torch.int64), spec, gen)[0]
        return {"x_val": np.concatenate([a.ravel() for a in images]),
                "x_shapes": np.array([a.shape for a in images], np.int64),
                "y_val": np.concatenate([m.ravel() for m in masks]),
                "x_calib": np.asarray(calib, np.float16)}

    def precision_outputs(self, val, predictor, spec):
        shapes = [tuple(int(v) for v in row) for row in val["x_shapes"]]
        ends = np.cumsum([0, *(int(np.prod(s)) for s in shapes)])
        mask_ends = np.cumsum([0, *(int(np.prod(s[1:])) for s in shapes)])
        truth, outputs = [], []
        for k, shape in enumerate(shapes):
            image = val["x_val"][ends[k]:ends[k + 1]].reshape(shape).astype(np.float32)
            truth.append(val["y_val"][mask_ends[k]:mask_ends[k + 1]].reshape(1, *shape[1:]))
            outputs.append(predictor.image(image))
        return truth, outputs

    # -- predictions ----------------------------------------------------------------------------------------
    def decide(self, outputs: np.ndarray, info: Mapping[str, Any]) -> np.ndarray:
        return outputs.argmax(1).astype(np.uint8)

    def describe(self, probs: np.ndarray, labels: list[str], spacing: tuple[float, ...] | None = None,
                 affine: np.ndarray | None = None) -> dict[str, Any]:
        """The answer for one image's probabilities (K, …): size per class (mL for volumes with geometry, mm² for
        images with a pixel spacing, else voxels) and the lesion list."""
        dims = probs.ndim - 1
        known = spacing is not None
        spacing = tuple(spacing) if known else (1.0,) * dims
        label_map = probs.argmax(0).astype(np.uint8)
        unit = voxel_volume(spacing)
        key = ("volume_ml" if dims == 3 else "area_mm2") if known else "voxels"
        sizes = {labels[k]: round(float((label_map == k).sum() * (unit if known else 1)), 4)
                 for k in range(1, len(labels))}
        found = lesions(label_map, probs, labels, spacing, affine)
        if not known:
            for item in found:
                item.pop("volume_ml", None)
                item.pop("area", None)
        elif dims == 2:
            for item in found:
                item["area_mm2"] = item.pop("area")
        return {"shape": list(label_map.shape), "spacing_mm": list(spacing) if known else None, key: sizes,
                "lesions": found}

    def encode(self, row: np.ndarray, labels: list[str], info: Mapping[str, Any]) -> dict[str, Any]:
        return self.describe(row, labels)

    def agrees(self, a, b, labels, info) -> bool:
        return bool((a.argmax(0) == b.argmax(0)).mean() >= 0.99)

    def explain_index(self, row, info) -> int:
        raise ConfigError("a segmentation model's answer is its map; Grad-CAM explains classifiers")

    # -- evaluation -----------------------------------------------------------------------------------------
    def scores(self, y, outputs, info) -> dict[str, float]:
        """Mean foreground Dice over cases (lists of per-case arrays, or batches)."""
        pairs = zip(y, outputs, strict=True)
        dices = []
        for truth, probs in pairs:
            pred = np.asarray(probs).argmax(0)
            dices.append(np.mean([_dice_per_class(pred[None], np.asarray(truth)[0][None], c)[0]
                                  for c in range(1, np.shape(probs)[0])]))
        return {"dice": float(np.mean(dices)) if dices else float("nan")}

    def report(self, y, outputs, labels, info, *, n_bootstrap, plots, meta=None):
        meta = meta or {}
        n = len(y)
        spacings = meta.get("spacings") or [(1.0,) * (np.ndim(y[0]) - 1)] * n
        names = meta.get("names") or [f"case {i}" for i in range(n)]
        rows, cases = [], []
        for i in range(n):
            truth, probs = np.asarray(y[i])[0], np.asarray(outputs[i])
            pred = probs.argmax(0)
            metrics = case_metrics(pred, truth, labels, tuple(spacings[i]))
            rows.append({"case": Path(str(names[i])).name, **{f"{c}/{k}": round(v, 4) if math.isfinite(v) else None
                                                              for c, m in metrics.items() for k, v in m.items()}})
            cases.append((pred, truth, probs))
        per_class = {}
        for c in labels[1:]:
            entry = {}
            for key in ("dice", "iou", "hd95", "asd"):
                values = [r[f"{c}/{key}"] for r in rows]
                mean, ci = mean_ci([v if v is not None else float("nan") for v in values], n_bootstrap)
                entry[key], entry[f"{key}_ci95"] = mean, ci
                entry[f"{key}_undefined"] = sum(v is None for v in values) if key in ("hd95", "asd") else 0
            per_class[c] = entry
        case_dice = [float(np.mean([r[f"{c}/dice"] for c in labels[1:]])) for r in rows]
        mean_dice, dice_ci = mean_ci(case_dice, n_bootstrap)
        empty_truth = [not t.any() for _, t, _ in cases]
        empty_pred = [not p.any() for p, _, _ in cases]
        body: dict[str, Any] = {
            "classes": labels, "cases": rows, "per_class": per_class, "mean_dice": mean_dice, "mean_dice_ci95": dice_ci,
            "empty_masks": {"true": int(sum(empty_truth)), "predicted": int(sum(empty_pred)),
                            "both": int(sum(a and b for a, b in zip(empty_truth, empty_pred, strict=True)))},
            "detection": detection(cases, labels),
            "calibration": voxel_calibration(cases),
        }
        body["ece"] = body["calibration"]["ece"]
        ci_text = " [{:.3f}, {:.3f}]".format(*dice_ci) if dice_ci else ""
        body["summary"] = [f"mean Dice {mean_dice:.4f}{ci_text} over {n} cases"] + [
            f"{c}: Dice {m['dice']:.4f}  IoU {m['iou']:.4f}  HD95 {m['hd95']:.2f} mm  ASD {m['asd']:.2f} mm"
            for c, m in per_class.items()] + [f"voxel ECE {body['ece']:.4f}"]
        if plots is not None:
            body["plots"] = report_plots(body, cases, case_dice, meta, labels, plots)
        body["detection"].pop("curve")  # plotted; the FROC points at fixed rates stay
        return body, self._markdown(body)

    def headline(self, report):
        return "dice", report["mean_dice"], report.get("mean_dice_ci95")

    # -- distillation -----------------------------------------------------------------------------------------
    def distill_targets(self, y_train, teacher, temperature):
        """The label maps and the teacher's soft masks in the folder ``teacher`` (one compressed file per case),
        read per batch (``lepton.tasks.distillation.SoftMasks``); the temperature is applied by the loss."""
        from lepton.tasks.distillation import SoftMasks

        return SoftMasks(y_train, teacher)

    def distill_loss(self, hard_loss, temperature, alpha):
        from lepton.tasks.distillation import soft_mask_loss

        return soft_mask_loss(hard_loss, temperature, alpha)

    def distill_batch(self, targets, teacher, temperature):
        import torch

        return torch.cat([targets[:, :1], teacher.to(targets.dtype)], dim=1)

    def _markdown(self, body: dict[str, Any]) -> list[str]:
        def ci(values):
            return " – ".join(fmt(v) for v in values) if values else "-"

        det = body["detection"]
        lines = ["", "| class | Dice [95 % CI] | IoU | HD95 mm [95 % CI] | ASD mm |", "|---|---|---|---|---|"]
        for c, m in body["per_class"].items():
            lines.append(f"| {c} | {fmt(m['dice'])} [{ci(m['dice_ci95'])}] | {fmt(m['iou'])} | "
                         f"{fmt(m['hd95'], 2)} [{ci(m['hd95_ci95'])}] | {fmt(m['asd'], 2)} |")
        lines += ["", f"- Mean Dice over cases: {fmt(body['mean_dice'])} [{ci(body['mean_dice_ci95'])}]",
                  f"- Empty masks: {body['empty_masks']['true']} true, {body['empty_masks']['predicted']} predicted",
                  f"- Lesion detection: {det['found']} of {det['true_lesions']} true lesions found (sensitivity "
                  f"{fmt(det['sensitivity'])}), {fmt(det['fp_per_case'], 2)} false positives per case, mean FROC "
                  f"sensitivity {fmt(det['froc_mean'])}",
                  f"- Voxel calibration error (ECE, 15 bins): {fmt(body['ece'])}", "",
                  "Per case: `report.json` (`cases`).", ""]
        if body.get("plots"):
            lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in body["plots"]]
        return lines

    # -- protocols and the registry --------------------------------------------------------------------------
    def oip_outputs(self, labels: list[str], size: list[int] | None = None) -> list[dict[str, Any]]:
        spatial = list(size) if size else [-1, -1]
        return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(labels), *spatial]},
                {"name": "label_map", "datatype": "UINT8", "shape": [-1, *spatial]}]

    def oip_tensors(self, outputs, labels, info) -> dict[str, Any]:
        return {"probabilities": ("FP32", outputs.astype(np.float32)),
                "label_map": ("UINT8", self.decide(outputs, info))}

    def card_metrics(self, info, reports):
        metrics: dict[str, Any] = {"val_dice": info.get("val_dice"), "best_epoch": info.get("best_epoch")}
        for folder, rep in reports.items():
            metrics[f"eval/{folder}"] = {"split": rep["split"], "images": rep["images"],
                                         "mean_dice": rep.get("mean_dice"), "mean_dice_ci95": rep.get("mean_dice_ci95"),
                                         "per_class": {c: {k: m[k] for k in ("dice", "dice_ci95", "hd95")}
                                                       for c, m in rep.get("per_class", {}).items()}}
        return metrics

    def card_text(self, labels, channels, threshold, metrics):
        use = [f"Segments {', '.join(labels[1:])} in {channels}-channel medical images (class 0: {labels[0]}). "
               "Decision support for trained readers only: every contour needs review, and the model is not "
               "validated for populations, devices or protocols unlike the training data."]
        lines = []
        if metrics.get("val_dice") is not None:
            lines.append(f"- Validation (model selection): mean Dice {fmt(metrics['val_dice'])}")
        for key, rep in metrics.items():
            if key.startswith("eval/"):
                ci = rep.get("mean_dice_ci95")
                lines.append(f"- {rep['split']} split, {rep['images']} cases: mean Dice {fmt(rep.get('mean_dice'))}"
                             + (" [{:.4f}, {:.4f}]".format(*ci) if ci else ""))
                for c, m in rep.get("per_class", {}).items():
                    cci = m.get("dice_ci95")
                    lines.append(f"  - {c}: Dice {fmt(m['dice'])}" + (" [{:.4f}, {:.4f}]".format(*cci) if cci else "")
                                 + f", HD95 {fmt(m['hd95'], 2)} mm")
        return {"use": use, "decision": ["- Decision rule: arg-max class per voxel"], "metrics": lines}


def _cut(image: np.ndarray, mask: np.ndarray, voxels: int, window: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A case (C, …) and its mask (1, …) cut to about ``voxels`` (never below the network's ``window``) around the
    centre of its foreground; unchanged when it fits."""
    shape = np.array(mask.shape[1:])
    if int(shape.prod()) <= voxels:
        return image, mask
    side = np.minimum(shape, np.maximum(np.array(window), (shape * (voxels / shape.prod()) ** (1 / len(shape)))
                                        .astype(int)))
    fg = np.argwhere(mask[0] > 0)
    centre = fg.mean(0).astype(int) if len(fg) else shape // 2
    start = np.clip(centre - side // 2, 0, shape - side)
    region = tuple(slice(int(a), int(a + b)) for a, b in zip(start, side, strict=True))
    return image[(slice(None), *region)], mask[(slice(None), *region)]
