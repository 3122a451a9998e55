"""Sequences: multi-frame DICOM (ultrasound cine, XA, cine MR), video files, folders of frames and WFDB signal records
as clips with frame timing, and the sampling of a clip at a fixed frame rate and length.

A ``Clip`` holds frames (T, C, H, W) in [0, 1] — or, for a physiological signal, samples (T, C) in physical units —
with the time of each frame in seconds. Frame timing is read from the DICOM header (FrameTime, FrameTimeVector,
CineRate, RecommendedDisplayFrameRate, in that order); a header without any is read at an assumed rate and says so
(``Clip.timing``). ``sample_times``/``frame_indices`` choose which frames a network sees — at ``fps`` frames per second,
``length`` of them, from the clip's middle (``uniform``) or from a random start (``random``) — so only those frames
are decoded. Ultrasound frames are cropped to the scan region of ``SequenceOfUltrasoundRegions`` and what the header
locates as annotation is masked (``lepton.data.readers.annotations``); YBR and palette colour become RGB. Patient
identifiers are reduced to a pseudonym, never kept.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lepton.data.base import MAX_PIXELS, pseudonymize, to_unit_range
from lepton.errors import DataError

#: The most frames a clip may hold (a 60 s loop at 30 fps is 1,800).
MAX_FRAMES = 5_000
#: The rate assumed when a header carries no frame timing (then ``Clip.timing`` is ``"assumed"``).
ASSUMED_FPS = 30.0
#: Frame rates outside this range (frames per second) are refused as bad timing.
FPS_RANGE = (0.1, 10_000.0)
#: The most samples a signal record may hold (30 min of 12 leads at 1 kHz is 21.6 M values).
MAX_SIGNAL_VALUES = 50_000_000


@dataclass
class Clip:
    """Frames (T, C, H, W) in [0, 1] or signal samples (T, C), each with its time in seconds from the first."""

    frames: np.ndarray
    times: np.ndarray
    name: str
    modality: str
    timing: str  # where the times come from: "FrameTime", "FrameTimeVector", "CineRate", …, "fps", "assumed"
    patient: str | None = None
    region: tuple[int, int, int, int] | None = None  # the scan region cropped to: (x0, y0, x1, y1), inclusive
    masked: tuple[str, ...] = ()  # what was masked as annotation (pixels outside the regions, overlay planes)

    @property
    def fps(self) -> float:
        """The mean frame rate."""
        return (len(self.times) - 1) / float(self.times[-1]) if len(self.times) > 1 and self.times[-1] > 0 \
            else ASSUMED_FPS

    @property
    def duration(self) -> float:
        """Seconds from the first frame to the end of the last (one mean frame interval after its start)."""
        return float(self.times[-1]) + 1.0 / self.fps if len(self.times) else 0.0


# -- timing -------------------------------------------------------------------------------------------------------
def frame_times(ds, n_frames: int, label: str) -> tuple[np.ndarray, str]:
    """The time of each frame in seconds, from a DICOM header, and which attribute gave it.

    FrameTime (ms between frames), FrameTimeVector (ms since the previous frame, the first 0), CineRate and
    RecommendedDisplayFrameRate (frames per second), in that order; none of them: ``ASSUMED_FPS``, marked
    ``"assumed"``. A zero, negative, non-finite or implausible value, or a vector of the wrong length, is a
    DataError naming the attribute.
    """
    def number(key: str) -> float | None:
        value = ds.get(key)
        if value is None or value == "":
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"{label}: {key} {value!r} is not a number; fix the header or drop the attribute") from None

    def check_fps(fps: float, key: str) -> float:
        if not (math.isfinite(fps) and FPS_RANGE[0] <= fps <= FPS_RANGE[1]):
            raise DataError(f"{label}: {key} gives {fps:g} frames per second, outside {FPS_RANGE[0]:g}-"
                            f"{FPS_RANGE[1]:g}: bad frame timing in the header")
        return fps

    frame_time = number("FrameTime")
    if frame_time is not None:
        fps = check_fps(1000.0 / frame_time if frame_time else math.inf, "FrameTime")
        return np.arange(n_frames) / fps, "FrameTime"
    vector = ds.get("FrameTimeVector")
    if vector is not None and vector != "":
        try:
            values = [vector] if isinstance(vector, str | int | float) else list(vector)
            steps = np.asarray([float(v) for v in values], np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{label}: FrameTimeVector holds a value that is not a number") from None
        if len(steps) != n_frames:
            raise DataError(f"{label}: FrameTimeVector has {len(steps)} entries for {n_frames} frames: bad frame "
                            "timing in the header")
        if not np.isfinite(steps).all() or (steps[1:] <= 0).any() or steps[0] < 0:
            raise DataError(f"{label}: FrameTimeVector must hold finite intervals above 0 ms after the first frame")
        times = np.cumsum(steps) / 1000.0
        return times - times[0], "FrameTimeVector"
    for key in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = number(key)
        if rate is not None:
            return np.arange(n_frames) / check_fps(rate, key), key
    return np.arange(n_frames) / ASSUMED_FPS, "assumed"


def sample_times(duration: float, fps: float, length: int, mode: str = "uniform",
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """``length`` times ``1/fps`` apart within a clip of ``duration`` seconds: centred on the clip (``uniform``) or
    from a random start (``random``); a clip shorter than that is read as the loop it is (times wrap around)."""
    if length < 1 or not fps > 0:
        raise DataError(f"a clip needs length >= 1 frame and fps > 0 (got {length}, {fps})")
    if mode not in ("uniform", "random"):
        raise DataError(f"clip sampling {mode!r} is not one of uniform, random")
    span = length / fps
    room = max(0.0, duration - span)
    if mode == "random":
        start = float((rng or np.random.default_rng()).uniform(0.0, room)) if room > 0 else 0.0
    else:
        start = room / 2
    times = start + np.arange(length) / fps
    return np.mod(times, duration) if duration > 0 else np.zeros(length)


def frame_indices(times: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """For each wanted time, the frame shown then: the last frame that starts at or before it."""
    idx = np.searchsorted(times, wanted + 1e-9, side="right") - 1
    return np.clip(idx, 0, len(times) - 1)


def resample(clip: Clip, fps: float, length: int, mode: str = "uniform",
             rng: np.random.Generator | None = None) -> Clip:
    """The clip at ``fps`` frames per second, ``length`` frames long (see ``sample_times``): frames are the ones shown
    at each time; signal samples (T, C) are interpolated linearly between the recorded ones."""
    wanted = sample_times(clip.duration, fps, length, mode, rng)
    if clip.frames.ndim == 2:
        values = np.stack([np.interp(wanted, clip.times, clip.frames[:, c]) for c in range(clip.frames.shape[1])], 1)
    else:
        values = clip.frames[frame_indices(clip.times, wanted)]
    return Clip(np.asarray(values, clip.frames.dtype), wanted - wanted[0] if length > 1 else wanted * 0, clip.name,
                clip.modality, clip.timing, clip.patient, clip.region, clip.masked)


# -- DICOM --------------------------------------------------------------------------------------------------------
def read_dicom_sequence(path: str | Path, *, fps: float | None = None, length: int | None = None,
                        mode: str = "uniform", crop_region: bool = True, mask_annotations: bool = True,
                        max_frames: int = MAX_FRAMES, max_pixels: int = MAX_PIXELS,
                        rng: np.random.Generator | None = None) -> Clip:
    """A multi-frame DICOM file as a clip (a single-frame file is a clip of one frame).

    With ``fps`` and ``length`` the clip is sampled first (``sample_times``) and only the frames it needs are decoded;
    without them every frame is. ``crop_region`` crops ultrasound frames to their scan region (several 2-D regions: to
    the box around them); ``mask_annotations`` zeroes what the header locates as annotation inside the crop — pixels
    outside every region, graphics overlay planes (``lepton.data.readers.annotations``) — and overlay bits stored above
    BitsStored. Bounded: more than ``max_frames`` frames, or more than ``max_pixels`` decoded pixels, is a DataError.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_rescale, iter_pixels

    from lepton.data.readers.annotations import crop_box, keep_mask

    path = Path(path)
    label = str(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=path.suffix.lower() == ".dcm")
    except InvalidDicomError as exc:
        raise DataError(f"{label}: not a valid DICOM file ({exc})") from exc
    except Exception as exc:
        raise DataError(f"{label}: corrupt DICOM file ({exc})") from exc
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) if ds.get("NumberOfFrames", 1) != "" else 1)
    except (TypeError, ValueError):
        raise DataError(f"{label}: NumberOfFrames {ds.get('NumberOfFrames')!r} is not a whole number") from None
    if n_frames < 1 or rows < 1 or cols < 1:
        raise DataError(f"{label}: the file holds {n_frames} frame(s) of {rows}x{cols} pixels: nothing to read")
    if n_frames > max_frames:
        raise DataError(f"{label}: {n_frames} frames is over the limit of {max_frames}; raise max_frames if the clip "
                        "is meant to be that long")
    times, timing = frame_times(ds, n_frames, label)
    duration = float(times[-1]) + (float(times[-1]) / (n_frames - 1) if n_frames > 1 else 1.0 / ASSUMED_FPS)
    if fps is not None and length is not None:
        wanted = sample_times(duration, fps, length, mode, rng)
        chosen = frame_indices(times, wanted)
        out_times = wanted - wanted[0]
    else:
        chosen, out_times = np.arange(n_frames), times
    region, inside = crop_box(ds, rows, cols) if crop_region else (None, [])
    x0, y0, x1, y1 = region or (0, 0, cols - 1, rows - 1)
    keep, masked = keep_mask(ds, rows, cols, n_frames, (x0, y0, x1, y1), inside) if mask_annotations \
        else (None, [])
    bits, stored = int(ds.get("BitsAllocated", 8) or 8), int(ds.get("BitsStored", 0) or 0)
    high_bits = mask_annotations and 0 < stored < bits and int(ds.get("PixelRepresentation", 0) or 0) == 0
    unique = np.unique(chosen)
    if len(unique) * (x1 - x0 + 1) * (y1 - y0 + 1) > max_pixels:
        raise DataError(f"{label}: {len(unique)} frame(s) of {y1 - y0 + 1}x{x1 - x0 + 1} is over the limit of "
                        f"{max_pixels} pixels; sample fewer frames (fps, length)")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    decoded = {}
    try:
        for i, arr in zip(unique.tolist(), iter_pixels(path, indices=unique.tolist()), strict=True):
            if high_bits and np.issubdtype(arr.dtype, np.unsignedinteger):
                arr = arr & np.asarray((1 << stored) - 1, arr.dtype)  # retired overlays in the unused high bits
            if photometric == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
            elif samples == 1:
                arr = apply_rescale(arr, ds)
            decoded[i] = np.asarray(arr)[y0:y1 + 1, x0:x1 + 1]
    except DataError:
        raise
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise DataError(f"{label}: cannot decode the frames (transfer syntax {getattr(syntax, 'name', syntax)}): "
                        f"{exc}. Compressed DICOM needs a decoder plugin such as pylibjpeg") from exc
    stack = np.stack([decoded[i] for i in chosen.tolist()])
    drop = None if keep is None else ~(keep[chosen] if keep.shape[0] > 1 else np.broadcast_to(keep, stack.shape[:3]))
    if stack.ndim == 3:  # (T, H, W) grey: one scale for the whole clip, so brightness changes over time survive
        if drop is not None and drop.any() and not drop.all():  # masked pixels leave the scale alone
            stack = np.where(drop, stack[~drop].min(), stack)
        frames = to_unit_range(stack.astype(np.float32) if stack.dtype != np.uint8 else stack)
        if photometric == "MONOCHROME1":
            frames = 1.0 - frames
        frames = frames[:, None]
    else:
        depth = 16 if stack.dtype == np.uint16 else 8
        frames = (stack.astype(np.float32) / float(2 ** depth - 1)).clip(0, 1).transpose(0, 3, 1, 2)
    if drop is not None:
        frames = np.where(drop[:, None], np.float32(0), frames)
    patient = str(ds.get("PatientID", "") or "")
    return Clip(np.ascontiguousarray(frames, np.float32), np.asarray(out_times, np.float64), path.name,
                str(ds.get("Modality", "OT") or "OT"), timing, pseudonymize(patient) if patient else None, region,
                tuple(masked))


