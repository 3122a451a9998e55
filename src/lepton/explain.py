"""Explanations: Grad-CAM and Grad-CAM++ heatmaps (MONAI's implementations) with PNG overlays; for detection runs
one HiResCAM map per box."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError
from lepton.utils import atomic_write_bytes

METHODS = ("gradcam", "gradcam++")


def saliency_maps(run, images: list[np.ndarray] | np.ndarray, *, method: str = "gradcam",
                  class_idx: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps in [0, 1] at the model's input size for decoded images, and the explained class per image.

    ``class_idx`` None explains the output the run's task picks for each image (for classification the
    predicted class under the run's decision rule).
    """
    import torch
    from monai.visualize import GradCAM, GradCAMpp

    from lepton.models import model_info
    from lepton.models.layout import model_layout

    if method not in METHODS:
        raise ConfigError(f"unknown explanation method {method!r}; use {' or '.join(METHODS)}")
    if run.preprocessing.options.get("covariates"):  # as the server: a map of the image alone would mislead
        raise ConfigError("explanations are for models of the image alone; this run fuses clinical covariates with "
                          "the image, and a saliency map without them would explain a different answer")
    layer = model_info(run.config.model).cam_layer
    x = run.preprocessing(images).to(run.device)
    if class_idx is None:
        targets = np.array([run.task.explain_index(row, run.info) for row in run.predict_proba(images)])
    else:
        if not 0 <= class_idx < run.task.num_outputs(run.label_names):
            raise ConfigError(f"class index {class_idx} is out of range for {run.label_names}")
        targets = np.full(len(x), class_idx)
    cam_cls = GradCAM if method == "gradcam" else GradCAMpp
    model = run.model.float().to(memory_format=torch.contiguous_format)
    extra = {}
    if getattr(model, "depth", None) and hasattr(model, "net"):  # 2.5-D: a slice map, shown on every slice
        layer, extra = f"net.{layer}", {"upsampler": _slab_upsampler}
    # An ensemble's map is the mean of its members' maps (each member's layer, the ensemble's answer).
    layers = ([f"members.{k}.{layer}" for k in range(len(model.members))] if hasattr(model, "members")
              else [layer])
    maps = 0
    for target in layers:
        # MONAI's default post-processing maps (min, max) to (1, 0), inverting the map; scale to (0, 1).
        cam = cam_cls(nn_module=model, target_layers=target, postprocessing=_unit_scale, **extra)
        maps = maps + np.concatenate([
            cam(x[i:i + 1].contiguous(), class_idx=int(targets[i])).detach().cpu().numpy() for i in range(len(x))
        ])[:, 0]
    maps = maps / len(layers)
    model_layout(run.model)
    return maps.astype(np.float32), np.asarray(targets)


def _slab_upsampler(spatial_size):
    """A 2-D map (N, 1, h, w) of a 2.5-D network to (N, 1, D, H, W): the same in-plane map on every slice."""
    import torch.nn.functional as F

    depth, size = spatial_size[0], spatial_size[1:]

    def up(maps):
        flat = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return flat[:, :, None].expand(-1, -1, depth, -1, -1)

    return up


