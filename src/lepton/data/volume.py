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
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

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


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient an (i, j, k) array and its affine to the closest RAS orientation (flips and axis swaps only)."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(img.dataobj), img.affine


def check_voxels(shape: tuple[int, ...], label: str, limit: int = MAX_VOXELS) -> None:
    if int(np.prod(shape, dtype=np.float64)) > limit:
        raise DataError(f"{label}: a volume of {'x'.join(map(str, shape))} voxels is over the limit of {limit}")
