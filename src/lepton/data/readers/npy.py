"""NumPy ``.npy`` arrays: (H, W), (C, H, W), (H, W, C) images or (D, H, W) slice stacks; pickles refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lepton.data.base import MAX_PIXELS, Frame, to_unit_range
from lepton.data.readers.registry import MAGIC, NO, register_reader
from lepton.errors import DataError


def _sniff(head: bytes, name: str) -> int:
    return MAGIC if head[:6] == b"\x93NUMPY" else NO


@register_reader("npy", _sniff, in_memory=True, priority=30)
def _check_header(source, label: str, max_pixels: int) -> None:
    """Read the .npy header and refuse, before any array is allocated, what cannot be an image: object or
    non-real dtypes, empty or oversized shapes, and files shorter than their header says."""
    from numpy.lib import format as npy_format

    fh = open(source, "rb") if isinstance(source, str | Path) else source  # noqa: SIM115 - closed below
    try:
        start = fh.tell()
        version = npy_format.read_magic(fh)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _fortran, dtype = read_header(fh)
        data_at = fh.tell()
        fh.seek(0, 2)
        available = fh.tell() - data_at
        fh.seek(start)
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        raise DataError(f"{label}: not a readable .npy array ({exc})") from None
    finally:
        if fh is not source:
            fh.close()
    if dtype.hasobject:
        raise DataError(f"{label}: object arrays are refused (they would need pickle); save numbers")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.bool_)):
        raise DataError(f"{label}: dtype {dtype} is not real numbers or booleans")
    count = int(np.prod(shape, dtype=np.float64))
    if count == 0 or count > max_pixels * 3:
        raise DataError(f"{label}: array of shape {shape} is empty or over the limit of {max_pixels * 3} values")
    if available < count * dtype.itemsize:
        raise DataError(f"{label}: the header promises shape {shape} ({count * dtype.itemsize} bytes) but the file "
                        f"holds {available}: truncated")


@register_reader("npy", _sniff, in_memory=True, priority=30)
def read_npy(source, label: str, *, window: str | None = None, slices: str = "middle",
             max_pixels: int = MAX_PIXELS) -> list[Frame]:
    """Read an array; 3-D stacks give their middle slice, or every slice with ``slices="all"``."""
    _check_header(source, label, max_pixels)
    try:
        arr = np.load(source, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{label}: not a readable .npy array ({exc}); object arrays are refused") from exc
    name = Path(label).name
    if slices == "volume":
        if arr.ndim == 3:
            return [Frame(_unit(label, arr)[None], name, "npy")]
        if arr.ndim == 4 and arr.shape[0] in (1, 3):
            return [Frame(_unit(label, arr), name, "npy")]
        raise DataError(f"{label}: array of shape {arr.shape} is not a volume; expected (D, H, W) or (C, D, H, W) "
                        "with C in 1 or 3")
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
