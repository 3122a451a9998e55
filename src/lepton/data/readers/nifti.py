"""NIfTI reading with nibabel: 2-D images and axial slices of 3-D (or the first 4-D) volumes.

NIfTI-1 and NIfTI-2, plain or gzip-compressed, are recognised by content: an upload without a file name reads
as one with a ``.nii.gz`` name does.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lepton.data.base import MAX_FILE_BYTES, MAX_PIXELS, Frame, apply_window, resolve_window
from lepton.data.readers.registry import MAGIC, NAME, NO, register_reader
from lepton.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
#: The most a sniff inflates from gzip content: a NIfTI-2 header (NIfTI-1's is 348 bytes).
HEADER_BYTES = 540
#: Names nibabel itself reads (it picks the format and the compression by the name); others are read by content.
NAMED = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")


def _sizeof_hdr(head: bytes) -> int:
    """The header's first field, sizeof_hdr (348 for NIfTI-1, 540 for NIfTI-2), in either byte order."""
    little, big = int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")
    return little if little in (348, 540) else big


def is_header(head: bytes) -> bool:
    """Whether ``head`` starts a NIfTI-1 (sizeof_hdr 348, magic ``n+1``/``ni1`` at 344) or NIfTI-2 header (540,
    ``n+2`` at 4)."""
    size = _sizeof_hdr(head)
    return (size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00")) or (size == 540 and head[4:8] == b"n+2\x00")


def gunzip_head(head: bytes, size: int = HEADER_BYTES) -> bytes:
    """At most ``size`` bytes inflated from the start of gzip content ``head`` (fewer when ``head`` is short, b""
    when it is not gzip): a sniff never inflates more, whatever the whole would expand to."""
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, size)  # 16+: a gzip wrapper
    except zlib.error:
        return b""


def _sniff(head: bytes, name: str) -> int:
    if is_header(head):
        return MAGIC
    if head[:2] != GZIP_MAGIC:
        return NO
    if is_header(gunzip_head(head)):
        return MAGIC
    return NAME if name.endswith(".nii.gz") else NO  # a damaged .nii.gz: nibabel says what is wrong


@contextmanager
def _opened(path: Path, label: str) -> Iterator:
    """The NIfTI image at ``path``, its data still on disk: by nibabel's name rules when the name has a NIfTI
    suffix, else by content (plain or gzip, NIfTI-1 or -2). Data that would expand past ``MAX_FILE_BYTES`` (a
    .nii.gz bomb; a .nii file cannot be larger) are refused from the header, before anything is inflated."""
    import nibabel as nib
    from nibabel.fileholders import FileHolder

    if path.name.lower().endswith(NAMED):
        img, fh = nib.load(str(path)), None
    else:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == GZIP_MAGIC
        fh = gzip.open(path, "rb") if compressed else open(path, "rb")  # noqa: SIM115 - closed below
        try:
            klass = nib.Nifti2Image if _sizeof_hdr(fh.read(4)) == 540 else nib.Nifti1Image
            fh.seek(0)
            holder = FileHolder(fileobj=fh)
            img = klass.from_file_map({"header": holder, "image": holder})
        except BaseException:
            fh.close()
            raise
    try:
        header = img.header
        if hasattr(header, "get_data_offset"):
            expanded = int(header.get_data_offset()) + int(np.prod(img.shape, dtype=np.float64)) \
                * np.dtype(header.get_data_dtype()).itemsize
            if expanded > MAX_FILE_BYTES:
                raise DataError(f"{label}: the NIfTI data expand to {expanded} bytes, over the {MAX_FILE_BYTES} byte "
                                "limit")
        yield img
    finally:
        if fh is not None:
            fh.close()


@register_reader("nifti", _sniff, priority=40)
def read_nifti(path: Path, label: str | None = None, *, window: str | None = None,
               slices: str = "middle", max_pixels: int = MAX_PIXELS) -> list[Frame]:
    """Read a NIfTI-1/2 file; volumes are reoriented to RAS and cut into axial slices, or kept whole as one
    (1, D, H, W) frame with ``slices="volume"``.

    Intensities are windowed (``window``, e.g. ``lung`` for CT in HU) or scaled by the volume's
    0.5–99.5th percentiles, so every slice of one volume shares one scale.
    """
    label = label or str(path)
    path = Path(path)
    try:
        with _opened(path, label) as img:
            shape = img.shape
            if len(shape) < 3:
                if len(shape) != 2:
                    raise DataError(f"{label}: {len(shape)}-D NIfTI of shape {shape} is not supported")
                if slices == "volume":
                    raise DataError(f"{label}: a 2-D NIfTI image is not a volume")
                if int(np.prod(shape, dtype=np.float64)) > max_pixels:
                    raise DataError(f"{label}: image of shape {shape} is over the limit of {max_pixels} pixels")
                data = np.asarray(img.dataobj, dtype=np.float32)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{label}: corrupt or unreadable NIfTI file ({exc})") from exc
    if len(shape) >= 3:  # volumes (and the first of 4-D series) go through the volume reader
        from lepton.data.readers.volume import volume_frames

        return volume_frames(read_nifti_volume(path, max_voxels=max_pixels, label=label), window, slices)
    if data.size == 0 or not np.isfinite(data).all():
        raise DataError(f"{label}: the NIfTI image is empty or contains NaN or infinite values")
    preset = resolve_window(window)
    if preset is not None:
        unit = apply_window(data, *preset)
    else:
        lo, hi = np.percentile(data, [0.5, 99.5])
        unit = np.clip((data - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(data)
    # Transpose and flip so rows run anterior→posterior (radiological view), as volume slices are shown.
    return [Frame(np.ascontiguousarray(np.flipud(unit.T), dtype=np.float32)[None], Path(label).name, "nifti")]


def read_nifti_volume(path: str | Path, *, volume_index: int = 0, max_voxels: int | None = None,
                      label: str | None = None):
    """A NIfTI-1/2 file as a ``Volume`` (RAS orientation, the file's affine and units); ``volume_index`` picks the
    volume of a 4-D file. Values stay as stored (after scl_slope/inter), e.g. Hounsfield units for CT."""
    from lepton.data.readers.volume import MAX_VOXELS, Volume, canonical, check_voxels

    path = Path(path)
    label = label or str(path)
    try:
        with _opened(path, label) as img:
            shape, affine = img.shape, img.affine
            if len(shape) not in (3, 4):
                raise DataError(f"{label}: a {len(shape)}-D NIfTI of shape {shape} is not a volume")
            check_voxels(shape[:3], label, max_voxels or MAX_VOXELS)
            if len(shape) == 4 and not 0 <= volume_index < shape[3]:
                raise DataError(f"{label}: volume index {volume_index} is out of range 0..{shape[3] - 1}")
            data = np.asarray(img.dataobj[..., volume_index] if len(shape) == 4 else img.dataobj, dtype=np.float32)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{label}: corrupt or unreadable NIfTI file ({exc})") from exc
    if data.size == 0 or not np.isfinite(data).all():
        raise DataError(f"{label}: the volume is empty or holds NaN or infinite values")
    data, affine = canonical(data, affine)
    # NIfTI records no modality: the volume is marked as coming from a NIfTI file.
    return Volume(np.ascontiguousarray(data, dtype=np.float32), affine, Path(label).name, "nifti",
                  meta={"source_shape": list(shape), "volume_index": volume_index})
