"""DICOM reading: modality rescale to HU, windowing, MONOCHROME1, colour and multi-frame.

Patient identifiers are reduced to a pseudonym for patient-level splits and never logged or stored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lepton.data.base import (  # noqa: F401  (window names re-exported for callers of this module)
    MAX_PIXELS,
    WINDOW_PRESETS,
    Frame,
    apply_window,
    pseudonymize,
    resolve_window,
    to_unit_range,
)
from lepton.data.readers.registry import MAGIC, NAME, NO, register_reader
from lepton.errors import DataError


def _sniff(head: bytes, name: str) -> int:
    if head[128:132] == b"DICM":  # a DICOM preamble may itself look like a TIFF header: DICOM sniffs first
        return MAGIC
    return NAME if name.endswith(".dcm") and len(head) > 8 else NO  # no preamble: pydicom validates it


@register_reader("dicom", _sniff, priority=10)
def read_dicom(path: Path, label: str | None = None, *, window: str | None = None,
               slices: str = "middle", max_pixels: int = MAX_PIXELS) -> list[Frame]:
    """Read a DICOM file into frames in [0, 1] (see ``lepton.data.readers.io.read_image``)."""
    label = label or str(path)
    if slices == "volume":
        raise DataError(f"{label}: one DICOM file is not a volume; pass the series folder (or a zip of it)")
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_rescale

    preset = resolve_window(window)
    try:
        ds = pydicom.dcmread(path, force=path.name.lower().endswith(".dcm"))
    except InvalidDicomError as exc:
        raise DataError(f"{label}: not a valid DICOM file ({exc})") from exc
    except Exception as exc:
        raise DataError(f"{label}: corrupt DICOM file ({exc})") from exc
    if "PixelData" not in ds:
        kind = ds.get("Modality", "unknown")
        raise DataError(f"{label}: DICOM object has no pixel data (modality {kind}); not an image")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols * n_frames > max_pixels:
        raise DataError(f"{label}: {n_frames} frame(s) of {rows}x{cols} is over the limit of {max_pixels} pixels")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise DataError(
            f"{label}: cannot decode pixel data (transfer syntax {name}): {exc}. Compressed DICOM "
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
                raise DataError(f"{label}: {exc}") from exc
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
        unit = unit[:, None]
    idx = range(len(unit)) if slices == "all" else [len(unit) // 2]
    name = Path(label).name
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