# -- frame folders ------------------------------------------------------------------------------------------------
def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def read_frame_folder(folder: str | Path, *, source_fps: float | None = None, fps: float | None = None,
                      length: int | None = None, mode: str = "uniform", max_frames: int = MAX_FRAMES,
                      rng: np.random.Generator | None = None) -> Clip:
    """A folder of single-frame images (PNG, JPEG, DICOM, …; in natural name order: 2 before 10) taken at
    ``source_fps`` frames per second (the assumed rate when not given); with ``fps`` and ``length`` sampled as
    ``read_dicom_sequence`` samples, only the frames needed read."""
    from lepton.data.readers.io import read_image

    folder = Path(folder)
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: _natural(p.name))
    if not files:
        raise DataError(f"{folder}: the frame folder holds no files")
    if len(files) > max_frames:
        raise DataError(f"{folder}: {len(files)} frames is over the limit of {max_frames}")
    rate = ASSUMED_FPS if source_fps is None else source_fps
    if not (math.isfinite(rate) and FPS_RANGE[0] <= rate <= FPS_RANGE[1]):
        raise DataError(f"{folder}: source_fps {rate:g} is outside {FPS_RANGE[0]:g}-{FPS_RANGE[1]:g}")
    times = np.arange(len(files)) / rate
    chosen, out_times = np.arange(len(files)), times
    if fps is not None and length is not None:
        wanted = sample_times(len(files) / rate, fps, length, mode, rng)
        chosen, out_times = frame_indices(times, wanted), wanted - wanted[0]
    read = {i: read_image(files[i])[0].pixels for i in np.unique(chosen).tolist()}
    shapes = {a.shape for a in read.values()}
    if len(shapes) > 1:
        raise DataError(f"{folder}: the frames differ in size or channels ({', '.join(map(str, sorted(shapes)))})")
    frames = np.stack([read[i] for i in chosen.tolist()])
    return Clip(frames, out_times, folder.name, "OT", "source_fps" if source_fps is not None else "assumed")


