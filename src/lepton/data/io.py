"""Read one image file of any supported format into float32 frames in [0, 1].

The format is sniffed from the file's first bytes, never trusted from its extension.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lepton.errors import DataError

#: Largest image accepted, in pixels per file (all frames together): 8192 x 8192.
MAX_PIXELS = 8192 * 8192
#: Largest file accepted, in bytes.
MAX_FILE_BYTES = 1 << 30

RASTER_FORMATS = ("png", "jpeg", "bmp", "tiff")
FORMATS = (*RASTER_FORMATS, "dicom", "nifti", "npy")


@dataclass
class Frame:
    """One 2-D image: ``pixels`` is float32 (C, H, W) in [0, 1]."""

    pixels: np.ndarray
    name: str
    modality: str
    patient: str | None = None


def pseudonymize(patient_id: str) -> str:
    """A stable, non-reversible key for grouping by patient; the identifier itself is never kept."""
    digest = hashlib.sha256(b"lepton-patient:" + patient_id.strip().encode("utf-8")).hexdigest()
    return "p-" + digest[:16]


def sniff_format(path: Path) -> str | None:
    """Return the format of ``path`` from its content (one of FORMATS), or None if unknown."""
    with open(path, "rb") as fh:
        head = fh.read(352)
    if head[128:132] == b"DICM":  # first: a DICOM preamble may itself look like a TIFF header
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:2] == b"BM" and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00":
        return "nifti"
    name = path.name.lower()
    if head[:2] == b"\x1f\x8b" and name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith(".dcm") and len(head) > 8:
        return "dicom"  # DICOM without the 128-byte preamble; pydicom validates it
    return None


def read_image(path: str | Path, *, window: str | None = None, slices: str = "middle") -> list[Frame]:
    """Read ``path`` (PNG, JPEG, BMP, TIFF, DICOM, NIfTI or NPY) into a list of frames.

    Multi-frame DICOM, NIfTI volumes and 3-D NPY arrays give their middle slice, or every slice
    with ``slices="all"``. ``window`` names a CT window preset (see ``WINDOW_PRESETS``).
    Raises DataError naming the file and the reason when it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: the file is empty")
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {size} bytes is over the {MAX_FILE_BYTES} byte limit")
    fmt = sniff_format(path)
    if fmt is None:
        raise DataError(
            f"{path}: unsupported or unrecognised file content; "
            f"supported formats are {', '.join(FORMATS)}"
        )
    if fmt == "dicom":
        from lepton.data.dicom import read_dicom

        return read_dicom(path, window=window, slices=slices)
    if fmt == "nifti":
        from lepton.data.nifti import read_nifti

        return read_nifti(path, window=window, slices=slices)
    if fmt == "npy":
        return _read_npy(path, slices)
    return [Frame(_read_raster(path), path.name, fmt)]


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


def _read_raster(path: Path) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise DataError(f"{path}: {img.width}x{img.height} pixels is over the limit")
            img.load()
            mode = img.mode
            if mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            elif mode in ("LA", "1"):
                img = img.convert("L")
            arr = np.asarray(img)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused as a decompression bomb ({exc})") from exc
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types for truncated or corrupt files
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from exc
    if arr.size == 0:
        raise DataError(f"{path}: the image has no pixels")
    if arr.ndim == 2:
        return to_unit_range(arr)[None]
    return to_unit_range(arr[..., :3]).transpose(2, 0, 1).copy()


def _read_npy(path: Path, slices: str) -> list[Frame]:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc}); object arrays are refused") from exc
    if arr.size == 0 or arr.size > MAX_PIXELS * 3:
        raise DataError(f"{path}: array of shape {arr.shape} is empty or too large")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"{path}: dtype {arr.dtype} is not numeric")
    if arr.ndim == 2:
        return [Frame(_npy_unit(path, arr)[None], path.name, "npy")]
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        return [Frame(_npy_unit(path, arr), path.name, "npy")]
    if arr.ndim == 3 and arr.shape[-1] in (1, 3):
        return [Frame(_npy_unit(path, arr).transpose(2, 0, 1).copy(), path.name, "npy")]
    if arr.ndim == 3:  # a stack of 2-D slices along the first axis
        unit = _npy_unit(path, arr)
        idx = range(len(unit)) if slices == "all" else [len(unit) // 2]
        return [Frame(unit[i][None].copy(), f"{path.name}#slice={i}", "npy") for i in idx]
    raise DataError(
        f"{path}: array of shape {arr.shape} is not an image; expected (H, W), (C, H, W), "
        "(H, W, C) with C in 1 or 3, or (D, H, W) slices"
    )


def _npy_unit(path: Path, arr: np.ndarray) -> np.ndarray:
    try:
        return to_unit_range(arr)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc
