"""DICOM series as volumes: the files of one series, placed by their positions along the slice normal.

Slices are ordered by ImagePositionPatient projected on the normal of ImageOrientationPatient (never by file
name or InstanceNumber); the spacing comes from the positions; values pass the modality LUT (CT: Hounsfield
units); the result is reoriented to RAS. Series that cannot be placed — missing slices, gantry tilt, mixed
sizes, duplicate positions — are refused with a message naming the series; localizers and other differently
oriented images mixed into a series are left out with a warning. Compressed transfer syntaxes (JPEG, JPEG-LS,
JPEG 2000, RLE) decode through pydicom's pixel handlers with the pylibjpeg plugins.

Patient identifiers are reduced to a pseudonym; UIDs appear in messages only as a short hash.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from lepton.data.base import pseudonymize
from lepton.data.readers.volume import MAX_VOXELS, Volume, canonical, check_voxels
from lepton.errors import DataError

log = logging.getLogger("lepton.data")

#: A gap between neighbouring slices over this multiple of the median spacing means slices are missing.
GAP_FACTOR = 1.5
#: Spacing that varies by more than this share of the median is reported as uneven.
UNEVEN = 0.05
#: The largest angle (degrees) between the slice normal and the line through the slice positions.
MAX_TILT_DEGREES = 0.5


def uid_tag(uid: str) -> str:
    """A short, stable stand-in for a UID in messages and logs."""
    return "series-" + hashlib.sha256(uid.encode()).hexdigest()[:10] if uid else "series-without-uid"


def _headers(folder: Path) -> list[tuple[Path, Any]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM (a DICOMDIR is, and has no pixels: skipped below)
        if "Rows" in ds and "Columns" in ds:
            found.append((path, ds))
    return found


def group_series(folder: Path) -> dict[str, list[tuple[Path, Any]]]:
    """The image files under ``folder`` by SeriesInstanceUID (files without one form one group per folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder holding a DICOM series")
    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    for path, ds in _headers(folder):
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        groups[uid or f"folder:{path.parent}"].append((path, ds))
    if not groups:
        raise DataError(f"{folder}: no DICOM image files found")
    return dict(groups)


def read_series(folder: str | Path, series: str | None = None, *, max_voxels: int = MAX_VOXELS) -> list[Volume]:
    """Every series under ``folder`` as a volume, or only the one whose SeriesInstanceUID is ``series``."""
    groups = group_series(Path(folder))
    if series is not None:
        if series not in groups:
            raise DataError(f"{folder}: no series with that SeriesInstanceUID ({uid_tag(series)}); it holds "
                            f"{len(groups)} series")
        groups = {series: groups[series]}
    return [assemble(items, key, Path(folder), max_voxels=max_voxels) for key, items in sorted(groups.items())]


def _label(folder: Path, key: str) -> str:
    return f"{folder} ({uid_tag('' if key.startswith('folder:') else key)})"


def _geometry(items: list[tuple[Path, Any]], key: str, folder: Path) -> dict[str, Any]:
    """Place the slices of one series; raise DataError when they cannot be, collect warnings otherwise."""
    label = _label(folder, key)
    warnings: list[str] = []
    if key.startswith("folder:"):
        warnings.append(f"{label}: the files have no SeriesInstanceUID; grouped by folder")
    missing = [p.name for p, ds in items if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds]
    if missing:
        raise DataError(f"{label}: {len(missing)} file(s) lack ImagePositionPatient/ImageOrientationPatient (e.g. "
                        f"{missing[0]}); a volume cannot be built without slice positions")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in items):
        raise DataError(f"{label}: multi-frame images in a series are not supported; read the file on its own")
    orientations = [tuple(round(float(v), 4) for v in ds.ImageOrientationPatient) for _, ds in items]
    main = Counter(orientations).most_common(1)[0][0]
    kept = [(p, ds) for (p, ds), o in zip(items, orientations, strict=True) if o == main]
    if len(kept) < len(items):
        warnings.append(f"{label}: {len(items) - len(kept)} localizer or differently oriented image(s) left out")
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in kept}
    spacings = {tuple(round(float(v), 5) for v in ds.get("PixelSpacing", [1, 1])) for _, ds in kept}
    if len(sizes) > 1 or len(spacings) > 1:
        raise DataError(f"{label}: slices of different sizes {sorted(sizes)} or pixel spacings {sorted(spacings)}")
    row, col = np.array(main[:3], float), np.array(main[3:], float)
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DataError(f"{label}: ImageOrientationPatient {list(main)} is not two orthogonal unit vectors")
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in kept])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    kept = [kept[i] for i in order]
    steps = np.diff(along)
    if len(steps) and steps.min() < 1e-3:
        raise DataError(f"{label}: {int((steps < 1e-3).sum()) + 1} slices share a position; duplicate files or "
                        "two series without UIDs in one folder")
    spacing = float(np.median(steps)) if len(steps) else float(kept[0][1].get("SliceThickness", 1.0) or 1.0)
    gaps = np.flatnonzero(steps > GAP_FACTOR * spacing)
    if len(gaps):
        g = gaps[0]
        raise DataError(f"{label}: slices missing between {along[g]:.1f} and {along[g + 1]:.1f} mm along the normal "
                        f"({len(gaps)} gap(s) over {GAP_FACTOR}x the {spacing:.2f} mm spacing)")
    if len(steps) and np.abs(steps - spacing).max() > UNEVEN * spacing:
        warnings.append(f"{label}: uneven slice spacing {steps.min():.2f}-{steps.max():.2f} mm; "
                        f"the median {spacing:.2f} mm is used")
    tilt = 0.0
    if len(positions) > 1:
        line = positions[-1] - positions[0]
        tilt = float(np.degrees(np.arccos(np.clip(abs(line @ normal) / np.linalg.norm(line), 0, 1))))
        if tilt > MAX_TILT_DEGREES:
            raise DataError(f"{label}: gantry tilt of {tilt:.1f} degrees (slices are sheared); resample the series "
                            "to an orthogonal grid first")
    rows, cols = sizes.pop()
    dy, dx = (float(v) for v in kept[0][1].get("PixelSpacing", [1, 1]))
    affine = np.eye(4)  # voxel (i: column, j: row, k: slice) -> LPS mm, then LPS -> RAS
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = row * dx, col * dy, normal * spacing, positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return {"label": label, "files": kept, "affine": affine, "shape": (cols, rows, len(kept)), "spacing": spacing,
            "tilt_degrees": tilt, "warnings": warnings, "left_out": len(items) - len(kept)}


