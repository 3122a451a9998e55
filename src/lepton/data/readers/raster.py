"""PNG, JPEG, BMP and TIFF images, decoded with Pillow (in memory for uploads)."""

from __future__ import annotations

import os

import numpy as np

from lepton.data.base import MAX_PIXELS, Frame, to_unit_range
from lepton.data.readers.registry import MAGIC, NO, register_reader
from lepton.errors import DataError


def decode_raster(source, label: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a raster image (path or stream) to float32 (C, H, W) in [0, 1]; errors name ``label``. The size in
    the header is checked against ``max_pixels`` before any pixel is decoded."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(source) as img:
            if img.width * img.height > max_pixels:
                raise DataError(f"{label}: {img.width}x{img.height} pixels is over the limit of {max_pixels}")
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


def _reader(fmt: str):
    def read(source, label: str, *, window: str | None = None, slices: str = "middle",
             max_pixels: int = MAX_PIXELS) -> list[Frame]:
        if slices == "volume":
            raise DataError(f"{label}: a {fmt.upper()} image is not a volume; this model takes volumes (NIfTI, a "
                            "DICOM series, or .npy)")
        return [Frame(decode_raster(source, label, max_pixels), os.path.basename(label), fmt)]

    return read


def _magic(*prefixes: bytes, min_len: int = 0):
    return lambda head, name: MAGIC if head.startswith(prefixes) and len(head) >= min_len else NO


register_reader("png", _magic(b"\x89PNG\r\n\x1a\n"), in_memory=True, priority=20)(_reader("png"))
register_reader("jpeg", _magic(b"\xff\xd8\xff"), in_memory=True, priority=21)(_reader("jpeg"))
register_reader("bmp", _magic(b"BM", min_len=26), in_memory=True, priority=22)(_reader("bmp"))
register_reader("tiff", _magic(b"II*\x00", b"MM\x00*"), in_memory=True, priority=23)(_reader("tiff"))
