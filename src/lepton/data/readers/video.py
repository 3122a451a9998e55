"""Video files (MP4, MOV, AVI, MKV, WebM, MPEG) as frames with their presentation times, decoded by PyAV.

PyAV (``av``) wraps FFmpeg's own libraries and ships them inside its wheel, so no system FFmpeg is needed; it gives
every frame's presentation timestamp (variable frame rates read as recorded) and decodes frame by frame, so a clip
sampled from a long video converts only the frames it keeps. ``probe_video`` reads the header — the declared frame
count, rate, duration and size are checked against the limits before anything is decoded — and ``decode_video``
decodes, keeping for each wanted time the frame shown then. A file FFmpeg cannot read is a DataError naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lepton.errors import DataError

#: File name endings read as video containers.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".ogv")


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header declares: ``frames`` (0 when the container does not say), the mean frame rate, the
    duration in seconds, the frame size and the codec."""

    frames: int
    fps: float
    duration: float
    width: int
    height: int
    codec: str


def is_video(path: str | Path) -> bool:
    """Whether a file is a video container, by its name's ending or its first bytes (ISO BMFF ``ftyp``, RIFF AVI,
    Matroska/WebM, MPEG program stream)."""
    path = Path(path)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError:
        return False
    return (head[4:8] == b"ftyp" and head[8:11] not in (b"hei", b"avi", b"mif")) or \
        (head[:4] == b"RIFF" and head[8:12] == b"AVI ") or head[:4] == b"\x1a\x45\xdf\xa3" or \
        head[:4] == b"\x00\x00\x01\xba"


def _open(path: Path):
    try:
        import av
    except ImportError as exc:  # pragma: no cover - the sequence extra installs it
        raise DataError(f"{path}: reading video needs PyAV; install lepton[sequence]") from exc
    try:
        container = av.open(str(path))
    except Exception as exc:  # FFmpeg's errors (InvalidDataError, …) and OS errors alike
        raise DataError(f"{path}: not a readable video file ({_reason(exc)})") from exc
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: the file holds no video stream")
    return container


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text.split("] ", 1)[-1] if text.startswith("[Errno") else text


def probe_video(path: str | Path, *, max_frames: int, max_pixels: int) -> VideoInfo:
    """A video's header, checked: no video stream, a declared frame count over ``max_frames``, a frame of more than
    ``max_pixels`` pixels, or no usable frame rate or duration is a DataError naming the file."""
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        info = _info(path, container, stream)
    if info.frames > max_frames:
        raise DataError(f"{path}: the video declares {info.frames} frames, over the limit of {max_frames}; raise "
                        "max_frames if the clip is meant to be that long")
    if info.width * info.height > max_pixels:
        raise DataError(f"{path}: frames of {info.width}x{info.height} are over the limit of {max_pixels} pixels")
    if info.duration * info.fps > 1.05 * max_frames + 1:
        raise DataError(f"{path}: {info.duration:.1f} s at {info.fps:g} fps is over the limit of {max_frames} "
                        "frames; raise max_frames if the clip is meant to be that long")
    return info


def _info(path: Path, container, stream) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not (math.isfinite(fps) and fps > 0):
        raise DataError(f"{path}: the video stream declares no frame rate: bad frame timing")
    declared = int(stream.frames or 0)
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = float(container.duration) / 1_000_000  # AV_TIME_BASE: microseconds
    else:
        duration = declared / fps
    if not (math.isfinite(duration) and duration > 0):
        raise DataError(f"{path}: the video declares a duration of {duration:g} s: no frames to read")
    ctx = stream.codec_context
    return VideoInfo(declared, fps, duration, int(ctx.width or 0), int(ctx.height or 0), str(ctx.name))


