"""Detection: boxes with a class and a score per finding, 2-D images or 3-D volumes, with MONAI's RetinaNet.

Targets are one padded array per image (``BoxSet.normalized_targets``: coordinates as fractions of each axis, then
the class, padding rows of class -1), so they batch, split and move like any task's targets; the network's outputs
are padded the same way (coordinates, score, class) and already through NMS. Coordinates as fractions make targets,
outputs and answers independent of the network's input size: the images are resized to it, the boxes need not be.
Box-aware augmentation (flips, scaling with translation, intensity), anchors fitted to the training boxes, a score
threshold chosen on val (best F1 at IoU 0.1), flip TTA merged by weighted box fusion (``merge_flipped`` on the
network), mAP@0.1…0.5, per-class AP, FROC and CPM with bootstrap CIs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError
from lepton.tasks.base import Loss, Task, register_task
from lepton.tasks.det_infer import box_heatmaps, volume_answer
from lepton.tasks.det_metrics import HIT_IOU, choose_threshold, detection_report, headline, match_all
from lepton.tasks.metrics import fmt

#: Largest network input side chosen from the data when ``image_size`` is not set.
MAX_SIDE = {2: 512, 3: 64}
#: Augmentation options that change intensities only (the boxes stay).
INTENSITY = ("brightness", "contrast", "gamma", "noise")
#: A box that keeps less than this fraction of its extent on an axis after scaling is dropped from the batch.
KEEP_FRACTION = 0.4
#: Volumes get the random scaling and translation, and apart from it the intensity changes, each on this share of
#: samples (MONAI's LUNA16 detection recipe zooms 20 % of its patches and changes the intensities of 15–30 %): resampled
#: at sub-voxel offsets on every step, 4–5-voxel nodules were not learnt in 150 steps (docs/benchmarks.md). 2-D
#: images keep them on every sample.
VOLUME_AUGMENT_P = 0.2


def _round(n: float, div: int) -> int:
    return max(div, round(n / div) * div)


@register_task
class Detection(Task):
    """Boxes. Model selection on mAP over IoU 0.1…0.5 on val; answers above the val-chosen score threshold."""

    name = "detection"
    selection_metric = "val_map"
    higher_is_better = True
    layouts = ("coco", "voc", "box-manifest")
    network_kind = ("image", "boxes")
    annotation = "boxes"
    #: volumes answered whole on the server (``answer_frame``); a map per box (``finding_maps``) for explanations
    capabilities = frozenset({"frame_answer", "explain_boxes"})

    # -- data -----------------------------------------------------------------------------------------------
    def load(self, source, *, window, slices, steps, skip_bad, validate=True):
        from lepton.data.readers.boxes import load_boxes

        if steps:
            raise ConfigError("volume preprocessing steps move voxels, not boxes; the detection task takes none "
                              "(drop preprocess)")
        return load_boxes(source, window=window, skip_bad=skip_bad, validate=validate)

    def inspect(self, source, *, window, slices):
        from lepton.data.readers.boxes import load_boxes

        data = load_boxes(source, window=window, skip_bad=True, validate=False)
        counts = {name: int(sum((c == k).sum() for c in data.classes)) for k, name in enumerate(data.label_names)}
        return {"images": len(data), "boxes": counts, "negatives": int(sum(len(b) == 0 for b in data.boxes)),
                "shapes": sorted({str(s) for s in data.shapes})[:5], "bad_files": data.bad_files}

    def read(self, path, spec):
        """A file to predict on: volumes whole for a 3-D model (as training read them), else as any task reads."""
        if spec.spatial_dims == 3:
            from lepton.data.readers.io import read_image

            return [(str(path), f.pixels) for f in read_image(path, window=spec.window, slices="volume")]
        return super().read(path, spec)

    def answer_file(self, run, path, output=None, dicom_seg=False) -> list[dict[str, Any]] | None:
        """Volumes for a 3-D model (2-D images: None, the default path): each volume is detected as training saw
        its data — resized to the network's input size when, at the scale of training (the input size over the
        median training shape), it fits in it; else brought to that scale and slid over with windows of the input
        size (``detect_volume``). Answers add the boxes in voxels (``voxels``) and, where the volume has a geometry,
        in world coordinates (``world``: RAS mm, as NIfTI; LPS is x and y negated)."""
        from lepton.data.readers.io import read_image

        spec = run.preprocessing
        if spec.spatial_dims != 3:
            return None
        answers = []
        for frame in read_image(path, window=spec.window, slices="volume"):
            name = str(path) if frame.name == Path(path).name else f"{path}{frame.name[len(Path(path).name):]}"
            answers.append(volume_answer(run, frame, name)[1])
        return answers

    def answer_frame(self, run, frame) -> tuple[np.ndarray, dict[str, Any]] | None:
        """A volume uploaded to the server answered as ``answer_file`` answers a file (``volume_answer``: on its own
        grid, boxes in voxels and world mm); None for a 2-D model's images (the server's batcher)."""
        if run.preprocessing.spatial_dims != 3:
            return None
        return volume_answer(run, frame, frame.name)

    def finding_maps(self, run, pixels: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """One HiResCAM map per box of the run's answer for an image or volume, on its own grid
        (``det_infer.box_heatmaps``)."""
        return box_heatmaps(run, pixels)

    def input_size(self, train, config) -> tuple[int, ...]:
        """The median image shape scaled so its longest side is ``image_size`` (else at most 512 px / 64 voxels),
        each side a multiple of 16 (the network's divisor)."""
        from lepton.models.detection import DIVISOR

        dims = train.spatial_dims
        median = np.median([s[1:] for s in train.shapes], axis=0)
        self._source_shape = median
        cap = config.image_size or min(MAX_SIDE[dims], float(median.max()))
        scale = cap / float(median.max())
        return tuple(_round(float(n) * scale, DIVISOR) for n in median)

    def tensors(self, data, spec):
        import torch

        return spec.resize(data.images), torch.from_numpy(self.targets(data))

    def augment(self, x, y, options, generator):
        """Flips (``hflip`` the last axis, ``vflip`` the others), scaling and translation (``scale``,
        ``translate``) move the boxes with the image; boxes mostly pushed out are dropped; then intensity changes.
        Volumes get scaling with translation, and intensity changes, each on ``VOLUME_AUGMENT_P`` of the samples."""
        import torch
        import torch.nn.functional as F

        from lepton.data.transforms.preprocessing import augment_batch

        dims = x.ndim - 2
        share = VOLUME_AUGMENT_P if dims == 3 else 1.0
        x, y = x.clone(), y.clone()
        for i in range(len(x)):
            valid = y[i, :, -1] >= 0
            for axis in range(dims):
                p = options.get("hflip", 0.0) if axis == dims - 1 else options.get("vflip", 0.0)
                if p and float(torch.rand(1, generator=generator)) < p:
                    x[i] = torch.flip(x[i], dims=[axis + 1])
                    lo, hi = y[i, :, axis].clone(), y[i, :, axis + dims].clone()
                    y[i, valid, axis], y[i, valid, axis + dims] = 1 - hi[valid], 1 - lo[valid]
            s, t = options.get("scale", 0.0), options.get("translate", 0.0)
            if (s or t) and (share >= 1 or float(torch.rand(1, generator=generator)) < share):
                zoom = 1 + (float(torch.rand(1, generator=generator)) * 2 - 1) * s
                shift = (torch.rand(dims, generator=generator) * 2 - 1) * t
                # u' = (u - 0.5)·zoom + 0.5 + shift per axis, u in fractions of the axis
                theta = torch.zeros(1, dims, dims + 1)
                for axis in range(dims):  # affine_grid orders its coordinates last axis first
                    k = dims - 1 - axis
                    theta[0, k, k] = 1 / zoom
                    theta[0, k, dims] = -2 * float(shift[axis]) / zoom
                grid = F.affine_grid(theta, [1, *x.shape[1:]], align_corners=False)
                # the edge replicated, as augment_batch pads: zeros are no blank in windowed CT (air lies mid-window
                # in a lung window), and zero slabs at the border slowed the 3-D detector (docs/benchmarks.md)
                x[i] = F.grid_sample(x[i:i + 1], grid, mode="bilinear", padding_mode="border",
                                     align_corners=False)[0]
                boxes = y[i, :, :2 * dims].clone()
                moved = (boxes - 0.5) * zoom + 0.5 + torch.cat([shift, shift])
                clipped = moved.clamp(0, 1)
                extent = (moved[:, dims:] - moved[:, :dims]).clamp_min(1e-6)
                kept = ((clipped[:, dims:] - clipped[:, :dims]) / extent).min(1).values >= KEEP_FRACTION
                y[i, :, :2 * dims] = torch.where(valid[:, None], clipped, boxes)
                y[i, valid & ~kept, -1] = -1
        opts = {k: v for k, v in options.items() if k in INTENSITY}
        if not opts or share >= 1:
            return (augment_batch(x, opts, generator) if opts else x), y
        picked = torch.rand(len(x), generator=generator) < share
        if bool(picked.any()):
            x[picked] = augment_batch(x[picked], opts, generator)
        return x, y

    def prepare_model(self, model, y_train, spec, config) -> None:
        """Fit the network's anchor shapes to the training boxes at the network's input size."""
        import torch

        from lepton.models.detection import fit_anchor_shapes

        if not hasattr(model, "set_anchor_shapes"):
            return
        rows = y_train.reshape(-1, y_train.shape[-1]).numpy()
        rows = rows[rows[:, -1] >= 0]
        dims = (rows.shape[1] - 1) // 2
        size = np.asarray(spec.size, np.float64)
        sizes = (rows[:, dims:2 * dims] - rows[:, :dims]) * size
        model.set_anchor_shapes(fit_anchor_shapes(sizes))
        source = getattr(self, "_source_shape", None)  # set by input_size from the training images
        if hasattr(model, "source_shape") and source is not None and len(source) == dims:
            model.source_shape.copy_(torch.as_tensor(source, dtype=torch.float32))

    # -- training -----------------------------------------------------------------------------------------
    def num_outputs(self, label_names: list[str]) -> int:
        return len(label_names)

    def targets(self, data) -> np.ndarray:
        return data.normalized_targets()

    def criterion(self, y_train, config) -> Loss:
        """RetinaNet's loss; refuses what averages or attacks outputs, which boxes do not allow."""
        for flag, why in ((config.ensemble > 1, "ensemble members' boxes cannot be averaged"),
                          (bool(config.adversarial), "adversarial training attacks class scores"),
                          (bool(config.slab), "a 2.5-D slab network answers per image, not boxes")):
            if flag:
                raise ConfigError(f"the detection task does not train this way: {why}; drop that option")
        return self.loss

    def loss(self, logits, y):
        """RetinaNet's loss of the network's train-mode outputs against the padded targets."""
        from lepton.models.detection import BoxLoss

        key = (int(y.shape[-1]), int(logits["cls"].shape[-1]))
        if getattr(self, "_loss_key", None) != key:
            self._loss_fn, self._loss_key = BoxLoss((key[0] - 1) // 2, key[1]), key
        return self._loss_fn(logits, y)

    def val_metrics(self, y, outputs) -> dict[str, float]:
        """mAP@0.1…0.5, AP@0.5 and CPM on val; ``val_loss`` is 1 − mAP (the detector's own loss needs its raw head
        outputs, which predictions do not keep)."""
        y, outputs = np.asarray(y), np.asarray(outputs)
        figures = headline(match_all(y, outputs, self._classes(y, outputs)), np.arange(len(y)))
        figures = {k: (v if np.isfinite(v) else 0.0) for k, v in figures.items()}
        return {"val_loss": 1.0 - figures["map"], "val_map": figures["map"], "val_ap50": figures["ap50"],
                "val_cpm": figures["cpm"]}

    @staticmethod
    def _classes(y: np.ndarray, outputs: np.ndarray) -> int:
        return int(max(y[..., -1].max(initial=-1), outputs[..., -1].max(initial=-1))) + 1

    def fit_decision(self, y_val, outputs) -> dict[str, Any]:
        """The score threshold with the best F1 on val (hits at IoU 0.1), with its sensitivity and FP rate."""
        y, outputs = np.asarray(y_val), np.asarray(outputs)
        chosen = choose_threshold(match_all(y, outputs, self._classes(y, outputs)), len(y))
        return {"threshold": chosen["threshold"], "threshold_rule": f"best F1 on val, hits at IoU {HIT_IOU}",
                "val_sensitivity_at_threshold": chosen["sensitivity"],
                "val_fp_per_image_at_threshold": chosen["fp_per_image"]}

    # -- predictions ----------------------------------------------------------------------------------------
    @staticmethod
    def _threshold(info: Mapping[str, Any]) -> float:
        return float(info.get("threshold", 0.5))

    def decide(self, outputs: np.ndarray, info: Mapping[str, Any]) -> np.ndarray:
        """The detections at or above the threshold; the other rows become padding (class -1, zeros)."""
        out = np.array(outputs, dtype=np.float32, copy=True)
        below = (out[..., -2] < self._threshold(info)) | (out[..., -1] < 0)
        out[below] = 0
        out[..., -1][below] = -1
        return out

    def encode(self, row: np.ndarray, labels: list[str], info: Mapping[str, Any]) -> dict[str, Any]:
        """``boxes``: label, score and coordinates (fractions of the image's width x, height y, depth z) of each
        finding above the threshold, highest score first."""
        kept = self.decide(np.asarray(row)[None], info)[0]
        kept = kept[kept[:, -1] >= 0]
        dims = (kept.shape[1] - 2) // 2
        axes = ("z", "y", "x")[-dims:]
        boxes = []
        for r in kept[np.argsort(-kept[:, -2], kind="stable")]:
            coords = {f"{a}0": round(float(r[k]), 5) for k, a in enumerate(axes)}
            coords.update({f"{a}1": round(float(r[dims + k]), 5) for k, a in enumerate(axes)})
            boxes.append({"label": labels[int(r[-1])], "score": round(float(r[-2]), 5),
                          "box": {k: coords[k] for k in sorted(coords, key=lambda c: (c[1], "xyz".index(c[0])))}})
        return {"boxes": boxes, "count": len(boxes), "threshold": self._threshold(info),
                "coordinates": "fractions of the image's width (x), height (y) and depth (z)"}

    # -- active learning (lepton.label) ----------------------------------------------------------------------
    def uncertainty(self, outputs: np.ndarray, info: Mapping[str, Any]) -> np.ndarray:
        """How unsure the run is of each image's boxes (``lepton label suggest --strategy entropy``): the largest
        binary entropy (nats) among its candidate detections' scores, each score first raised to the power that takes
        the decision threshold to 0.5 — a box at the threshold is the most uncertain, one scoring 0 or 1 certain; 0
        for an image without candidates."""
        out = np.asarray(outputs, np.float64)
        t = min(max(self._threshold(info), 1e-6), 1 - 1e-6)
        p = np.clip(np.clip(out[..., -2], 0, 1) ** (np.log(0.5) / np.log(t)), 1e-12, 1 - 1e-12)
        h = -(p * np.log(p) + (1 - p) * np.log1p(-p))
        h[out[..., -1] < 0] = 0
        return h.max(axis=-1, initial=0.0)

    def disagreement(self, outputs: np.ndarray, flipped: np.ndarray, info: Mapping[str, Any]) -> np.ndarray:
        """How much each image's answer changes when the image is mirrored (``--strategy tta``): over the boxes
        above the threshold in either answer (``flipped``: the mirrored image's outputs, coordinates already mirrored
        back), the mean of 1 − the best IoU with a box of the same class in the other answer; 0 when neither has a
        box."""
        from lepton.tasks.det_metrics import box_iou

        a, b = self.decide(outputs, info), self.decide(flipped, info)
        scores = np.zeros(len(a))
        for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
            ra, rb = ra[ra[:, -1] >= 0], rb[rb[:, -1] >= 0]
            if not len(ra) and not len(rb):
                continue
            same = ra[:, -1][:, None] == rb[:, -1][None]
            iou = box_iou(ra[:, :-2], rb[:, :-2]) * same if len(ra) and len(rb) else np.zeros((len(ra), len(rb)))
            best = np.concatenate([iou.max(1, initial=0.0), iou.max(0, initial=0.0)])
            scores[i] = float((1 - best).mean())
        return scores

    def label(self, row, labels, info) -> str:
        kept = self.decide(np.asarray(row)[None], info)[0]
        found = sorted({labels[int(c)] for c in kept[:, -1] if c >= 0})
        return ",".join(found) or "none"

    def answer_line(self, answer) -> str:
        return f"{answer.get('count', 0)} box(es)"

    def explain_index(self, row, info) -> int:
        raise ConfigError("a detection model answers boxes; Grad-CAM explains classifiers (one map per box: "
                          "lepton.tasks.det_infer.box_heatmaps, lepton explain)")

    # -- evaluation -----------------------------------------------------------------------------------------
    def scores(self, y, outputs, info) -> dict[str, float]:
        y, outputs = np.asarray(y), np.asarray(outputs)
        return headline(match_all(y, outputs, self._classes(y, outputs)), np.arange(len(y)))

    def report(self, y, outputs, labels, info, *, n_bootstrap, plots):
        y, outputs = np.asarray(y), np.asarray(outputs)
        body = detection_report(y, outputs, labels, self._threshold(info), n_bootstrap)

        def ci(v):
            return " [{:.3f}, {:.3f}]".format(*v) if v else ""

        at = body["at_threshold"]
        body["summary"] = [
            f"mAP@0.1:0.5 {fmt(body['map'])}{ci(body['map_ci95'])}, AP@0.5 {fmt(body['ap50'])}"
            f"{ci(body['ap50_ci95'])}, CPM {fmt(body['cpm'])}{ci(body['cpm_ci95'])} over {len(y)} images",
            *[f"{c}: AP {fmt(m['ap'])}  AP@0.5 {fmt(m['ap50'])} ({m['findings']} findings)"
              for c, m in body["per_class"].items()],
            f"at threshold {at['threshold']:.3f}: sensitivity {at['sensitivity']:.3f}, "
            f"{at['fp_per_image']:.2f} false positives per image"]
        if plots is not None:
            from lepton.plots import plot_froc

            curve = [{"fp_per_case": f, "sensitivity": s} for f, s in zip(body["froc_curve"]["fp_per_image"],
                                                                           body["froc_curve"]["sensitivity"],
                                                                           strict=True)]
            body["plots"] = [str(plot_froc(curve, Path(plots) / "froc.png"))]
        return body, self._markdown(body)

    def _markdown(self, body: dict[str, Any]) -> list[str]:
        def ci(values):
            return " – ".join(fmt(v) for v in values) if values else "-"

        at = body["at_threshold"]
        lines = ["", "| class | findings | AP (IoU 0.1…0.5) | AP@0.1 | AP@0.3 | AP@0.5 |", "|---|---|---|---|---|---|"]
        for c, m in body["per_class"].items():
            lines.append(f"| {c} | {m['findings']} | {fmt(m['ap'])} | {fmt(m['ap10'])} | {fmt(m['ap30'])} | "
                         f"{fmt(m['ap50'])} |")
        sens = ", ".join(f"{r:g}: {fmt(s, 3)}" for r, s in zip(body["froc"]["fp_per_image"],
                                                                body["froc"]["sensitivity"], strict=True))
        lines += ["", f"- mAP over IoU 0.1…0.5: {fmt(body['map'])} [{ci(body['map_ci95'])}]",
                  f"- AP@0.5: {fmt(body['ap50'])} [{ci(body['ap50_ci95'])}]",
                  f"- CPM (mean sensitivity at 1/8…8 false positives per image, hits at IoU {HIT_IOU}): "
                  f"{fmt(body['cpm'])} [{ci(body['cpm_ci95'])}]; sensitivity by FP rate: {sens}",
                  f"- At the val-chosen threshold {at['threshold']:.3f}: sensitivity {fmt(at['sensitivity'])}, "
                  f"{fmt(at['fp_per_image'], 2)} false positives per image, precision {fmt(at['precision'])}", ""]
        if body.get("plots"):
            lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in body["plots"]]
        return lines

    # -- protocols and the registry --------------------------------------------------------------------------
    def oip_outputs(self, labels: list[str], size: list[int] | None = None) -> list[dict[str, Any]]:
        from lepton.models.detection import MAX_DETECTIONS

        return [{"name": "boxes", "datatype": "FP32", "shape": [-1, MAX_DETECTIONS, -1]},
                {"name": "scores", "datatype": "FP32", "shape": [-1, MAX_DETECTIONS]},
                {"name": "labels", "datatype": "INT32", "shape": [-1, MAX_DETECTIONS]}]

    def oip_tensors(self, outputs, labels, info) -> dict[str, Any]:
        """Per image ``MAX_DETECTIONS`` rows, those above the threshold first by score: coordinates (fractions, the
        image's axis order: y0, x0, y1, x1 or z0, y0, x0, z1, y1, x1), scores and class indices (-1: no box)."""
        kept = self.decide(np.asarray(outputs), info)
        return {"boxes": ("FP32", np.ascontiguousarray(kept[..., :-2], np.float32)),
                "scores": ("FP32", np.ascontiguousarray(kept[..., -2], np.float32)),
                "labels": ("INT32", kept[..., -1].astype(np.int32))}

    def card_metrics(self, info, reports):
        metrics: dict[str, Any] = {k: info.get(k) for k in ("val_map", "val_ap50", "val_cpm", "threshold",
                                                           "best_epoch")}
        for folder, rep in reports.items():
            metrics[f"eval/{folder}"] = {k: rep.get(k) for k in ("split", "images", "map", "map_ci95", "ap50",
                                                                "ap50_ci95", "cpm", "cpm_ci95")}
            metrics[f"eval/{folder}"]["per_class"] = {c: {"ap": m.get("ap"), "ap50": m.get("ap50")}
                                                      for c, m in rep.get("per_class", {}).items()}
        return metrics

    def card_text(self, labels, channels, threshold, metrics):
        use = [f"Finds {', '.join(labels)} as boxes in {channels}-channel medical images. Decision support for "
               "trained readers only: every box needs review, missed findings are possible at any threshold, and "
               "the model is not validated for populations, devices or protocols unlike the training data."]
        lines = []
        if metrics.get("val_map") is not None:
            lines.append(f"- Validation (model selection): mAP@0.1:0.5 {fmt(metrics['val_map'])}, CPM "
                         f"{fmt(metrics.get('val_cpm'))}")
        for key, rep in metrics.items():
            if key.startswith("eval/"):
                c = rep.get("map_ci95")
                lines.append(f"- {rep['split']} split, {rep['images']} images: mAP {fmt(rep.get('map'))}"
                             + (" [{:.4f}, {:.4f}]".format(*c) if c else "") + f", AP@0.5 {fmt(rep.get('ap50'))}, "
                             f"CPM {fmt(rep.get('cpm'))}")
        t = metrics.get("threshold", threshold)
        return {"use": use, "decision": [f"- Decision rule: boxes scoring at least {fmt(t)} (best F1 on val)"
                                         if t is not None else "- Decision rule: boxes above the score threshold"],
                "metrics": lines}