def assemble(items: list[tuple[Path, Any]], key: str, folder: Path, *, max_voxels: int = MAX_VOXELS) -> Volume:
    """One series' files as a RAS volume (values after the modality LUT: Hounsfield units for CT)."""
    import pydicom
    from pydicom.pixels import apply_rescale

    geo = _geometry(items, key, folder)
    label = geo["label"]
    check_voxels(geo["shape"], label, max_voxels)
    for message in geo["warnings"]:
        log.warning("%s", message)
    slices = []
    for path, _ in geo["files"]:
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as exc:
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) if "ds" in locals() else None
            raise DataError(f"{label}: cannot decode {path.name} (transfer syntax {getattr(syntax, 'name', syntax)}): "
                            f"{exc}. Compressed DICOM needs pylibjpeg with pylibjpeg-openjpeg/-libjpeg") from None
        if pixels.ndim != 2:
            raise DataError(f"{label}: {path.name} is not a single grey-level frame (shape {pixels.shape})")
        slices.append(apply_rescale(pixels, ds).astype(np.float32))
    data = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (i: column, j: row, k)
    if not np.isfinite(data).all():
        raise DataError(f"{label}: the series holds NaN or infinite values")
    data, affine = canonical(np.ascontiguousarray(data), geo["affine"])
    first = geo["files"][0][1]
    patient = str(first.get("PatientID", "") or "")
    return Volume(np.ascontiguousarray(data, dtype=np.float32), affine, label, str(first.get("Modality", "OT") or "OT"),
                  pseudonymize(patient) if patient else None,
                  {"series": uid_tag("" if key.startswith("folder:") else key), "slices": len(geo["files"]),
                   "slice_spacing": geo["spacing"], "left_out": geo["left_out"],
                   "tilt_degrees": geo["tilt_degrees"], "warnings": geo["warnings"]})


def inspect_series(folder: str | Path) -> list[dict[str, Any]]:
    """Per series under ``folder``: slice count, size, spacing, orientation, tilt and what is wrong with it."""
    import nibabel as nib

    out = []
    for key, items in sorted(group_series(Path(folder)).items()):
        row: dict[str, Any] = {"series": uid_tag("" if key.startswith("folder:") else key), "files": len(items)}
        try:
            geo = _geometry(items, key, Path(folder))
        except DataError as exc:
            row.update(ok=False, problems=[str(exc)])
        else:
            spacing = np.linalg.norm(geo["affine"][:3, :3], axis=0)
            row.update(ok=True, slices=len(geo["files"]), shape=list(geo["shape"]),
                       spacing_mm=[round(float(v), 4) for v in spacing],
                       orientation="".join(nib.aff2axcodes(geo["affine"])), tilt_degrees=round(geo["tilt_degrees"], 3),
                       left_out=geo["left_out"], problems=geo["warnings"])
        out.append(row)
    return out
