"""Preprocessing (resize, channels, normalisation) saved with each run, and batched augmentation.

Two kinds of transform, on purpose: per-case preprocessing is a MONAI ``Compose`` of dictionary transforms saved with
the run (``lepton.data.transforms.pipeline``); augmentation runs on whole batches of tensors (MONAI's affine matrices,
one ``grid_sample`` per batch) rather than MONAI's per-sample random transforms, which measured far slower on batches
(``benchmarks/transforms.py``), so data preparation stays a small fraction of a training step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lepton.errors import ConfigError, DataError

#: Named augmentation presets. Values: probability (hflip) or maximum magnitude.
AUGMENT_PRESETS: dict[str, dict[str, float]] = {
    "none": {},
    "light": {"hflip": 0.5, "rotate": 10.0, "translate": 0.05, "scale": 0.10,
              "brightness": 0.10, "contrast": 0.10},
    # Chest X-rays: no vertical flips, modest geometry, exposure and gamma changes, sensor noise.
    "xray": {"hflip": 0.5, "rotate": 10.0, "translate": 0.08, "scale": 0.12, "shear": 5.0,
             "brightness": 0.15, "contrast": 0.20, "gamma": 0.25, "noise": 0.02},
    # X-ray preset plus, on 50 % of batches, one of the robustness report's corruption families
    # (noise, blur, pixelation, JPEG, exposure) at severity 1-3: trades clean accuracy for robustness.
    "corrupt": {"hflip": 0.5, "rotate": 10.0, "translate": 0.08, "scale": 0.12, "shear": 5.0,
                "brightness": 0.15, "contrast": 0.20, "gamma": 0.25, "corrupt": 0.5},
    "strong": {"hflip": 0.5, "vflip": 0.5, "rotate": 25.0, "translate": 0.10, "scale": 0.20,
               "shear": 8.0, "brightness": 0.25, "contrast": 0.30, "gamma": 0.35, "noise": 0.04},
}
AUGMENT_KEYS = ("hflip", "vflip", "rotate", "translate", "scale", "shear", "brightness",
                "contrast", "gamma", "noise", "corrupt")
#: The options that move pixels (masks move with them); the rest change intensities only.
GEOMETRY_KEYS = ("rotate", "shear", "scale", "translate", "hflip", "vflip")


def augment_options(preset: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """A preset's options updated with explicit values; unknown names are a ConfigError."""
    if preset not in AUGMENT_PRESETS:
        raise ConfigError(f"unknown augment preset {preset!r}; choose one of {', '.join(AUGMENT_PRESETS)}")
    opts = dict(AUGMENT_PRESETS[preset])
    for key, value in (overrides or {}).items():
        if key not in AUGMENT_KEYS:
            raise ConfigError(f"unknown augment option {key!r}; valid: {', '.join(AUGMENT_KEYS)}")
        opts[key] = float(value)
    return opts


