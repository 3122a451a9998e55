"""The ground floor of the data layer: the decoded frame, size limits, intensity scaling, CT windows and
patient pseudonyms. Every reader imports from here; this module imports no reader."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from lepton.errors import DataError

#: Largest image accepted, in pixels per file (all frames together): 8192 x 8192.
MAX_PIXELS = 8192 * 8192
#: Largest file accepted, in bytes.
MAX_FILE_BYTES = 1 << 30

#: CT window presets as (center, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "soft-tissue": (50.0, 400.0),
}


@dataclass
class Frame:
    """One image: ``pixels`` is float32 (C, H, W) in [0, 1] — or a volume (C, D, H, W) when read whole."""

    pixels: np.ndarray
    name: str
    modality: str
    patient: str | None = None
    affine: np.ndarray | None = None  # volumes: voxel (d, h, w) of ``pixels`` -> RAS mm


def pseudonymize(patient_id: str) -> str:
    """A stable, non-reversible key for grouping by patient; the identifier itself is never kept."""
    digest = hashlib.sha256(b"lepton-patient:" + patient_id.strip().encode("utf-8")).hexdigest()
    return "p-" + digest[:16]


def to_unit_range(arr: np.ndarray) -> np.ndarray:
    """Scale an array to float32 [0, 1]: by dtype range for 8-bit, min–max otherwise."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError("image contains NaN or infinite values")
    lo, hi = float(out.min()), float(out.max())
    if lo >= 0.0 and hi <= 1.0 and np.issubdtype(arr.dtype, np.floating):
        return out
    if hi - lo < 1e-12:
        return np.zeros_like(out)
    return (out - lo) / (hi - lo)


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window to [0, 1]: ``center - width/2`` maps to 0 and ``center + width/2`` to 1."""
    if width <= 0:
        raise DataError(f"window width must be > 0 (got {width})")
    low = center - width / 2.0
    return np.clip((values.astype(np.float32) - low) / width, 0.0, 1.0)


#: The largest window centre (in magnitude) and width a ``CENTER,WIDTH`` window takes, in HU (CT spans ~-1024 to
#: ~3071; other modalities' values stay far below this).
MAX_WINDOW = 1e6


def resolve_window(window: str | None) -> tuple[float, float] | None:
    """Turn a preset name or ``"center,width"`` into numbers; None keeps the header's window."""
    if window is None or window == "header":
        return None
    if window in WINDOW_PRESETS:
        return WINDOW_PRESETS[window]
    try:
        center, width = (float(v) for v in window.split(","))
    except ValueError:
        raise DataError(
            f"unknown window {window!r}: use one of {', '.join(WINDOW_PRESETS)}, 'header', "
            "or 'CENTER,WIDTH' in HU"
        ) from None
    if not (abs(center) <= MAX_WINDOW and 0 < width <= MAX_WINDOW):  # NaN fails both
        raise DataError(f"window {window!r}: CENTER must be a finite number within ±{MAX_WINDOW:g} and WIDTH one above "
                        f"0 and at most {MAX_WINDOW:g} (HU)")
    return center, width
