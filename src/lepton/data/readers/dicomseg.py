"""DICOM Segmentation objects (SEG) with highdicom: label maps written against their source series, and read back.

A SEG written here references every source image of the series (by SOP instance), carries one segment per
foreground class, and places each frame through the source slice's own position, so OHIF and 3D Slicer show it
over the scan. Label maps on the Lepton side are in network order (D, H, W) with their affine to RAS mm.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from lepton.errors import DataError
from lepton.utils import atomic_write_bytes

# highdicom logs at INFO which source instance (by UID) it copies patient and study attributes from: kept quiet, as
# pacs/node.py does, so no SEG written here puts a UID in a log (with --debug too; its warnings and errors still show).
logging.getLogger("highdicom").setLevel(logging.WARNING)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_seg(path: str | Path, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM SEG file as a (1, D, H, W) uint8 label map in network order (segment number = class index) and its
    affine (voxel -> RAS mm)."""
    import highdicom as hd

    from lepton.data.readers.volume import canonical, network_affine, network_order

    label = label or str(path)
    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:
        raise DataError(f"{label}: not a readable DICOM SEG ({type(exc).__name__}: {exc})") from None
    try:
        volume = seg.get_volume(combine_segments=True, relabel=False, dtype=np.uint8)
    except Exception as exc:
        raise DataError(f"{label}: the SEG frames do not form a volume ({exc})") from None
    # highdicom's array is (slice, row, column) with an affine to LPS; as (column, row, slice) it is ijk-ordered
    data = np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0))
    ijk = volume.affine[:, [2, 1, 0, 3]]
    data, affine = canonical(data, LPS_TO_RAS @ ijk)
    return network_order(np.asarray(data, dtype=np.uint8))[None], network_affine(affine, data.shape)


def write_seg(labels: np.ndarray, affine: np.ndarray, series: str | Path, label_names: list[str], output: str | Path,
              *, algorithm: str = "lepton", version: str = "1") -> Path:
    """Write a (D, H, W) label map (network order, ``affine`` to RAS mm, on the series' own grid) as a DICOM SEG
    that references the source series in folder ``series``; one segment per foreground class present."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from lepton.data.readers.series import group_series

    groups = group_series(Path(series))
    if len(groups) != 1:
        raise DataError(f"{series}: a SEG references one series; this folder holds {len(groups)}")
    (items,) = groups.values()
    sources = [pydicom.dcmread(p) for p, _ in items]
    for ds in sources:  # type-2 attributes the SEG copies; de-identified files may lack them (kept empty)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate",
                        "StudyTime", "ReferringPhysicianName", "AccessionNumber"):
            if keyword not in ds:
                setattr(ds, keyword, "")
    if any(not str(ds.get("SOPInstanceUID", "") or "") or not str(ds.get("FrameOfReferenceUID", "") or "")
           for ds in sources):
        raise DataError(f"{series}: source images without SOPInstanceUID or FrameOfReferenceUID (blanked by some "
                        "de-identification tools) cannot be referenced by a DICOM SEG; write NIfTI instead")
    inverse = np.linalg.inv(affine)
    frames = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), np.uint8)
    for n, ds in enumerate(sources):
        rows, cols = int(ds.Rows), int(ds.Columns)
        dy, dx = (float(v) for v in ds.PixelSpacing)
        orient = np.array([float(v) for v in ds.ImageOrientationPatient])
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        lps = (np.array([float(v) for v in ds.ImagePositionPatient])[:, None, None]
               + orient[:3, None, None] * (c * dx) + orient[3:, None, None] * (r * dy))
        ras = np.stack([-lps[0], -lps[1], lps[2], np.ones_like(lps[0])])
        idx = np.rint(np.tensordot(inverse, ras, axes=1)[:3]).astype(int)
        inside = np.all((idx >= 0) & (idx < np.array(labels.shape)[:, None, None]), axis=0)
        frames[n][inside] = labels[idx[0][inside], idx[1][inside], idx[2][inside]]
    # An empty label map is written too: "nothing found" is a result a viewer should show. One segment per
    # foreground class, numbered as the classes, so a SEG read back gives the same label map.
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, version=version,
                                              family=codes.cid7162.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(segment_number=k, segment_label=label_names[k][:64],
                                              segmented_property_category=codes.cid7150.Tissue,
                                              segmented_property_type=codes.cid7166.ConnectiveTissue,
                                              algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                              algorithm_identification=algo)
                    for k in range(1, len(label_names))]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Lepton", manufacturer_model_name=algorithm,
        software_versions=version, device_serial_number="0", omit_empty_frames=False)
    buf = io.BytesIO()
    seg.save_as(buf)
    out = Path(output)
    atomic_write_bytes(out, buf.getvalue())
    return out
