"""Detection's inference beside its training and metrics (``lepton.tasks.detection``): a volume detected on its own
grid at the scale training saw (sliding windows when it is larger than the network's input), its answer with boxes in
voxels and world millimetres, and a Grad-CAM-style map per box. ``lepton predict``, the server and ``lepton explain``
all call these, so a served answer is the offline one."""

from __future__ import annotations

from typing import Any

import numpy as np


def explain_boxes(run, pixels: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """Grad-CAM-style maps per box for one decoded image or volume (C, …) in [0, 1]: the run's answer (the boxes
    above its threshold, highest score first, as ``Run.predict`` lists them) and one map per box (n, *the network's
    input size) in [0, 1] (``BoxDetector.box_saliency``: the gradient of the box's class logit at its anchors times
    the first backbone stage's activations), on the input as the network saw it, without the flipped view."""
    import torch

    row = run.predict_proba([pixels])[0]
    answer = run.task.encode(row, run.label_names, run.info)
    x = run.preprocessing([pixels]).to(run.device)
    maps = run.model.box_saliency(x, torch.from_numpy(_listed(run, row)).to(run.device))
    return answer, maps.cpu().numpy()


def _listed(run, row: np.ndarray) -> np.ndarray:
    """The rows of the boxes an answer lists: above the threshold, highest score first."""
    kept = run.task.decide(np.asarray(row)[None], run.info)[0]
    kept = kept[kept[:, -1] >= 0]
    return kept[np.argsort(-kept[:, -2], kind="stable")]


def _at_training_scale(run, pixels: np.ndarray):
    """The volume as the network meets it: (normalised input (1, C, …) at the scale of training, or None when the
    whole volume at that scale fits the input size — then it is resized to the input size as ``Run.predict_proba``
    does)."""
    import torch
    import torch.nn.functional as F

    spec, model = run.preprocessing, run.model
    size = np.asarray(spec.size, np.float64)
    source = model.source_shape.cpu().numpy() if hasattr(model, "source_shape") else np.zeros(3)
    target = np.maximum(np.round(np.asarray(pixels.shape[1:]) * size / source), 1).astype(int) if source.all() \
        else size
    if np.all(target <= size):
        return None
    x = spec.normalize(spec.convert_channels(torch.from_numpy(np.ascontiguousarray(pixels, np.float32)[None])))
    if tuple(target) != tuple(pixels.shape[1:]):
        x = F.interpolate(x, size=tuple(int(n) for n in target), mode="trilinear", align_corners=False)
    return x.to(run.device)


def detect_volume(run, pixels: np.ndarray) -> tuple[np.ndarray, int]:
    """A 3-D run's padded detections (MAX_DETECTIONS, 8) for one volume (C, D, H, W) in [0, 1], coordinates as
    fractions of its axes, and the number of windows it took (1: resized to the network's input size, as
    ``Run.predict_proba`` does). A volume that at the scale training saw (the network's input size over the median
    training shape) exceeds the input size is resampled to that scale and slid over with windows of the input size
    (``BoxDetector.detect_windows``: MONAI's sliding-window inferer, one NMS over the whole volume), flip TTA as the
    run applies it."""
    import torch

    from lepton.models.detection import DIVISOR

    spec, model = run.preprocessing, run.model
    x = _at_training_scale(run, pixels)
    if x is None:
        return run.predict_proba([pixels])[0], 1
    cval = float(-spec.mean[0] / spec.std[0])  # zero intensity, as training padded
    roi = tuple(int(n) for n in spec.size)
    model.eval()
    rows = model.detect_windows(x, roi, cval=cval)
    if run.config.tta:
        rows = model.merge_flipped(rows, model.detect_windows(torch.flip(x, dims=[-1]), roi, cval=cval))
    padded = [int(np.ceil(t / DIVISOR)) * DIVISOR for t in x.shape[2:]]  # as detect_windows pads; MONAI's overlap
    steps = [int(np.ceil((t - r) / (r * 0.75))) + 1 if t > r else 1 for t, r in zip(padded, roi, strict=True)]
    return rows[0].float().cpu().numpy(), int(np.prod(steps))


def volume_answer(run, frame, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """One volume's outputs (``detect_volume``) and answer: the task's encoded boxes (fractions of the axes), the
    number of windows, each box in voxels of the volume's own grid (``voxels``: z, y, x) and, where the volume has a
    geometry, in world coordinates (``world``: RAS mm, as NIfTI; LPS is x and y negated)."""
    from lepton.data.readers.boxes import voxel_to_world_boxes

    row, windows = detect_volume(run, frame.pixels)
    answer = {"path": name, **run.task.encode(row, run.label_names, run.info), "windows": windows}
    shape = np.asarray(frame.pixels.shape[1:], np.float64)
    voxels = _listed(run, row)[:, :6] * np.concatenate([shape, shape])
    world = voxel_to_world_boxes(voxels, frame.affine) if frame.affine is not None else None
    for k, box in enumerate(answer["boxes"]):
        box["voxels"] = {f"{a}{e}": round(float(voxels[k, 3 * e + j]), 3) for e in (0, 1) for j, a in enumerate("zyx")}
        if world is not None:
            box["world"] = {f"{a}{e}": round(float(world[k, 3 * e + j]), 3)
                            for e in (0, 1) for j, a in enumerate("xyz")}
    answer["world_coordinates"] = "RAS mm" if world is not None else None
    return row, answer


def box_heatmaps(run, pixels: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """The run's answer for one image or volume (C, …) in [0, 1] and one Grad-CAM-style map per listed box (n, …) in
    [0, 1] on the input's own grid: computed where the network met the input (its input size, or for a volume larger
    than that at the scale of training, the whole volume at that scale) and resampled to the input's shape. A volume's
    answer is ``volume_answer``'s boxes (fractions of the axes), a 2-D image's ``Run.predict``'s."""
    import torch
    import torch.nn.functional as F

    dims = pixels.ndim - 1
    x = _at_training_scale(run, pixels) if dims == 3 else None
    if x is None:
        answer, maps = explain_boxes(run, pixels)
    else:
        row, _ = detect_volume(run, pixels)
        answer = run.task.encode(row, run.label_names, run.info)
        maps = run.model.box_saliency(x, torch.from_numpy(_listed(run, row)).to(run.device)).cpu().numpy()
    if not len(maps):
        return answer, np.zeros((0, *pixels.shape[1:]), np.float32)
    mode = "trilinear" if dims == 3 else "bilinear"
    full = F.interpolate(torch.from_numpy(maps)[:, None].float(), size=tuple(pixels.shape[1:]), mode=mode,
                         align_corners=False)[:, 0]
    full = full / full.flatten(1).amax(1).clamp_min(1e-12).view(-1, *[1] * dims)
    return answer, full.clamp(0, 1).numpy()
