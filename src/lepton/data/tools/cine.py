"""Generated cine loops: a beating-chamber phantom whose contraction sets an ejection-fraction-like target, written as
real multi-frame ultrasound DICOM, with clinical covariates that carry part of the signal.

The chamber is a dark ellipse in a bright speckled wall; over each beat its radii shrink from end-diastole to
end-systole and back. The target is the fraction of the chamber's area·depth proxy (radius cubed) ejected:
``EF = 100 · (1 − (r_s / r_d)³)``. Age and sex shift the simulated EF (older: lower), so covariates add information the
noisy, low-resolution images give only in part — image-only, covariates-only and both can be compared on one split.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from lepton.utils import atomic_write_bytes

ULTRASOUND_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


def write_cine(path: str | Path, frames: np.ndarray, *, frame_time_ms: float | None = None,
               frame_time_vector: list[float] | None = None, cine_rate: float | None = None,
               region: tuple[int, int, int, int] | None = None, patient_id: str = "PHANTOM",
               modality: str = "US", number_of_frames: int | None = None,
               regions: list[tuple[int, int, int, int]] | None = None, overlay: np.ndarray | None = None,
               burned_in: str | None = None) -> Path:
    """Write grey frames (T, H, W) uint8 as one multi-frame DICOM file (explicit VR little endian), atomically, with
    the frame timing given (FrameTime in ms, FrameTimeVector in ms, or CineRate in frames per second; none: a file
    without timing) and an ultrasound scan region (x0, y0, x1, y1) — or several, ``regions`` — when given.
    ``overlay`` (H, W) bool is written as graphics overlay plane 6000, ``burned_in`` as BurnedInAnnotation (YES/NO).
    ``number_of_frames`` overrides the header's count (to write a deliberately broken file)."""
    import io

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    frames = np.ascontiguousarray(frames, np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ULTRASOUND_MULTIFRAME
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ULTRASOUND_MULTIFRAME, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = modality, patient_id, "Phantom^Cine"
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    ds.NumberOfFrames = int(frames.shape[0] if number_of_frames is None else number_of_frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frame_time_ms is not None:
        ds.FrameTime = f"{frame_time_ms:.6g}"
        ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    elif frame_time_vector is not None:
        ds.FrameTimeVector = [f"{v:.6g}" for v in frame_time_vector]
        ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTimeVector")
    elif cine_rate is not None:
        ds.CineRate = round(cine_rate)
    items = []
    for box in ([region] if region is not None else []) + list(regions or []):
        item = Dataset()
        item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = 1, 1, 0
        item.RegionLocationMinX0, item.RegionLocationMinY0 = int(box[0]), int(box[1])
        item.RegionLocationMaxX1, item.RegionLocationMaxY1 = int(box[2]), int(box[3])
        item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3  # cm
        item.PhysicalDeltaX = item.PhysicalDeltaY = 0.05
        items.append(item)
    if items:
        ds.SequenceOfUltrasoundRegions = items
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    if overlay is not None:
        plane = np.asarray(overlay, bool)
        ds.add_new(0x60000010, "US", plane.shape[0])  # OverlayRows
        ds.add_new(0x60000011, "US", plane.shape[1])  # OverlayColumns
        ds.add_new(0x60000040, "CS", "G")  # OverlayType: graphics
        ds.add_new(0x60000050, "SS", [1, 1])  # OverlayOrigin (row, column), 1-based
        ds.add_new(0x60000100, "US", 1)  # OverlayBitsAllocated
        ds.add_new(0x60000102, "US", 0)  # OverlayBitPosition
        ds.add_new(0x60003000, "OW", pack_bits(plane.ravel()))
    ds.PixelData = frames.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def beating_chamber(ef: float, *, period_s: float, fps: float = 30.0, seconds: float = 2.0, size: int = 64,
                    rng: np.random.Generator) -> np.ndarray:
    """Frames (T, size, size) uint8 of a chamber beating with ejection fraction ``ef`` (percent) and ``period_s``
    seconds a beat, with speckle noise, a random phase and position, and a burned-in label strip at the top."""
    n = round(seconds * fps)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = size * (0.55 + rng.uniform(-0.05, 0.05)), size * (0.5 + rng.uniform(-0.05, 0.05))
    rd = size * rng.uniform(0.24, 0.30)  # end-diastolic radius
    rs = rd * (1.0 - ef / 100.0) ** (1.0 / 3.0)  # end-systolic radius for that EF
    phase, aspect = rng.uniform(0, 2 * np.pi), rng.uniform(1.2, 1.5)
    wall = size * 0.07
    out = np.empty((n, size, size), np.uint8)
    for t in range(n):
        squeeze = 0.5 * (1 - np.cos(2 * np.pi * t / (fps * period_s) + phase))  # 0 diastole .. 1 systole
        r = rd - (rd - rs) * squeeze
        d = np.sqrt(((xx - cx) / r) ** 2 + ((yy - cy) / (r * aspect)) ** 2)
        img = np.where(d < 1.0, 12.0, np.where(d < 1.0 + wall / r, 170.0, 70.0))  # dark pool, bright wall, tissue
        img = img * rng.gamma(9.0, 1 / 9.0, size=(size, size))  # speckle
        img[: size // 10, : size // 2] = 255  # burned-in annotation outside the scan region
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_cine_set(root: str | Path, n: int = 60, *, size: int = 64, fps: float = 30.0, seconds: float = 2.0,
                   seed: int = 0) -> Path:
    """``n`` generated loops as multi-frame ultrasound DICOM under ``root/clips/`` and ``root/manifest.csv`` with
    ``path,label,patient_id,age,sex`` (``label``: the EF-like target in percent). Returns the manifest's path."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        age = int(rng.integers(25, 90))
        sex = "F" if rng.random() < 0.5 else "M"
        ef = float(np.clip(58 - 0.35 * (age - 55) + (3 if sex == "F" else -3) + rng.normal(0, 6), 15, 80))
        frames = beating_chamber(ef, period_s=float(rng.uniform(0.6, 1.0)), fps=fps, seconds=seconds, size=size,
                                 rng=rng)
        name = f"clips/cine_{i:04d}.dcm"
        write_cine(root / name, frames, frame_time_ms=1000.0 / fps, region=(0, size // 10, size - 1, size - 1),
                   patient_id=f"phantom-{i:04d}")
        rows.append({"path": name, "label": f"{ef:.2f}", "patient_id": f"phantom-{i:04d}", "age": str(age),
                     "sex": sex})
    buf = [",".join(rows[0])] + [",".join(r.values()) for r in rows]
    atomic_write_bytes(root / "manifest.csv", ("\n".join(buf) + "\n").encode())
    return root / "manifest.csv"


def read_manifest_rows(path: str | Path) -> list[dict[str, str]]:
    """A manifest's rows as dicts (for covariates at prediction time)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