# -- video files ----------------------------------------------------------------------------------------------------
def read_video(path: str | Path, *, fps: float | None = None, length: int | None = None, mode: str = "uniform",
               max_frames: int = MAX_FRAMES, max_pixels: int = MAX_PIXELS,
               rng: np.random.Generator | None = None) -> Clip:
    """A video file (MP4, AVI, MOV, MKV, WebM; ``lepton.data.readers.video``) as a clip timed by its frames'
    presentation timestamps; with ``fps`` and ``length`` sampled as ``read_dicom_sequence`` samples, only the kept
    frames converted. Frames are RGB unless the stream stores grey. Header limits are checked before decoding."""
    from lepton.data.readers.video import decode_video, probe_video

    path = Path(path)
    info = probe_video(path, max_frames=max_frames, max_pixels=max_pixels)
    if not FPS_RANGE[0] <= info.fps <= FPS_RANGE[1]:
        raise DataError(f"{path}: the video declares {info.fps:g} frames per second, outside {FPS_RANGE[0]:g}-"
                        f"{FPS_RANGE[1]:g}: bad frame timing")
    wanted = sample_times(info.duration, fps, length, mode, rng) if fps is not None and length is not None else None
    stack, times = decode_video(path, wanted, max_frames=max_frames, max_pixels=max_pixels)
    frames = (stack.astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
    return Clip(np.ascontiguousarray(frames), times, path.name, "OT", "pts")


# -- physiological signals (WFDB) ------------------------------------------------------------------------------------
def read_wfdb(record: str | Path, *, channels: list[str] | None = None, start: int = 0,
              stop: int | None = None) -> Clip:
    """A WFDB record (``NAME.hea`` with its signal files) as a signal clip: samples (T, C) in physical units, one
    row per sample at the record's sampling frequency. ``channels`` picks leads by name; ``start``/``stop`` samples."""
    import wfdb

    base = Path(record)
    base = base.with_suffix("") if base.suffix in (".hea", ".dat", ".mat") else base
    if not base.with_suffix(".hea").is_file():
        raise DataError(f"{base}: no WFDB header {base.name}.hea there")
    try:
        header = wfdb.rdheader(str(base))
    except Exception as exc:
        raise DataError(f"{base}.hea: not a readable WFDB header ({exc})") from exc
    names = list(header.sig_name or [])
    if channels:
        unknown = [c for c in channels if c not in names]
        if unknown:
            raise DataError(f"{base}: no channel(s) {', '.join(unknown)}; the record has {', '.join(names)}")
    total = int(header.sig_len or 0)
    stop = total if stop is None else min(stop, total)
    if not 0 <= start < stop:
        raise DataError(f"{base}: samples {start}-{stop} hold nothing (the record has {total})")
    width = len(channels) if channels else len(names)
    if (stop - start) * width > MAX_SIGNAL_VALUES:
        raise DataError(f"{base}: {stop - start} samples x {width} channels is over the limit of {MAX_SIGNAL_VALUES} "
                        "values; read a window (start, stop)")
    try:
        rec = wfdb.rdrecord(str(base), sampfrom=start, sampto=stop, channel_names=channels)
    except Exception as exc:
        raise DataError(f"{base}: cannot read the WFDB record ({exc})") from exc
    fs = float(rec.fs or 0)
    if not (math.isfinite(fs) and fs > 0):
        raise DataError(f"{base}.hea: sampling frequency {rec.fs!r} is not above 0")
    signal = np.asarray(rec.p_signal, np.float32)
    if not np.isfinite(signal).all():  # WFDB marks missing samples as NaN: carry the last valid value forward
        signal = _fill_gaps(signal)
    return Clip(signal, np.arange(len(signal)) / fs, base.name, "ECG", "fs")


def _fill_gaps(signal: np.ndarray) -> np.ndarray:
    out = signal.copy()
    for c in range(out.shape[1]):
        col = out[:, c]
        bad = ~np.isfinite(col)
        if bad.all():
            col[:] = 0.0
            continue
        idx = np.where(~bad, np.arange(len(col)), 0)
        np.maximum.accumulate(idx, out=idx)
        first = int(np.flatnonzero(~bad)[0])
        col[:] = col[idx]
        col[:first] = col[first]
    return out


def read_sequence(path: str | Path, *, fps: float | None = None, length: int | None = None,
                  mode: str = "uniform", crop_region: bool = True, mask_annotations: bool = True,
                  max_frames: int = MAX_FRAMES,
                  source_fps: float | None = None, rng: np.random.Generator | None = None) -> Clip:
    """Any sequence source as a clip: a folder of frames (taken at ``source_fps``), a WFDB record (``.hea``), a video
    file (MP4, AVI, …) or a (multi-frame) DICOM file.

    With ``fps`` and ``length`` the result holds exactly ``length`` frames at ``fps`` (only those decoded)."""
    path = Path(path)
    if path.is_dir():
        return read_frame_folder(path, source_fps=source_fps, fps=fps, length=length, mode=mode,
                                 max_frames=max_frames, rng=rng)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".hea":
        clip = read_wfdb(path)
        return resample(clip, fps, length, mode, rng) if fps and length else clip
    from lepton.data.readers.video import is_video

    if is_video(path):
        return read_video(path, fps=fps, length=length, mode=mode, max_frames=max_frames, rng=rng)
    return read_dicom_sequence(path, fps=fps, length=length, mode=mode, crop_region=crop_region,
                               mask_annotations=mask_annotations, max_frames=max_frames, rng=rng)