def decode_video(path: str | Path, wanted: np.ndarray | None = None, *, max_frames: int, max_pixels: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, H, W, C) uint8 (C = 1 for a stream stored grey, else 3: RGB) and their times in seconds from the first
    frame. With ``wanted`` times, one frame per wanted time — the last frame that starts at or before it — and only
    those converted; without, every frame. Bounded: more than ``max_frames`` frames decoded (whatever the header
    said), or more than ``max_pixels`` kept pixels, is a DataError; a stream that breaks mid-way names the frame."""
    path = Path(path)
    want = None if wanted is None else np.asarray(wanted, np.float64)
    order = None if want is None else np.argsort(want, kind="stable")
    kept: dict[int, np.ndarray] = {}  # decoded-frame index → pixels
    pick = np.zeros(0 if want is None else len(want), np.int64)
    times: list[float] = []
    frames: list[np.ndarray] = []
    ptr, prev, prev_index, start = 0, None, -1, None
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 30)
        fmt = "gray" if str(stream.codec_context.pix_fmt or "").startswith("gray") else "rgb24"
        index = -1
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index >= max_frames:
                    raise DataError(f"{path}: more than {max_frames} frames decoded, over the limit; raise "
                                    "max_frames if the clip is meant to be that long")
                t = float(frame.time) if frame.time is not None else index / fps
                start = t if start is None else start
                t -= start
                if want is None:
                    if (len(frames) + 1) * frame.width * frame.height > max_pixels:
                        raise DataError(f"{path}: {index + 1} frames of {frame.width}x{frame.height} are over the "
                                        f"limit of {max_pixels} pixels; sample fewer frames (fps, length)")
                    frames.append(frame.to_ndarray(format=fmt))
                    times.append(t)
                    continue
                while ptr < len(order) and want[order[ptr]] < t - 1e-9:
                    pick[order[ptr]] = _keep(kept, prev_index, prev, frame, index, path, max_pixels, fmt)
                    ptr += 1
                prev, prev_index = frame, index
                if ptr == len(order):
                    break
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: cannot decode frame {index + 2} ({_reason(exc)})") from exc
        if want is not None and prev is not None:
            while ptr < len(order):
                pick[order[ptr]] = _keep(kept, prev_index, prev, prev, prev_index, path, max_pixels, fmt)
                ptr += 1
    if index < 0 or (want is None and not frames):
        raise DataError(f"{path}: the video holds no decodable frame")
    if want is None:
        stack, out_times = np.stack(frames), np.asarray(times, np.float64)
    else:
        stack, out_times = np.stack([kept[i] for i in pick.tolist()]), want - want[0]
    if stack.ndim == 3:
        stack = stack[..., None]
    return stack, out_times


def _keep(kept: dict[int, np.ndarray], prev_index: int, prev, frame, index: int, path: Path,
          max_pixels: int, fmt: str) -> int:
    """The frame shown at a wanted time: the previous one (or, before the first frame, the first), converted once."""
    use, at = (prev, prev_index) if prev is not None else (frame, index)
    if at not in kept:
        if (len(kept) + 1) * use.width * use.height > max_pixels:
            raise DataError(f"{path}: {len(kept) + 1} frames of {use.width}x{use.height} are over the limit of "
                            f"{max_pixels} pixels; sample fewer frames (fps, length)")
        kept[at] = use.to_ndarray(format=fmt)
    return at


def write_video(path: str | Path, frames: np.ndarray, fps: float, *, codec: str | None = None) -> Path:
    """Frames (T, H, W) grey or (T, H, W, 3) RGB uint8 written as a video at ``fps`` (generated data and tests): MP4
    with MPEG-4 Part 2 by default, AVI with Motion JPEG for ``.avi``, both YUV 4:2:0 (read back as RGB); written to
    a temporary name, then renamed."""
    import os
    from fractions import Fraction

    import av

    path = Path(path)
    frames = np.asarray(frames, np.uint8)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    avi = path.suffix.lower() == ".avi"
    codec = codec or ("mjpeg" if avi else "mpeg4")
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = int(frames.shape[1]), int(frames.shape[2])
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.options = {"qscale": "2"} if codec in ("mjpeg", "mpeg4") else {}
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path
