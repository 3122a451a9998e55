"""NIfTI reading with nibabel: 2-D images and axial slices of 3-D (or the first 4-D) volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lepton.data.base import MAX_PIXELS, Frame, apply_window, resolve_window
from lepton.data.readers import MAGIC, NAME, NO, register_reader
from lepton.errors import DataError


def _sniff(head: bytes, name: str) -> int:
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00":
        return MAGIC
    return NAME if head[:2] == b"\x1f\x8b" and name.endswith(".nii.gz") else NO


@register_reader("nifti", _sniff, priority=40)
def read_nifti(path: Path, label: str | None = None, *, window: str | None = None,
               slices: str = "middle", max_pixels: int = MAX_PIXELS) -> list[Frame]:
    """Read a NIfTI-1/2 file; volumes are reoriented to RAS and cut into axial slices, or kept whole as one
    (1, D, H, W) frame with ``slices="volume"``.

    Intensities are windowed (``window``, e.g. ``lung`` for CT in HU) or scaled by the volume's
    0.5–99.5th percentiles, so every slice of one volume shares one scale.
    """
    label = label or str(path)
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise DataError(f"{label}: corrupt or unreadable NIfTI file ({exc})") from exc
    if len(img.shape) >= 3:  # volumes (and the first of 4-D series) go through the volume reader
        from lepton.data.volume import volume_frames

        return volume_frames(read_nifti_volume(path, max_voxels=max_pixels, label=label), window, slices)
    if len(img.shape) != 2:
        raise DataError(f"{label}: {len(img.shape)}-D NIfTI of shape {img.shape} is not supported")
    if slices == "volume":
        raise DataError(f"{label}: a 2-D NIfTI image is not a volume")
    if int(np.prod(img.shape, dtype=np.float64)) > max_pixels:
        raise DataError(f"{label}: image of shape {img.shape} is over the limit of {max_pixels} pixels")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise DataError(f"{label}: corrupt or unreadable NIfTI file ({exc})") from exc
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
    import nibabel as nib

    from lepton.data.volume import MAX_VOXELS, Volume, canonical, check_voxels

    path = Path(path)
    label = label or str(path)
    try:
        img = nib.load(str(path))
        shape = img.shape
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
    data, affine = canonical(data, img.affine)
    # NIfTI records no modality: the volume is marked as coming from a NIfTI file.
    return Volume(np.ascontiguousarray(data, dtype=np.float32), affine, Path(label).name, "nifti",
                  meta={"source_shape": list(shape), "volume_index": volume_index})
