"""Read one image file of any supported format into float32 frames in [0, 1].

The format is sniffed from the file's first bytes, never trusted from its extension.
"""

from __future__ import annotations

import hashlib
import io
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
        return sniff_bytes(fh.read(352), path.name)


def sniff_bytes(head: bytes, name: str = "") -> str | None:
    """The format of content starting with ``head`` (``name`` only breaks ties: .nii.gz, bare .dcm)."""
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
    name = name.lower()
    if head[:2] == b"\x1f\x8b" and name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith(".dcm") and len(head) > 8:
        return "dicom"  # DICOM without the 128-byte preamble; pydicom validates it
    return None


def read_image_bytes(data: bytes, name: str = "upload", *, window: str | None = None,
                     slices: str = "middle") -> list[Frame]:
    """Decode an in-memory file like ``read_image``; rasters and NPY never touch the disk.

    Errors name ``name`` (never a temporary path).
    """
    import tempfile

    if not data:
        raise DataError(f"{name}: the file is empty")
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"{name}: {len(data)} bytes is over the {MAX_FILE_BYTES} byte limit")
    fmt = sniff_bytes(data[:352], name)
    if fmt is None:
        raise DataError(f"{name}: unsupported or unrecognised file content; supported formats are {', '.join(FORMATS)}")
    if fmt in RASTER_FORMATS:
        return [Frame(_read_raster(io.BytesIO(data), name), name, fmt)]
    if fmt == "npy":
        return _read_npy(io.BytesIO(data), name, slices)
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix[:10]
    with tempfile.TemporaryDirectory() as tmp:  # the DICOM and NIfTI readers work from files
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            frames = read_image(path, window=window, slices=slices)
        except DataError as exc:
            raise DataError(str(exc).replace(str(path), name)) from None
    return [Frame(f.pixels, f.name.replace("upload", name, 1), f.modality, f.patient) for f in frames]


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
        return _read_npy(path, str(path), slices)
    return [Frame(_read_raster(path, str(path)), path.name, fmt)]


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


def _read_raster(path, label: str) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise DataError(f"{label}: {img.width}x{img.height} pixels is over the limit")
            img.load()
            mode = img.mode
            if mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            elif mode in ("LA", "1"):
                img = img.convert("L")
            arr = np.asarray(img)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{label}: refused as a decompression bomb ({exc})") from exc
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types for truncated or corrupt files
        raise DataError(f"{label}: corrupt or truncated image ({exc})") from exc
    if arr.size == 0:
        raise DataError(f"{label}: the image has no pixels")
    if arr.ndim == 2:
        return to_unit_range(arr)[None]
    return to_unit_range(arr[..., :3]).transpose(2, 0, 1).copy()


def _read_npy(path, label: str, slices: str) -> list[Frame]:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{label}: not a readable .npy array ({exc}); object arrays are refused") from exc
    if arr.size == 0 or arr.size > MAX_PIXELS * 3:
        raise DataError(f"{label}: array of shape {arr.shape} is empty or too large")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"{label}: dtype {arr.dtype} is not numeric")
    if arr.ndim == 2:
        return [Frame(_npy_unit(label, arr)[None], Path(label).name, "npy")]
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        return [Frame(_npy_unit(label, arr), Path(label).name, "npy")]
    if arr.ndim == 3 and arr.shape[-1] in (1, 3):
        return [Frame(_npy_unit(label, arr).transpose(2, 0, 1).copy(), Path(label).name, "npy")]
    if arr.ndim == 3:  # a stack of 2-D slices along the first axis
        unit = _npy_unit(label, arr)
        idx = range(len(unit)) if slices == "all" else [len(unit) // 2]
        return [Frame(unit[i][None].copy(), f"{Path(label).name}#slice={i}", "npy") for i in idx]
    raise DataError(
        f"{path}: array of shape {arr.shape} is not an image; expected (H, W), (C, H, W), "
        "(H, W, C) with C in 1 or 3, or (D, H, W) slices"
    )


def _npy_unit(label: str, arr: np.ndarray) -> np.ndarray:
    try:
        return to_unit_range(arr)
    except DataError as exc:
        raise DataError(f"{label}: {exc}") from exc
