"""A generated slide written as a 3DHISTECH MIRAX slide (``NAME.mrxs`` beside a ``NAME/`` folder), laid out as
OpenSlide reads one: ``Slidedat.ini`` (the camera image grid, the "Slide zoom level" hierarchy with one section per
level — image size, µm/px, JPEG, the concatenation factor), ``Index.dat`` (the index version and slide id, then per
level a data page of records: image index, offset, length, data file) and ``Data0000.dat`` (the JPEG images).

Level 0 is a grid of ``tile`` x ``tile`` camera images without overlap or position map; level k concatenates 2^k x 2^k
of them into one image of the same size (``IMAGE_CONCAT_FACTOR`` 1 per level). Pixels past the slide's edge are glass
(white). No library writes MIRAX, so the files are built here from the layout OpenSlide's reader expects; only
OpenSlide reads them (the ``openslide`` extra).
"""

from __future__ import annotations

import io
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np

INDEX_VERSION = "01.02"


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_mirax_slide(path: Path, plan: Any, *, tile: int, quality: int, resolution: bool, render: Any) -> Path:
    """Write ``plan`` as ``path`` (``.mrxs``) and its data folder; ``render(plan, ds, x, y, w, h)`` gives pixels of
    the level at downsample ``ds``. ``resolution=False`` states 0 µm/px, which OpenSlide reports as no resolution
    (a slide readers must refuse)."""
    folder = path.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny = -(-plan.width // tile), -(-plan.height // tile)
    levels = 1
    while (1 << (levels - 1)) < max(nx, ny) and max(plan.width, plan.height) >> levels >= 256:
        levels += 1
    slide_id = uuid.uuid4().hex
    records: list[list[tuple[int, int, int]]] = []  # per level: (image index, offset, length)
    with open(folder / "Data0000.dat", "wb") as data:
        for k in range(levels):
            step, ds = 1 << k, float(1 << k)
            w, h = -(-plan.width // (1 << k)), -(-plan.height // (1 << k))  # the level's own pixels
            rows = []
            for gy in range(0, ny, step):
                for gx in range(0, nx, step):
                    x, y = (gx >> k) * tile, (gy >> k) * tile
                    pixels = render(plan, ds, x, y, tile, tile).copy()
                    pixels[max(0, h - y):] = 255  # glass past the slide's edge
                    pixels[:, max(0, w - x):] = 255
                    blob = _jpeg(pixels, quality)
                    rows.append((gy * nx + gx, data.tell(), len(blob)))
                    data.write(blob)
            records.append(rows)
    index = bytearray(INDEX_VERSION.encode() + slide_id.encode())
    hier_root = len(index)
    index += struct.pack("<ii", hier_root + 8, 0)  # → the level pointers; the (empty) non-hierarchical root
    table = len(index)
    index += b"\0" * (4 * levels)
    for k, rows in enumerate(records):
        struct.pack_into("<i", index, table + 4 * k, len(index))
        page = len(index) + 8
        index += struct.pack("<ii", 0, page)  # a level's list: 0, then its first (and only) data page
        index += struct.pack("<ii", len(rows), 0)  # records in the page, no next page
        for image, offset, length in rows:
            index += struct.pack("<iiii", image, offset, length, 0)
    (folder / "Index.dat").write_bytes(bytes(index))
    mpp = plan.mpp if resolution else 0.0
    ini = ["[GENERAL]", f"SLIDE_VERSION={INDEX_VERSION}", f"SLIDE_ID={slide_id}", f"IMAGENUMBER_X={nx}",
           f"IMAGENUMBER_Y={ny}", f"OBJECTIVE_MAGNIFICATION={round(10 / plan.mpp)}", "CameraImageDivisionsPerSide=1",
           "", "[HIERARCHICAL]", "HIER_COUNT=1", "NONHIER_COUNT=0", "INDEXFILE=Index.dat",
           "HIER_0_NAME=Slide zoom level", f"HIER_0_COUNT={levels}"]
    for k in range(levels):
        ini += [f"HIER_0_VAL_{k}=ZoomLevel_{k}", f"HIER_0_VAL_{k}_SECTION=LAYER_0_LEVEL_{k}_SECTION"]
    ini += ["", "[DATAFILE]", "FILE_COUNT=1", "FILE_0=Data0000.dat"]
    for k in range(levels):
        ini += ["", f"[LAYER_0_LEVEL_{k}_SECTION]", "OVERLAP_X=0", "OVERLAP_Y=0",
                f"MICROMETER_PER_PIXEL_X={mpp * (1 << k)}", f"MICROMETER_PER_PIXEL_Y={mpp * (1 << k)}",
                "IMAGE_FORMAT=JPEG", "IMAGE_FILL_COLOR_BGR=16777215", f"DIGITIZER_WIDTH={tile}",
                f"DIGITIZER_HEIGHT={tile}", f"IMAGE_CONCAT_FACTOR={0 if k == 0 else 1}"]
    (folder / "Slidedat.ini").write_text("\n".join(ini) + "\n")
    path.write_bytes(b"MIRAX slide (Lepton synthetic): the data are in the folder of the same name\n")
    return path
