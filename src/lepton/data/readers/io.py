"""Read one image file of any registered format into float32 frames in [0, 1].

The format is sniffed from the file's first bytes, never trusted from its extension. Formats live in their
own modules and register with ``lepton.data.readers.registry``; importing this module registers the built-in ones.
"""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path

from lepton.data.base import MAX_FILE_BYTES, MAX_PIXELS, Frame, pseudonymize, to_unit_range
from lepton.data.readers import archive, dicom, nifti, npy, raster  # noqa: F401  (register the built-in readers)
from lepton.data.readers.registry import SNIFF_BYTES, Reader, match, readers
from lepton.errors import DataError

__all__ = ["MAX_FILE_BYTES", "MAX_PIXELS", "Frame", "formats", "pseudonymize", "read_image", "read_image_bytes",
           "sniff_bytes", "sniff_format", "to_unit_range"]


def formats() -> tuple[str, ...]:
    """The names of every registered format, in sniffing order."""
    return tuple(r.name for r in readers())


def sniff_format(path: Path) -> str | None:
    """Return the format of ``path`` from its content (one of ``formats()``), or None if unknown."""
    with open(path, "rb") as fh:
        return sniff_bytes(fh.read(SNIFF_BYTES), Path(path).name)


def sniff_bytes(head: bytes, name: str = "") -> str | None:
    """The format of content starting with ``head`` (``name`` only breaks ties: .nii.gz, bare .dcm)."""
    reader = match(head, name)
    return reader.name if reader else None


def _reader_for(head: bytes, name: str, label: str) -> Reader:
    reader = match(head, name)
    if reader is None:
        raise DataError(f"{label}: unsupported or unrecognised file content; supported formats are "
                        f"{', '.join(formats())}")
    return reader


def read_image_bytes(data: bytes, name: str = "upload", *, window: str | None = None, slices: str = "middle",
                     max_pixels: int = MAX_PIXELS, steps: list[dict] | None = None) -> list[Frame]:
    """Decode an in-memory file like ``read_image``; rasters and NPY never touch the disk.

    Errors and frame names use ``name`` (never a temporary path or a stream object). ``max_pixels`` is checked
    against each format's header before pixels are decoded.
    """
    if not data:
        raise DataError(f"{name}: the file is empty")
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"{name}: {len(data)} bytes is over the {MAX_FILE_BYTES} byte limit")
    reader = _reader_for(data[:SNIFF_BYTES], name, name)
    if reader.in_memory:
        try:
            frames = reader.read(io.BytesIO(data), name, window=window, slices=slices, max_pixels=max_pixels)
        except DataError as exc:
            raise DataError(_scrub(str(exc), name)) from None
        return with_steps(frames, steps, name)
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix[:10]
    with tempfile.TemporaryDirectory() as tmp:  # this reader works from files
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            frames = reader.read(path, name, window=window, slices=slices, max_pixels=max_pixels)
        except DataError as exc:
            raise DataError(_scrub(str(exc).replace(str(path), name).replace(tmp, "."), name)) from None
    return with_steps(frames, steps, name)


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _scrub(message: str, name: str) -> str:
    """An upload's error names the upload: library messages may quote a stream object or a temporary path."""
    return _OBJECT_REPR.sub(name, message)


def with_steps(frames: list[Frame], steps: list[dict] | None, label: str) -> list[Frame]:
    """Frames with a run's volume preprocessing steps applied (``lepton.data.transforms.pipeline``); 2-D frames pass
    as is."""
    if not steps:
        return frames
    from lepton.data.transforms.pipeline import apply_steps

    for frame in frames:
        if frame.pixels.ndim == 4:
            frame.pixels, frame.affine, _ = apply_steps(frame.pixels, frame.affine, steps, label)
    return frames


def read_image(path: str | Path, *, window: str | None = None, slices: str = "middle",
               steps: list[dict] | None = None, series: str | None = None) -> list[Frame]:
    """Read ``path`` (any registered format: PNG, JPEG, BMP, TIFF, DICOM, NIfTI, NPY; or a folder holding one
    DICOM series) into a list of frames.

    Multi-frame DICOM, NIfTI volumes, DICOM series and 3-D NPY arrays give their middle slice, every slice
    with ``slices="all"``, or (not multi-frame DICOM) the whole volume as one (C, D, H, W) frame with
    ``slices="volume"``. ``window`` names a CT window preset (see ``WINDOW_PRESETS``); ``steps`` are a run's
    volume preprocessing steps (``lepton.data.transforms.pipeline``). For a folder of several DICOM series, ``series``
    picks one by SeriesInstanceUID, or ``"*"`` takes every series as its own frame.
    Raises DataError naming the file and the reason when it cannot be read.
    """
    path = Path(path)
    if path.is_dir():  # a folder of DICOM files: one series, as a volume or its slices
        from lepton.data.readers.series import read_series
        from lepton.data.readers.volume import volume_frames

        volumes = read_series(path, None if series in (None, "*") else series)
        if len(volumes) == 1 and series != "*":
            volumes[0].name = path.name
        elif series != "*":
            raise DataError(f"{path}: holds {len(volumes)} DICOM series; choose one by its SeriesInstanceUID "
                            "(a manifest's series_uid column), take each as its own case (series_uid *), or give "
                            "each series its own folder")
        else:
            for volume in volumes:
                volume.name = f"{path.name}#{volume.meta['series']}"
        return [f for volume in volumes for f in with_steps(volume_frames(volume, window, slices), steps, str(path))]
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: the file is empty")
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {size} bytes is over the {MAX_FILE_BYTES} byte limit")
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    frames = _reader_for(head, path.name, str(path)).read(path, str(path), window=window, slices=slices)
    return with_steps(frames, steps, str(path))
