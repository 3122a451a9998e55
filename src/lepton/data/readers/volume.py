"""A volume: voxels with their geometry, in one orientation (closest to RAS) whatever the source.

CT and MRI arrive as DICOM series or NIfTI files; both become a ``Volume`` whose ``data`` is indexed (x, y, z)
along the patient's Right, Anterior and Superior axes (nibabel's canonical orientation), with the affine from
voxel indices to RAS millimetres, the voxel spacing and, for CT, values in Hounsfield units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lepton.errors import DataError

#: Largest volume accepted, in voxels: 1024 x 1024 x 1024.
MAX_VOXELS = 1024**3


@dataclass
class Volume:
    """``data`` float32 (X, Y, Z) in RAS orientation; ``affine`` maps (i, j, k, 1) to RAS mm."""

    data: np.ndarray
    affine: np.ndarray
    name: str
    modality: str
    patient: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array's three axes."""
        return spacing_of(self.affine)  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.data.shape)  # type: ignore[return-value]

    def axis_codes(self) -> str:
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def to_nifti(self):
        """A nibabel image with this geometry (e.g. to save a volume, a saliency map or a mask beside it)."""
        import nibabel as nib

        img = nib.Nifti1Image(np.asarray(self.data, dtype=np.float32), self.affine)
        img.header.set_xyzt_units("mm")
        return img


def spacing_of(affine: np.ndarray | None) -> tuple[float, ...] | None:
    """Voxel size in mm along the array's axes: the lengths of an affine's first three columns (None without one)."""
    if affine is None:
        return None
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient an (i, j, k) array and its affine to the closest RAS orientation (flips and axis swaps only)."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(img.dataobj), img.affine


def check_voxels(shape: tuple[int, ...], label: str, limit: int = MAX_VOXELS) -> None:
    if int(np.prod(shape, dtype=np.float64)) > limit:
        raise DataError(f"{label}: a volume of {'x'.join(map(str, shape))} voxels is over the limit of {limit}")


def unit_scale(data: np.ndarray, window: str | None = None) -> np.ndarray:
    """Values to [0, 1]: a CT window (preset or ``C,W`` in HU), else the volume's 0.5-99.5th percentiles."""
    from lepton.data.base import apply_window, resolve_window

    preset = resolve_window(window)
    if preset is not None:
        return apply_window(data, *preset)
    lo, hi = np.percentile(data, [0.5, 99.5])
    return np.clip((data - lo) / (hi - lo), 0, 1).astype(np.float32) if hi > lo else np.zeros_like(data)


def network_order(data: np.ndarray) -> np.ndarray:
    """RAS (x, y, z) to the (D, H, W) order networks see: axial slices from inferior to superior, each shown as
    in the 2-D readers (rows anterior to posterior)."""
    return np.ascontiguousarray(np.flip(data.transpose(2, 1, 0), axis=1))


def network_affine(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The affine of ``network_order``'s (d, h, w) array: index (d, h, w) is RAS index (w, Y - 1 - h, d)."""
    perm = np.array([[0, 0, 1, 0], [0, -1, 0, shape[1] - 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    return affine @ perm


def volume_frames(volume: Volume, window: str | None, slices: str):
    """A volume as reader frames: one (1, D, H, W) frame (``slices="volume"``), or its middle or every axial slice
    (1, H, W)."""
    from lepton.data.base import Frame

    unit = network_order(unit_scale(volume.data, window))
    if slices == "volume":
        return [Frame(unit[None].astype(np.float32), volume.name, volume.modality, volume.patient,
                      network_affine(volume.affine, volume.shape))]
    idx = range(len(unit)) if slices == "all" else [len(unit) // 2]
    return [Frame(unit[k][None].copy(), f"{volume.name}#slice={k}" if len(unit) > 1 else volume.name,
                  volume.modality, volume.patient) for k in idx]
