"""NumPy ``.npy`` arrays: (H, W), (C, H, W), (H, W, C) images or (D, H, W) slice stacks; pickles refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lepton.data.base import MAX_PIXELS, Frame, to_unit_range
from lepton.data.readers import MAGIC, NO, register_reader
from lepton.errors import DataError


def _sniff(head: bytes, name: str) -> int:
    return MAGIC if head[:6] == b"\x93NUMPY" else NO


@register_reader("npy", _sniff, in_memory=True, priority=30)
def read_npy(source, label: str, *, window: str | None = None, slices: str = "middle") -> list[Frame]:
    """Read an array; 3-D stacks give their middle slice, or every slice with ``slices="all"``."""
    try:
        arr = np.load(source, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{label}: not a readable .npy array ({exc}); object arrays are refused") from exc
    if arr.size == 0 or arr.size > MAX_PIXELS * 3:
        raise DataError(f"{label}: array of shape {arr.shape} is empty or too large")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"{label}: dtype {arr.dtype} is not numeric")
    name = Path(label).name
    if arr.ndim == 2:
        return [Frame(_unit(label, arr)[None], name, "npy")]
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        return [Frame(_unit(label, arr), name, "npy")]
    if arr.ndim == 3 and arr.shape[-1] in (1, 3):
        return [Frame(_unit(label, arr).transpose(2, 0, 1).copy(), name, "npy")]
    if arr.ndim == 3:  # a stack of 2-D slices along the first axis
        unit = _unit(label, arr)
        idx = range(len(unit)) if slices == "all" else [len(unit) // 2]
        return [Frame(unit[i][None].copy(), f"{name}#slice={i}", "npy") for i in idx]
    raise DataError(
        f"{label}: array of shape {arr.shape} is not an image; expected (H, W), (C, H, W), "
        "(H, W, C) with C in 1 or 3, or (D, H, W) slices"
    )


def _unit(label: str, arr: np.ndarray) -> np.ndarray:
    try:
        return to_unit_range(arr)
    except DataError as exc:
        raise DataError(f"{label}: {exc}") from exc