def augment_batch(x: torch.Tensor, opts: dict[str, float], generator: torch.Generator,
                  masks: torch.Tensor | None = None):
    """Randomly flip, rotate, shear, scale, shift and re-expose a batch in [0, 1] (images or volumes).

    The geometric options draw one affine matrix per sample in voxel units (``random_affine``), mapped to
    ``grid_sample`` coordinates as MONAI's ``to_norm_affine`` maps them (``affine_grid``), and the whole batch moves
    in one warp
    (bilinear, border padding). With ``masks`` (N, 1, …) of class indices, the same sampling grid moves each mask
    (nearest neighbour, zero outside) and ``(images, masks)`` is returned; intensity changes touch the images only.
    The same generator state gives the same result.

    Measured on 2 CPU cores (``benchmarks/transforms.py``, ``docs/benchmarks.md``), hence not MONAI's own warps:
    ``RandAffined`` takes one sample at a time and was 28-29× slower on a 64 × 64² batch, 1.25× (one thread) to 2.9×
    (two) on 2 × 96³ volumes; the batched ``AffineTransform`` layer builds its grid per call, so image and mask cost
    two ``affine_grid`` calls (the slow half on CPU): 1.45-1.67× slower than the one grid shared here.
    """
    if not opts:
        return x if masks is None else (x, masks)
    theta = random_affine(x, opts, generator)
    if theta is not None:
        grid = affine_grid(theta, x.shape)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if masks is not None:
            moved = F.grid_sample(masks.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
            masks = moved.to(masks.dtype)
    x = _intensity(x, opts, generator)
    return x if masks is None else (x, masks)


def random_affine(x: torch.Tensor, opts: dict[str, float], generator: torch.Generator) -> torch.Tensor | None:
    """One random affine matrix per sample of ``x`` (N, C, …), (N, d + 1, d + 1) from output to input voxel
    coordinates, centred and in the order of ``x``'s spatial axes, as MONAI's ``Affine`` uses them; None when no
    geometric option is set (the draws are made all the same, so the intensity draws that follow do not shift).
    Built for the whole batch at once: MONAI's ``create_rotate``/``create_shear``/``create_scale``/``create_translate``
    build the same matrices one sample at a time, which made a 64-image batch's augmentation 1.13-1.68× slower
    (``benchmarks/transforms.py``).

    Images: ``hflip``/``vflip`` (probabilities), ``rotate`` and ``shear`` (degrees, ±), isotropic ``scale`` (±
    fraction), ``translate`` (± fraction of each side). Volumes (D, H, W): ``hflip`` mirrors W, ``vflip`` H and D
    (each drawn alone), ``rotate`` turns H and W about the depth axis; no shear.
    """
    n, dims = x.shape[0], x.ndim - 2

    def uniform(mag: float) -> torch.Tensor:
        return ((torch.rand(n, generator=generator) * 2 - 1) * mag).double()

    def sign(p: float) -> torch.Tensor:
        return torch.where(torch.rand(n, generator=generator) < p, -1.0, 1.0).double()

    # The draws, in the order the hand-written version made them (W-axis values first).
    angle = torch.deg2rad(uniform(opts.get("rotate", 0.0)))
    shear = torch.tan(torch.deg2rad(uniform(opts.get("shear", 0.0)))) if dims == 2 else None
    scale = 1.0 + uniform(opts.get("scale", 0.0))
    flips = torch.stack([sign(opts.get("hflip", 0.0)), *[sign(opts.get("vflip", 0.0)) for _ in range(dims - 1)]], 1)
    shifts = torch.stack([uniform(opts.get("translate", 0.0)) for _ in range(dims)], 1)
    if not any(opts.get(k, 0.0) for k in GEOMETRY_KEYS if dims == 2 or k != "shear"):
        return None
    eye = torch.eye(dims, dtype=torch.float64).repeat(n, 1, 1)
    # output -> input: scale (and mirror), shear (W in proportion to H), rotate (H and W, in index order), shift
    linear = torch.diag_embed(1.0 / (scale[:, None] * flips.flip(1)))
    if shear is not None:
        sheared = eye.clone()
        sheared[:, 1, 0] = shear
        linear = sheared @ linear
    rotate, h, w = eye.clone(), dims - 2, dims - 1
    rotate[:, h, h], rotate[:, h, w], rotate[:, w, h], rotate[:, w, w] = (angle.cos(), angle.sin(), -angle.sin(),
                                                                          angle.cos())
    # to_norm_affine (affine_grid) maps zero-centred voxel units to grid_sample's [-1, 1] by 2 / (side - 1) (corners not
    # aligned), so a shift of u (side - 1) moves by the fraction u of the side, as the hand-written version did.
    sides = torch.tensor(x.shape[2:], dtype=torch.float64) - 1
    theta = torch.eye(dims + 1, dtype=torch.float64).repeat(n, 1, 1)
    theta[:, :dims, :dims] = rotate @ linear
    theta[:, :dims, dims] = shifts.flip(1) * sides
    return theta.to(device=x.device, dtype=x.dtype)


def affine_grid(theta: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The ``grid_sample`` grid of centred voxel matrices ``theta`` (N, d + 1, d + 1) for a batch of ``shape``, as
    MONAI's ``AffineTransform`` builds it (``to_norm_affine``, zero-centred, corners not aligned: 2 / (side - 1) per
    axis). Written out rather than imported: importing ``monai.networks`` for it cost 2-8 s per process on 2 loaded
    cores, where a classification run otherwise needs no MONAI (a test checks it against ``to_norm_affine``)."""
    dims = len(shape) - 2
    sides = torch.tensor(shape[2:], dtype=torch.float64, device=theta.device)
    scale = torch.cat([2.0 / (sides - 1).clamp_min(1.0), torch.ones(1, dtype=torch.float64, device=theta.device)])
    norm = scale[:, None] * theta.double() / scale[None, :]  # diag(scale) @ theta @ diag(scale)^-1
    order = [*range(dims - 1, -1, -1), dims]  # grid_sample's coordinates run (x, y, z): the axes reversed
    norm = norm[:, order][:, :, order]
    return F.affine_grid(norm[:, :dims].to(theta.dtype), list(shape), align_corners=False)


def _intensity(x: torch.Tensor, opts: dict[str, float], generator: torch.Generator) -> torch.Tensor:
    """Gamma, contrast, brightness, sensor noise and corruptions: per sample, for images and volumes alike."""
    n = x.shape[0]

    def uniform(mag: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * mag

    shape = (n, *[1] * (x.ndim - 1))
    reduce = tuple(range(1, x.ndim))
    if opts.get("gamma"):
        gamma = torch.exp(uniform(opts["gamma"])).view(shape)
        x = x.clamp(1e-6, 1.0) ** gamma
    if opts.get("contrast"):
        mean = x.mean(dim=reduce, keepdim=True)
        x = (x - mean) * (1.0 + uniform(opts["contrast"]).view(shape)) + mean
    if opts.get("brightness"):
        x = x + uniform(opts["brightness"]).view(shape)
    if opts.get("noise"):
        sigma = torch.rand(n, generator=generator).view(shape) * opts["noise"]
        x = x + torch.randn(x.shape, generator=generator) * sigma
    if opts.get("corrupt") and x.ndim == 4 and float(torch.rand(1, generator=generator)) < opts["corrupt"]:
        from lepton.data.transforms.corruptions import CORRUPTIONS, corrupt

        names = sorted(CORRUPTIONS)
        name = names[int(torch.randint(len(names), (1,), generator=generator))]
        severity = int(torch.randint(1, 4, (1,), generator=generator))
        x = corrupt(x.clamp(0.0, 1.0), name, severity, seed=int(torch.randint(2**31, (1,), generator=generator)))
    return x.clamp(0.0, 1.0)


def pad_or_crop(x: torch.Tensor, size: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    """Centre-pad (with ``value``) or centre-crop the trailing spatial axes of ``x`` to ``size``; no interpolation.

    Pads as MONAI's ``ResizeWithPadOrCrop`` (and so the volume pipeline's ``crop_or_pad`` step and the sliding-window
    inferer) do: an odd extra voxel goes after. A crop drops an odd extra voxel after too, so padding and cropping by
    the same amount undo each other (MONAI's crop of an even side to an odd one drops it before). Not MONAI's
    transform itself: its metadata bookkeeping costs ~0.5-2 ms per call, 2.3-39× this single ``F.pad`` on the
    batches and per-case masks it is used on (``benchmarks/transforms.py``).
    """
    spatial = x.shape[-len(size):]
    pads: list[int] = []
    for have, want in zip(reversed(spatial), reversed(size), strict=True):
        extra = want - have
        before = int(extra / 2)  # towards zero, so that padding and cropping by the same amount undo each other
        pads += [before, extra - before]  # negative: F.pad crops
    return F.pad(x, pads, value=value) if any(pads) else x


@dataclass
class Preprocessing:
    """Everything needed to turn a decoded image into a network input; saved with every run."""

    size: tuple[int, ...]  # (H, W) for images, (D, H, W) for volumes
    channels: int
    mean: list[float]
    std: list[float]
    window: str | None = None
    slices: str = "middle"
    steps: list[dict[str, Any]] = field(default_factory=list)  # volume steps, lepton.data.transforms.pipeline
    # How an input reaches ``size``: "resize" (interpolate: classification) or "pad" (centre pad or crop, never
    # interpolate: segmentation keeps every voxel on its grid)
    fit: str = "resize"
    # What else the task needs to prepare an input as training did (``Task.options`` and fitted state): a sequence
    # task's frame rate and clip length, its covariates' fitted schema.
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self) | {"size": list(self.size)}
        for key, default in (("steps", []), ("fit", "resize"), ("options", {})):  # readable by versions without them
            if out[key] == default:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(**(values | {"size": tuple(values["size"])}))

    @property
    def spatial_dims(self) -> int:
        return len(self.size)

    def resize(self, images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        """Stack images as float32 (N, C, H, W) — volumes (N, C, D, H, W) — in [0, 1] at ``size`` with ``channels``."""
        if isinstance(images, np.ndarray) and images.ndim == 2 + self.spatial_dims:
            return self._fit(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        out = torch.empty((len(images), self.channels, *self.size), dtype=torch.float32)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        for idx in by_shape.values():
            batch = torch.from_numpy(np.stack([images[i] for i in idx]).astype(np.float32, copy=False))
            out[idx] = self._fit(batch)
        return out

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convert_channels(x)
        return self._fit_size(x)

    def convert_channels(self, x: torch.Tensor) -> torch.Tensor:
        """A batch (N, C, …) checked for its dimensions and converted to ``channels`` (RGB to grey, grey to RGB)."""
        c, dims = x.shape[1], self.spatial_dims
        if x.ndim != 2 + dims:
            raise DataError(f"expected {'volumes' if dims == 3 else 'images'} of {dims} spatial dimensions, got an "
                            f"array of shape {tuple(x.shape[1:])}; this model takes {'x'.join(map(str, self.size))} "
                            "inputs")
        if c != self.channels:
            spatial = [1] * dims
            if c == 3 and self.channels == 1:
                weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, *spatial)
                x = (x * weights).sum(1, keepdim=True)
            elif c == 1 and self.channels == 3:
                x = x.expand(-1, 3, *[-1] * dims)
            else:
                raise DataError(f"an input of {c} channels cannot be turned into the model's {self.channels}")
        return x

    def _fit_size(self, x: torch.Tensor) -> torch.Tensor:
        dims = self.spatial_dims
        if tuple(x.shape[2:]) != tuple(self.size) and self.fit == "pad":
            x = pad_or_crop(x, self.size)
        elif tuple(x.shape[2:]) != tuple(self.size):
            if dims == 2:
                chunks = [F.interpolate(part, size=self.size, mode="bilinear", antialias=True, align_corners=False)
                          for part in torch.split(x, 256)]
            else:  # no antialiased trilinear in PyTorch: area averages when shrinking, trilinear when growing
                mode = "area" if all(a >= b for a, b in zip(x.shape[2:], self.size, strict=True)) else "trilinear"
                chunks = [F.interpolate(part, size=self.size, mode=mode, **({} if mode == "area" else
                                                                            {"align_corners": False}))
                          for part in torch.split(x, 32)]
            x = torch.cat(chunks).clamp(0.0, 1.0)
        return x.contiguous()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, *[1] * (x.ndim - 2))
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def __call__(self, images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        """Resize, convert channels and normalise: the exact inference-time input."""
        return self.normalize(self.resize(images))
