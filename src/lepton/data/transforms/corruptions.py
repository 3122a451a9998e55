"""Image corruptions at five severities, on batches in [0, 1]: noise, blur, pixelation, JPEG and exposure.

The families follow those MedMNIST-C applies to X-ray data; severities are scaled so level 1 is barely
visible and level 5 is strong. Training augmentation (``lepton.data.transforms.preprocessing``) and the robustness
report (``lepton.robustness``) both draw on this table.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lepton.errors import ConfigError

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _gaussian_noise(x, s, g):
    return x + torch.randn(x.shape, generator=g) * [0.02, 0.04, 0.06, 0.09, 0.12][s - 1]


def _speckle_noise(x, s, g):
    return x + x * torch.randn(x.shape, generator=g) * [0.06, 0.10, 0.15, 0.20, 0.30][s - 1]


def _impulse_noise(x, s, g):
    amount = [0.01, 0.02, 0.04, 0.06, 0.09][s - 1]
    u = torch.rand(x.shape, generator=g)
    return torch.where(u < amount / 2, 0.0, torch.where(u > 1 - amount / 2, 1.0, x))


def _gaussian_blur(x, s, g):
    sigma = [0.4, 0.6, 0.8, 1.0, 1.3][s - 1] * x.shape[-1] / 28
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


def _pixelate(x, s, g):
    h, w = x.shape[-2:]
    f = [0.85, 0.7, 0.55, 0.45, 0.35][s - 1]
    small = F.interpolate(x, size=(max(1, int(h * f)), max(1, int(w * f))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def _jpeg(x, s, g):
    from PIL import Image

    quality = [75, 50, 30, 18, 10][s - 1]
    out = torch.empty_like(x)
    for i, img in enumerate((x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()):
        mode_img = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        buf = io.BytesIO()
        mode_img.save(buf, format="JPEG", quality=quality)
        arr = np.asarray(Image.open(buf), dtype=np.float32) / 255
        out[i] = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return out


def _brightness(x, s, g):
    return x + [0.05, 0.10, 0.15, 0.22, 0.30][s - 1]


def _contrast(x, s, g):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * [0.75, 0.6, 0.45, 0.3, 0.2][s - 1] + mean


def _gamma(x, s, g):
    return x.clamp(1e-6, 1) ** [1.25, 1.5, 1.8, 2.2, 2.7][s - 1]


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise, "speckle_noise": _speckle_noise, "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur, "pixelate": _pixelate, "jpeg": _jpeg, "brightness": _brightness,
    "contrast": _contrast, "gamma": _gamma,
}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1–5) to a batch in [0, 1]: images (N, C, H, W), or volumes
    (N, C, D, H, W) slice by slice (blur, pixelation and JPEG act in-plane, as a scanner's would)."""
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ConfigError(f"severity must be 1-5 (got {severity})")
    if x.ndim == 5:
        n, c, d, h, w = x.shape
        flat = corrupt(x.permute(0, 2, 1, 3, 4).reshape(n * d, c, h, w), name, severity, seed)
        return flat.reshape(n, d, c, h, w).permute(0, 2, 1, 3, 4).contiguous()
    return CORRUPTIONS[name](x, severity, torch.Generator().manual_seed(seed)).clamp(0, 1)
