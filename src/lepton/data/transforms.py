"""Preprocessing (resize, channels, normalisation) saved with each run, and batched augmentation.

Augmentation runs on whole batches of tensors (one ``affine_grid``/``grid_sample`` call per batch)
rather than per-sample transforms, so data preparation stays a small fraction of a training step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lepton.errors import ConfigError

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


def augment_batch(x: torch.Tensor, opts: dict[str, float], generator: torch.Generator) -> torch.Tensor:
    """Randomly flip, rotate, shear, scale, shift and re-expose a batch in [0, 1]."""
    if not opts:
        return x
    n = x.shape[0]

    def uniform(mag: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * mag

    angle = torch.deg2rad(uniform(opts.get("rotate", 0.0)))
    shear = torch.deg2rad(uniform(opts.get("shear", 0.0)))
    scale = 1.0 + uniform(opts.get("scale", 0.0))
    sx = scale * torch.where(torch.rand(n, generator=generator) < opts.get("hflip", 0.0), -1.0, 1.0)
    sy = scale * torch.where(torch.rand(n, generator=generator) < opts.get("vflip", 0.0), -1.0, 1.0)
    tx, ty = uniform(opts.get("translate", 0.0)) * 2, uniform(opts.get("translate", 0.0)) * 2
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    zero, one = torch.zeros(n), torch.ones(n)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shr = torch.stack([torch.stack([one, tan], 1), torch.stack([zero, one], 1)], 1)
    # affine_grid maps output to input coordinates, hence the inverse scale.
    scl = torch.stack([torch.stack([1 / sx, zero], 1), torch.stack([zero, 1 / sy], 1)], 1)
    linear = rot @ shr @ scl
    theta = torch.cat([linear, torch.stack([tx, ty], 1)[:, :, None]], 2).to(x.dtype)
    if any(opts.get(k, 0.0) for k in ("rotate", "shear", "scale", "translate", "hflip", "vflip")):
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    shape = (n, 1, 1, 1)
    if opts.get("gamma"):
        gamma = torch.exp(uniform(opts["gamma"])).view(shape)
        x = x.clamp(1e-6, 1.0) ** gamma
    if opts.get("contrast"):
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (1.0 + uniform(opts["contrast"]).view(shape)) + mean
    if opts.get("brightness"):
        x = x + uniform(opts["brightness"]).view(shape)
    if opts.get("noise"):
        sigma = torch.rand(n, generator=generator).view(shape) * opts["noise"]
        x = x + torch.randn(x.shape, generator=generator) * sigma
    if opts.get("corrupt") and float(torch.rand(1, generator=generator)) < opts["corrupt"]:
        from lepton.data.corruptions import CORRUPTIONS, corrupt

        names = sorted(CORRUPTIONS)
        name = names[int(torch.randint(len(names), (1,), generator=generator))]
        severity = int(torch.randint(1, 4, (1,), generator=generator))
        x = corrupt(x.clamp(0.0, 1.0), name, severity, seed=int(torch.randint(2**31, (1,), generator=generator)))
    return x.clamp(0.0, 1.0)


@dataclass
class Preprocessing:
    """Everything needed to turn a decoded image into a network input; saved with every run."""

    size: tuple[int, int]
    channels: int
    mean: list[float]
    std: list[float]
    window: str | None = None
    slices: str = "middle"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"size": list(self.size)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(**(values | {"size": tuple(values["size"])}))

    def resize(self, images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        """Stack images as float32 (N, C, H, W) in [0, 1] at ``size`` with ``channels``."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
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
        c = x.shape[1]
        if c != self.channels:
            if c == 3 and self.channels == 1:
                weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                x = (x * weights).sum(1, keepdim=True)
            elif c == 1 and self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != tuple(self.size):
            chunks = [
                F.interpolate(part, size=self.size, mode="bilinear", antialias=True, align_corners=False)
                for part in torch.split(x, 256)
            ]
            x = torch.cat(chunks).clamp(0.0, 1.0)
        return x.contiguous()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def __call__(self, images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        """Resize, convert channels and normalise: the exact inference-time input."""
        return self.normalize(self.resize(images))
