"""A generated slide written as a Hamamatsu NDPI file, laid out as scanners write one and as tifffile, tiffslide and
OpenSlide read one: a little-endian TIFF whose IFDs carry NDPI's 64-bit extension (the next-IFD offset in 8 bytes,
then the high 32 bits of every entry's value), one IFD per pyramid level, each level one JPEG strip with restart
markers every few MCUs and the entropy-coded start of each restart interval in ``McuStarts`` (65426) — the readers'
tiles — and the Hamamatsu tags: the NDPI format flag (65420), the source lens (65421, the objective
magnification), the offsets from the slide centre (65422-65424) and Make/Model.

No library writes NDPI (tifffile reads it, its writer writes TIFF, BigTIFF and OME-TIFF), so the container is built
here from the published layout. A level is encoded as one JPEG (Pillow, ``restart_marker_blocks``), so it is held
in memory while written: at most ``MAX_SIDE`` pixels a side, as JPEG's own limit is 65,535.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import DataError

#: The largest level side written (a level is one JPEG in memory: 16384² RGB is 768 MiB).
MAX_SIDE = 16384
#: Most MCUs (8x8 at 4:4:4) per restart interval: the readers' tiles are 8 px high and up to 8 x RESTART_BLOCKS px
#: wide (the largest divisor of a level's MCUs per row up to this, so that no interval spans two rows).
RESTART_BLOCKS = 32
_SHORT, _LONG, _RATIONAL, _ASCII, _SLONG, _FLOAT = 3, 4, 5, 2, 9, 11
_FORMATS = {_SHORT: "H", _LONG: "I", _SLONG: "i", _FLOAT: "f"}


def jpeg_with_restarts(pixels: np.ndarray, quality: int, blocks: int = RESTART_BLOCKS) -> tuple[bytes, list[int]]:
    """``pixels`` (H, W, 3) as one baseline JPEG with a restart marker every ``blocks`` MCUs, and the byte offset of
    each restart interval's entropy-coded data (the first right after the scan header)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling=0, restart_marker_blocks=blocks)
    data = buf.getvalue()
    i = 2
    while data[i + 1] != 0xDA:  # marker segments up to the start of scan
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    starts = [i + 2 + int.from_bytes(data[i + 2:i + 4], "big")]
    j = starts[0]
    while (j := data.find(b"\xff", j)) >= 0 and j + 1 < len(data):
        marker = data[j + 1]
        if 0xD0 <= marker <= 0xD7:
            starts.append(j + 2)
        elif marker == 0xD9:
            break
        j += 2
    return data, starts


def _entry(tag: int, kind: int, values: Any) -> tuple[int, int, int, bytes]:
    """(tag, type, count, encoded value) for one IFD entry."""
    if kind == _ASCII:
        raw = values.encode("ascii") + b"\0"
        return tag, kind, len(raw), raw
    if kind == _RATIONAL:
        raw = b"".join(struct.pack("<II", *v) for v in values)
        return tag, kind, len(values), raw
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return tag, kind, len(values), struct.pack(f"<{len(values)}{_FORMATS[kind]}", *values)


def write_ndpi_slide(path: Path, plan: Any, levels: list[int], *, quality: int, resolution: bool,
                     render_level: Callable[[Any, int, int, int], np.ndarray]) -> Path:
    """Write ``plan``'s pyramid (``levels``: downsamples) to ``path`` as an NDPI file; ``render_level(plan, ds, w,
    h)`` gives a level's pixels. ``resolution=False`` leaves out the resolution tags (a slide readers must
    refuse). Returns ``path``."""
    if max(plan.width, plan.height) > MAX_SIDE:
        raise DataError(f"an NDPI slide is written a level at a time in memory: at most {MAX_SIDE} px a side (asked "
                        f"{plan.width}x{plan.height}); write a larger slide as tiff or svs")
    lens = float(round(10 / plan.mpp))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(b"II*\0" + struct.pack("<Q", 0))  # the first IFD's offset, 64-bit as NDPI has it: patched below
        link = 4  # where the offset of the next IFD goes
        for ds in levels:
            w, h = -(-plan.width // ds), -(-plan.height // ds)
            # a restart interval must not run past a row of MCUs: the readers cut the strip into rectangles there
            mcus = -(-w // 8)
            blocks = max(d for d in range(1, RESTART_BLOCKS + 1) if mcus % d == 0)
            data, starts = jpeg_with_restarts(render_level(plan, ds, w, h), quality, blocks)
            strip = fh.tell()
            fh.write(data)
            entries = [_entry(254, _LONG, 0), _entry(256, _LONG, w), _entry(257, _LONG, h),
                       _entry(258, _SHORT, [8, 8, 8]), _entry(259, _SHORT, 7), _entry(262, _SHORT, 6),
                       _entry(271, _ASCII, "Hamamatsu"), _entry(272, _ASCII, "C13220 (Lepton synthetic)"),
                       _entry(273, _LONG, strip), _entry(277, _SHORT, 3), _entry(278, _LONG, h),
                       _entry(279, _LONG, len(data))]
            if resolution:
                per_cm = round(1e4 / (plan.mpp * ds) * 1000)
                entries += [_entry(282, _RATIONAL, [(per_cm, 1000)]), _entry(283, _RATIONAL, [(per_cm, 1000)]),
                            _entry(296, _SHORT, 3)]
            entries += [_entry(65420, _LONG, 1), _entry(65421, _FLOAT, lens), _entry(65422, _SLONG, 0),
                        _entry(65423, _SLONG, 0), _entry(65424, _SLONG, 0), _entry(65426, _LONG, starts),
                        _entry(65427, _ASCII, "LEPTON-SYNTHETIC")]
            if fh.tell() % 2:
                fh.write(b"\0")
            ifd = fh.tell()
            size = 2 + 12 * len(entries) + 8 + 4 * len(entries)
            extra = ifd + size  # values over 4 bytes follow the IFD
            body, blobs = [], []
            for tag, kind, count, raw in entries:
                if len(raw) <= 4:
                    body.append(struct.pack("<HHI", tag, kind, count) + raw.ljust(4, b"\0"))
                else:
                    body.append(struct.pack("<HHII", tag, kind, count, extra))
                    blobs.append(raw + b"\0" * (len(raw) % 2))
                    extra += len(blobs[-1])
            fh.write(struct.pack("<H", len(entries)) + b"".join(body))
            next_at = fh.tell()
            fh.write(struct.pack("<Q", 0) + b"\0" * (4 * len(entries)))  # next IFD; the entries' high 32 bits: 0
            fh.write(b"".join(blobs))
            end = fh.tell()
            fh.seek(link)
            fh.write(struct.pack("<Q", ifd))
            fh.seek(end)
            link = next_at
    if tmp.stat().st_size >= 1 << 32:
        tmp.unlink()
        raise DataError(f"{path}: an NDPI file over 4 GiB needs the high offset bits, which this writer leaves at 0")
    tmp.replace(path)
    return path