def _unit_scale(maps):
    """Per-map min-max scaling to [0, 1], highest activation = 1 (a flat map becomes 0)."""
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.min(dim=1).values.view(-1, *[1] * (maps.ndim - 1))
    span = (flat.max(dim=1).values.view(-1, *[1] * (maps.ndim - 1)) - low).clamp_min(1e-12)
    return (maps - low) / span


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> bytes:
    """A PNG of a grayscale image (H, W in [0, 1]) with a jet-coloured heatmap blended over it."""
    from matplotlib import colormaps
    from PIL import Image

    base = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)
    colour = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3]
    blend = (1 - alpha * heatmap[..., None]) * base + alpha * heatmap[..., None] * colour
    buf = io.BytesIO()
    Image.fromarray((np.clip(blend, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def layer_pngs(image: np.ndarray, heatmap: np.ndarray, slices: int = 8) -> tuple[bytes, bytes]:
    """The two layers a viewer stacks to set the heatmap's opacity itself: the grayscale image and the jet-coloured
    heatmap with its own alpha (0 where the map is 0); a (D, H, W) volume as the same grid of slices as
    ``montage_png``."""
    from matplotlib import colormaps
    from PIL import Image

    if image.ndim == 3:
        picks = np.unique(np.linspace(0, len(image) - 1, min(slices, len(image))).round().astype(int))
        cols = min(4, len(picks))
        rows = -(-len(picks) // cols)
        h, w = image.shape[1:]
        grid_image, grid_heat = np.zeros((rows * h, cols * w), np.float32), np.zeros((rows * h, cols * w), np.float32)
        for i, d in enumerate(picks):
            r, c = divmod(i, cols)
            grid_image[r * h:(r + 1) * h, c * w:(c + 1) * w] = image[d]
            grid_heat[r * h:(r + 1) * h, c * w:(c + 1) * w] = heatmap[d]
        image, heatmap = grid_image, grid_heat
    heat = np.clip(heatmap, 0, 1)
    rgba = colormaps["jet"](heat)
    rgba[..., 3] = heat
    out = []
    for array in (np.clip(image, 0, 1), rgba):
        buf = io.BytesIO()
        Image.fromarray((array * 255).round().astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out[0], out[1]


def montage_png(volume: np.ndarray, heatmap: np.ndarray, slices: int = 8, alpha: float = 0.45) -> bytes:
    """A PNG grid of ``slices`` evenly spaced axial slices of a (D, H, W) volume with the heatmap over each."""
    from PIL import Image

    picks = np.unique(np.linspace(0, len(volume) - 1, min(slices, len(volume))).round().astype(int))
    tiles = [np.asarray(Image.open(io.BytesIO(overlay_png(volume[d], heatmap[d], alpha)))) for d in picks]
    cols = min(4, len(tiles))
    rows = -(-len(tiles) // cols)
    h, w = tiles[0].shape[:2]
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, tile in enumerate(tiles):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = tile[..., :3]
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


def explain(run, paths: list[str | Path], *, method: str = "gradcam", output: str | Path = "explanations",
            target: str | None = None) -> list[dict[str, Any]]:
    """Write ``<name>_<method>.png`` overlays and ``<name>_<method>.npy`` raw maps for image files.

    For volumes the overlay is a montage of axial slices and the map is also written as ``<name>_<method>.nii.gz``
    on the input's own grid and affine, so a viewer shows it over the scan. ``target`` names the class to explain
    (default: each image's predicted class).
    """
    from lepton.data.readers.io import read_image
    from lepton.runs import Run, load_run

    run = run if isinstance(run, Run) else load_run(run)
    if "explain_boxes" in run.task.capabilities:
        if method != "gradcam":
            raise ConfigError(f"a {run.task.name} run's boxes are explained by HiResCAM per box (the default "
                              f"method); drop --method {method}")
        return explain_boxes(run, paths, output=output, target=target)
    class_idx = None
    if target is not None:
        if target not in run.label_names:
            raise ConfigError(f"unknown class {target!r}; the run's classes are {run.label_names}")
        class_idx = run.label_names.index(target)
    frames, names, affines = [], [], []
    for p in paths:
        for frame in read_image(p, window=run.preprocessing.window, slices=run.preprocessing.slices,
                                    steps=run.preprocessing.steps):
            frames.append(frame.pixels)
            names.append(frame.name.replace("#", "_").replace("=", ""))
            affines.append(frame.affine)
    maps, targets = saliency_maps(run, frames, method=method, class_idx=class_idx)
    shown = run.preprocessing.resize(frames).mean(1).numpy()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    tag = method.replace("++", "pp")
    for name, image, heat, k, pixels, affine in zip(names, shown, maps, targets, frames, affines, strict=True):
        stem = name.removesuffix(".gz").rsplit(".", 1)[0] if "." in name else name
        png, npy = out / f"{stem}_{tag}.png", out / f"{stem}_{tag}.npy"
        atomic_write_bytes(png, overlay_png(image, heat) if heat.ndim == 2 else montage_png(image, heat))
        buf = io.BytesIO()
        np.save(buf, heat)
        atomic_write_bytes(npy, buf.getvalue())
        row = {"image": name, "class": _output_name(run, int(k)), "method": method, "overlay": str(png),
               "map": str(npy)}
        if heat.ndim == 3:
            row["nifti"] = str(_save_volume_map(heat, np.shape(pixels)[1:], affine, out / f"{stem}_{tag}.nii.gz"))
        results.append(row)
    return results


def explain_boxes(run, paths: list[str | Path], *, output: str | Path = "explanations",
                  target: str | None = None) -> list[dict[str, Any]]:
    """One map per box a detection run finds (``Task.finding_maps``: HiResCAM at the box's anchors, on the input's
    own grid), written as ``<name>_box<k>.png`` — the image with the map over it; for a volume the axial slices the
    box spans — and for volumes also ``<name>_box<k>.nii.gz`` with the input's affine. One row per image: its boxes as
    the run answers them (``target``: only that class's), each with its files."""
    from lepton.data.readers.io import read_image

    if target is not None and target not in run.label_names:
        raise ConfigError(f"unknown class {target!r}; the run's classes are {run.label_names}")
    spec = run.preprocessing
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for p in paths:
        for frame in read_image(p, window=spec.window, slices="volume" if spec.spatial_dims == 3 else spec.slices):
            name = frame.name.replace("#", "_").replace("=", "")
            stem = name.removesuffix(".gz").rsplit(".", 1)[0] if "." in name else name
            answer, maps = run.task.finding_maps(run, frame.pixels)
            shown = frame.pixels.mean(0)
            boxes = []
            for k, (box, heat) in enumerate(zip(answer["boxes"], maps, strict=True)):
                if target is not None and box["label"] != target:
                    continue
                png = out / f"{stem}_box{k}.png"
                row = {**box, "overlay": str(png)}
                atomic_write_bytes(png, box_png(shown, heat, box))
                if heat.ndim == 3:
                    row["nifti"] = str(_save_volume_map(heat, heat.shape, frame.affine, out / f"{stem}_box{k}.nii.gz"))
                boxes.append(row)
            results.append({"image": name, "method": "hirescam", "count": len(boxes), "boxes": boxes})
    return results


def box_png(image: np.ndarray, heatmap: np.ndarray, box: dict[str, Any]) -> bytes:
    """A box's map over its image (H, W) as a PNG overlay; over a volume (D, H, W) a montage of the axial slices the
    box spans (``box["box"]``: its coordinates as fractions of the axes, as a detection answer lists them)."""
    if heatmap.ndim == 2:
        return overlay_png(image, heatmap)
    depth = len(heatmap)
    z0 = min(int(box["box"]["z0"] * depth), depth - 1)
    z1 = max(z0 + 1, int(np.ceil(box["box"]["z1"] * depth)))
    return montage_png(image[z0:z1], heatmap[z0:z1])


def _save_volume_map(heat: np.ndarray, shape: tuple[int, ...], affine: np.ndarray | None, path: Path) -> Path:
    """The (D, H, W) map resampled to the input volume's grid and saved as NIfTI with the input's affine (1 mm
    voxels at the origin when the input had none, as a MedMNIST array)."""
    import gzip

    import nibabel as nib
    import torch
    import torch.nn.functional as F

    full = F.interpolate(torch.from_numpy(heat)[None, None], size=tuple(shape), mode="trilinear",
                         align_corners=False)[0, 0].numpy()
    img = nib.Nifti1Image(full.astype(np.float32), affine if affine is not None else np.eye(4))
    atomic_write_bytes(path, gzip.compress(img.to_bytes()))
    return path


def _output_name(run, index: int) -> str:
    """The class a map explains, or ``output <index>`` when the task's outputs are not classes."""
    if run.task.num_outputs(run.label_names) == len(run.label_names):
        return run.label_names[index]
    return f"output {index}"
