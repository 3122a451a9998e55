"""DICOM reading: modality rescale to HU, windowing, MONOCHROME1, colour and multi-frame.

Patient identifiers are reduced to a pseudonym for patient-level splits and never logged or stored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lepton.data.io import MAX_PIXELS, Frame, pseudonymize, to_unit_range
from lepton.errors import DataError

#: CT window presets as (center, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "soft-tissue": (50.0, 400.0),
}


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window to [0, 1]: ``center - width/2`` maps to 0 and ``center + width/2`` to 1."""
    if width <= 0:
        raise DataError(f"window width must be > 0 (got {width})")
    low = center - width / 2.0
    return np.clip((values.astype(np.float32) - low) / width, 0.0, 1.0)


def resolve_window(window: str | None) -> tuple[float, float] | None:
    """Turn a preset name or ``"center,width"`` into numbers; None keeps the header's window."""
    if window is None or window == "header":
        return None
    if window in WINDOW_PRESETS:
        return WINDOW_PRESETS[window]
    try:
        center, width = (float(v) for v in window.split(","))
    except ValueError:
        raise DataError(
            f"unknown window {window!r}: use one of {', '.join(WINDOW_PRESETS)}, 'header', "
            "or 'CENTER,WIDTH' in HU"
        ) from None
    return center, width


def read_dicom(path: Path, *, window: str | None = None, slices: str = "middle") -> list[Frame]:
    """Read a DICOM file into frames in [0, 1] (see ``lepton.data.io.read_image``)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_rescale

    preset = resolve_window(window)
    try:
        ds = pydicom.dcmread(path, force=path.name.lower().endswith(".dcm"))
    except InvalidDicomError as exc:
        raise DataError(f"{path}: not a valid DICOM file ({exc})") from exc
    except Exception as exc:
        raise DataError(f"{path}: corrupt DICOM file ({exc})") from exc
    if "PixelData" not in ds:
        kind = ds.get("Modality", "unknown")
        raise DataError(f"{path}: DICOM object has no pixel data (modality {kind}); not an image")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols * n_frames > MAX_PIXELS:
        raise DataError(f"{path}: {n_frames} frame(s) of {rows}x{cols} is over the pixel limit")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise DataError(
            f"{path}: cannot decode pixel data (transfer syntax {name}): {exc}. Compressed DICOM "
            "needs a decoder plugin such as pylibjpeg with pylibjpeg-openjpeg or pylibjpeg-libjpeg"
        ) from exc

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = arr if n_frames > 1 else arr[None]
    modality = str(ds.get("Modality", "OT") or "OT")
    patient = str(ds.get("PatientID", "") or "")
    patient_key = pseudonymize(patient) if patient else None

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frames, ds)
        bits = 16 if rgb.dtype == np.uint16 else 8
        unit = rgb.astype(np.float32) / float(2**bits - 1)
        unit = unit.transpose(0, 3, 1, 2)
    elif samples == 3:
        bits = int(ds.get("BitsStored", 8) or 8)
        unit = (frames.astype(np.float32) / float(2**bits - 1)).clip(0, 1).transpose(0, 3, 1, 2)
    else:
        values = apply_rescale(frames, ds).astype(np.float32)
        center_width = preset or _header_window(ds)
        if center_width is not None:
            unit = apply_window(values, *center_width)
        else:
            try:
                unit = to_unit_range(values)
            except DataError as exc:
                raise DataError(f"{path}: {exc}") from exc
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
        unit = unit[:, None]
    idx = range(len(unit)) if slices == "all" else [len(unit) // 2]
    name = path.name
    return [
        Frame(
            np.ascontiguousarray(unit[i], dtype=np.float32),
            f"{name}#frame={i}" if len(unit) > 1 else name,
            modality,
            patient_key,
        )
        for i in idx
    ]


def _header_window(ds) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        width = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (center, width) if width > 0 else None
