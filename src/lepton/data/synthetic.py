"""A synthetic chest-X-ray-like dataset with known lesion locations, for the demo and tests.

Each image is a frontal projection: a bright body outline, two dark lung fields of varying size
and position, a bright mediastinum/heart shadow, faint rib arcs, and film noise and blur. Class 1
("opacity") adds one or two soft, irregular bright consolidations inside a lung field, like a
pneumonia opacity; its mask is returned so explanations can be scored against the true location.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABEL_NAMES = ["normal", "opacity"]


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma, mode="reflect")


def synth_chest_xray(rng: np.random.Generator, size: int, opacity: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image (size, size) float32 in [0, 1] and its lesion mask (bool)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx = 0.5 + rng.normal(0, 0.02)
    body = (((xx - cx) / (0.46 + rng.normal(0, 0.02))) ** 2 + ((yy - 0.55) / 0.55) ** 2) < 1
    img = 0.15 + 0.45 * body
    lungs = np.zeros_like(img, dtype=bool)
    lung_fields = []
    for side in (-1, 1):
        lx = cx + side * (0.19 + rng.normal(0, 0.015))
        ly = 0.47 + rng.normal(0, 0.02)
        rx, ry = 0.13 + rng.normal(0, 0.012), 0.27 + rng.normal(0, 0.02)
        field = ((xx - lx) / rx) ** 2 + ((yy - ly) / ry) ** 2 < 1
        lungs |= field
        lung_fields.append((lx, ly, rx, ry))
    img = np.where(lungs, 0.12 + rng.normal(0, 0.02), img)
    heart = ((xx - cx - 0.04) / (0.12 + rng.normal(0, 0.01))) ** 2 + ((yy - 0.68) / 0.14) ** 2 < 1
    img = np.where(heart, 0.55, img)
    for k in range(6):  # rib arcs
        y0 = 0.25 + 0.09 * k + rng.normal(0, 0.005)
        arc = np.abs(yy - (y0 + 0.35 * (xx - cx) ** 2)) < 0.012
        img = img + 0.08 * (arc & body)
    mask = np.zeros((size, size), dtype=bool)
    if opacity:
        for _ in range(rng.integers(1, 3)):
            lx, ly, rx, ry = lung_fields[rng.integers(0, 2)]
            ox = lx + rng.uniform(-0.5, 0.5) * rx
            oy = ly + rng.uniform(-0.5, 0.6) * ry
            sr = rng.uniform(0.05, 0.10)
            blob = np.exp(-(((xx - ox) ** 2 + ((yy - oy) / 1.3) ** 2) / (2 * sr**2)))
            blob *= 1 + 0.35 * rng.standard_normal(blob.shape).astype(np.float32)
            blob = _blur(blob.astype(np.float32), 1.2) * lungs
            img = img + rng.uniform(0.22, 0.40) * blob
            mask |= blob > 0.35
    img = _blur(img.astype(np.float32), rng.uniform(0.6, 1.2))
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 0.04)  # exposure
    img = img + rng.normal(0, 0.03, img.shape)  # quantum noise
    return np.clip(img, 0, 1).astype(np.float32), mask


def make_synthetic(
    n: int = 600, size: int = 64, positive_fraction: float = 0.4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` images (uint8, N×size×size), labels (N,) and lesion masks (N×size×size)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < positive_fraction).astype(np.int64)
    images = np.empty((n, size, size), np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i, label in enumerate(labels):
        img, mask = synth_chest_xray(rng, size, bool(label))
        images[i] = np.round(img * 255).astype(np.uint8)
        masks[i] = mask
    return images, labels, masks


def write_synthetic_npz(
    path: str | Path, n: int = 1000, size: int = 64, seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> Path:
    """Write a MedMNIST-format ``.npz`` with train/val/test splits, label names and lesion masks."""
    from lepton.utils import atomic_write_bytes

    images, labels, masks = make_synthetic(n, size, seed=seed)
    n_train = int(fractions[0] * n)
    n_val = int(fractions[1] * n)
    cuts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val),
            "test": slice(n_train + n_val, n)}
    arrays = {"label_names": np.array(LABEL_NAMES)}
    for split, sl in cuts.items():
        arrays[f"{split}_images"] = images[sl]
        arrays[f"{split}_labels"] = labels[sl, None]
        arrays[f"{split}_masks"] = masks[sl]
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
