"""Whole-slide images: pyramidal TIFF (generic, OME, Aperio SVS, QPTIFF) through tiffslide, DICOM VL whole-slide
microscopy through wsidicom, behind one small ``Slide``.

A slide states its levels, its microns per pixel (µm/px) and its objective magnification, read from the file. A
slide without a usable resolution is refused unless the caller says what it is (``mpp=``): tiles "at 0.5 µm/px" mean
nothing otherwise. TIFF resolution tags that are a screen's (72 or 96 dpi: hundreds of µm/px) are not a microscope's
and are refused the same way. Declared sizes are checked against ``MAX_SLIDE_PIXELS`` before a pixel is decoded, and a
tile that does not decode is a ``DataError`` naming the file, level and region — never a crash deep in a codec.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import DataError

#: Largest slide accepted, level-0 pixels (width x height): 2 x 10^11, twice a 40x scan of a whole 75 x 25 mm slide.
#: ``LEPTON_MAX_SLIDE_PIXELS`` raises or lowers it.
MAX_SLIDE_PIXELS = 2 * 10**11
#: Largest side accepted, pixels.
MAX_SLIDE_SIDE = 1 << 20
#: Level-0 µm/px a microscope scan plausibly has (100x oil ~0.1, a 1.25x overview ~8). Outside it the "resolution" is
#: a screen's dpi or garbage.
MPP_RANGE = (0.05, 50.0)
#: White: what lies outside a slide's pixels.
BACKGROUND = 255
DICOM_MAGIC_OFFSET = 128
FIX_MPP = "give its resolution (`--mpp 0.25` for a 40x scan, `--mpp 0.5` for 20x; Python: `open_slide(path, mpp=...)`)"


@dataclass(frozen=True)
class Level:
    """One level of the pyramid: its size in pixels, its downsample from level 0 and its µm/px."""

    width: int
    height: int
    downsample: float
    mpp: float


@dataclass
class Slide:
    """An open whole-slide image. ``mpp`` is level 0's µm/px; ``mpp_source`` says whether it came from the ``file``
    or the ``user``; ``magnification`` is the objective power from the file, or None. Use as a context manager, or
    call ``close``. ``read`` is thread-safe: each thread reads through its own handle."""

    path: Path
    container: str
    levels: list[Level]
    mpp: float
    mpp_source: str
    magnification: float | None
    vendor: str | None = None
    channels: str = "RGB"
    _opener: Any = field(default=None, repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _handles: list = field(default_factory=list, repr=False)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.levels[0].width, self.levels[0].height

    @property
    def brightfield(self) -> bool:
        """Whether the slide is an RGB brightfield scan (H&E, IHC) that tissue detection and the models read."""
        return self.channels == "RGB"

    def best_level(self, mpp: float) -> int:
        """The coarsest level still at least as fine as ``mpp`` (within 2 %), so that reading at ``mpp`` only ever
        shrinks; level 0 when even it is coarser."""
        best = 0
        for i, level in enumerate(self.levels):
            if level.mpp <= mpp * 1.02:
                best = i
        return best

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels (height, width, 3) uint8 of ``level`` from (x, y) in that level's pixels; outside the slide is
        white. Raises DataError, naming the region, when the file's tiles there do not decode."""
        lv = self.levels[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, lv.width), min(y + height, lv.height)
        if x1 <= x0 or y1 <= y0:
            return np.full((height, width, 3), BACKGROUND, np.uint8)
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = self._opener()
            self._handles.append(handle)
        try:
            pixels = handle.read(level, x0, y0, x1 - x0, y1 - y0)
        except DataError:
            raise
        except Exception as exc:  # codecs raise their own types (imagecodecs, PIL, pydicom)
            raise DataError(f"{self.path}: level {level} region x={x0}, y={y0}, {x1 - x0}x{y1 - y0} px does not decode "
                            f"({type(exc).__name__}: {exc}); the file is corrupt or truncated — copy or export the "
                            "slide again") from exc
        if (x0, y0, x1, y1) == (x, y, x + width, y + height):
            return pixels  # inside the level: no white canvas, no copy
        out = np.full((height, width, 3), BACKGROUND, np.uint8)
        out[y0 - y:y1 - y, x0 - x:x1 - x] = pixels
        return out

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """The slide at most ``max_side`` pixels on its longer side, from the coarsest level at least that large, and
        its downsample from level 0."""
        from PIL import Image

        w0, h0 = self.dimensions
        want = max(w0, h0) / max_side
        level = max((i for i, lv in enumerate(self.levels) if lv.downsample <= want * 1.02), default=0)
        lv = self.levels[level]
        pixels = self.read(level, 0, 0, lv.width, lv.height)
        scale = max(lv.width, lv.height) / max_side
        if scale > 1:
            size = (max(1, round(lv.width / scale)), max(1, round(lv.height / scale)))
            pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
        return pixels, w0 / pixels.shape[1]

    def describe(self) -> dict[str, Any]:
        """What the slide is, for printing and reports (no patient data: names and IDs are never read out)."""
        return {"file": str(self.path), "container": self.container, "vendor": self.vendor,
                "channels": self.channels, "width": self.dimensions[0], "height": self.dimensions[1],
                "mpp": round(self.mpp, 4), "mpp_source": self.mpp_source, "magnification": self.magnification,
                "levels": [{"width": lv.width, "height": lv.height, "downsample": round(lv.downsample, 3),
                            "mpp": round(lv.mpp, 4)} for lv in self.levels]}

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles.clear()
        self._local = threading.local()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- backends -----------------------------------------------------------------------------------------------------
class _TiffHandle:
    """One thread's reader of a TIFF slide. A level stored as one tiled, interleaved RGB page is read by decoding
    its stored tiles directly (tifffile's ``TiffPage.decode``), each once per call, with the last few kept for the
    next call; anything else goes through tiffslide's ``read_region``. Measured on a JPEG pyramid: a row of 16 tiles
    decoded directly takes ~1/15 of tiffslide's read of the same band (benchmarks/pathology.py)."""

    #: Decoded stored tiles kept per handle (a few rows of a wide slide): a band overlapping the last one reuses them.
    KEEP = 256

    def __init__(self, path: Path):
        from collections import OrderedDict

        from tiffslide import TiffSlide

        self.slide = TiffSlide(path)
        self.kept: OrderedDict = OrderedDict()
        self.pages = []
        with warnings.catch_warnings():  # tiffslide says on every NDPI that it reads a part of Hamamatsu's metadata
            warnings.filterwarnings("ignore", message="hamamatsu-format metadata", category=UserWarning)
            props = self.slide.properties
        try:
            series = self.slide.ts_tifffile.series[int(props.get("tiffslide.series-index") or 0)]
            for lv in series.levels:
                page = lv.keyframe if len(lv.pages) == 1 else None
                direct = (page is not None and page.is_tiled and series.axes == "YXS" and page.samplesperpixel in (3, 4)
                          and page.planarconfig == 1 and page.dtype == np.uint8 and page.imagedepth == 1)
                self.pages.append(page if direct else None)
        except Exception:  # kerchunk-backed or an unusual layout: tiffslide reads it
            self.pages = []

    def _tile(self, page: Any, level: int, index: int) -> np.ndarray:
        key = (level, index)
        tile = self.kept.get(key)
        if tile is not None:
            self.kept.move_to_end(key)
            return tile
        count = page.databytecounts[index]
        if not count:  # a tile the scanner never wrote: glass
            tile = np.full((page.tilelength, page.tilewidth, 3), BACKGROUND, np.uint8)
        else:
            # first use reads tags: before the seek, not between; an NDPI strip's tiles share its JPEG header
            decode, tables, header = page.decode, page.jpegtables, getattr(page, "jpegheader", None)
            fh = page.parent.filehandle
            fh.seek(page.dataoffsets[index])
            data, _, _ = decode(fh.read(count), index, jpegtables=tables, jpegheader=header)
            tile = data.reshape(page.tilelength, page.tilewidth, -1)[..., :3]
        self.kept[key] = tile
        if len(self.kept) > self.KEEP:
            self.kept.popitem(last=False)
        return tile

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self.pages[level] if level < len(self.pages) else None
        if page is not None:
            th, tw = page.tilelength, page.tilewidth
            across = -(-page.imagewidth // tw)
            out = np.empty((h, w, 3), np.uint8)
            for ty in range(y // th, (y + h - 1) // th + 1):
                for tx in range(x // tw, (x + w - 1) // tw + 1):
                    tile = self._tile(page, level, ty * across + tx)
                    y0, x0 = max(y, ty * th), max(x, tx * tw)
                    y1, x1 = min(y + h, (ty + 1) * th), min(x + w, (tx + 1) * tw)
                    out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - ty * th:y1 - ty * th, x0 - tx * tw:x1 - tx * tw]
            return out
        ds = self.slide.level_downsamples[level]
        # tiffslide takes level-0 coordinates and divides them again: exact for the integer downsamples it reports
        # for power-of-two pyramids, and rounded to the pixel otherwise.
        arr = self.slide.read_region((round(x * ds), round(y * ds)), level, (w, h), as_array=True)
        return _rgb(arr, h, w)

    def close(self) -> None:
        self.slide.close()


class _DicomHandle:
    def __init__(self, path: Path):
        from wsidicom import WsiDicom

        self.slide = WsiDicom.open(path)
        self.levels = sorted(self.slide.levels, key=lambda lv: lv.size.width, reverse=True)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        arr = self.slide.read_region((x, y), self.levels[level].level, (w, h), as_array=True)
        return _rgb(arr, h, w)

    def close(self) -> None:
        self.slide.close()


def _rgb(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype != np.uint8:
        top = float(arr.max()) if arr.size else 1.0
        arr = (arr.astype(np.float32) * (255.0 / max(top, 1.0))).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr[:h, :w, :3]


# -- opening ------------------------------------------------------------------------------------------------------
def max_slide_pixels() -> int:
    """The pixel-bomb limit in force: ``LEPTON_MAX_SLIDE_PIXELS`` or ``MAX_SLIDE_PIXELS``."""
    raw = os.environ.get("LEPTON_MAX_SLIDE_PIXELS")
    try:
        return int(float(raw)) if raw else MAX_SLIDE_PIXELS
    except ValueError as exc:
        raise DataError(f"LEPTON_MAX_SLIDE_PIXELS={raw!r} is not a number of pixels") from exc


def _check_size(path: Path, width: int, height: int, limit: int | None) -> None:
    limit = max_slide_pixels() if limit is None else limit
    if width < 1 or height < 1:
        raise DataError(f"{path}: the file declares an empty image ({width}x{height} px)")
    if width > MAX_SLIDE_SIDE or height > MAX_SLIDE_SIDE or width * height > limit:
        raise DataError(f"{path}: declares {width}x{height} px ({width * height / 1e9:.1f} gigapixels), over the "
                        f"limit of {limit / 1e9:.0f} gigapixels (and {MAX_SLIDE_SIDE} px a side) — a damaged or "
                        "hostile header; if the slide is real, raise LEPTON_MAX_SLIDE_PIXELS")


def _check_mpp(path: Path, value: float | None, where: str) -> float:
    if value is None or not math.isfinite(value) or value <= 0:
        raise DataError(f"{path}: the file states no microns per pixel{where}; {FIX_MPP}")
    if not MPP_RANGE[0] <= value <= MPP_RANGE[1]:
        raise DataError(f"{path}: the file's resolution is {value:.4g} µm/px{where}, outside what a microscope scan "
                        f"has ({MPP_RANGE[0]}-{MPP_RANGE[1]} µm/px; 72 or 96 dpi tags are a screen's, not a "
                        f"scanner's); {FIX_MPP}")
    return float(value)


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(DICOM_MAGIC_OFFSET)
        return fh.read(4) == b"DICM"


def open_slide(path: str | Path, *, mpp: float | None = None, max_pixels: int | None = None,
               backend: str = "auto") -> Slide:
    """Open a whole-slide image (pyramidal TIFF, SVS, OME-TIFF, QPTIFF, NDPI or a DICOM VL WSI file or folder; MIRAX
    and the other formats only OpenSlide reads when its wheels are installed).

    ``mpp`` overrides, or supplies when the file has none, level 0's µm/px. ``max_pixels`` (default
    ``max_slide_pixels()``) bounds the declared level-0 size. ``backend="openslide"`` reads a file through OpenSlide
    instead of tiffslide. Raises DataError, with the fix, for a missing file, a file that is not a slide, a slide
    without resolution, or a declared size over the limit.
    """
    from lepton.data.readers.slideopenslide import OPENSLIDE_SUFFIXES

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if backend not in ("auto", "openslide"):
        raise DataError(f"slide backend {backend!r}: auto or openslide")
    if mpp is not None:
        _check_mpp(path, mpp, " given")
    if backend == "openslide" or path.suffix.lower() in OPENSLIDE_SUFFIXES:
        return _open_openslide(path, mpp, max_pixels)
    if path.is_dir() or _is_dicom(path):
        return _open_dicom(path, mpp, max_pixels)
    return _open_tiff(path, mpp, max_pixels)


def _open_openslide(path: Path, mpp: float | None, max_pixels: int | None) -> Slide:
    from lepton.data.readers.slideopenslide import OpenSlideHandle

    handle = OpenSlideHandle(path)
    try:
        props = handle.properties
        _check_size(path, *handle.dimensions[0], max_pixels)
        found = props.get("openslide.mpp-x")
        level0 = mpp if mpp is not None else _check_mpp(path, float(found) if found else None, "")
        levels = [Level(w, h, d, level0 * d) for (w, h), d in zip(handle.dimensions, handle.downsamples, strict=True)]
        power = props.get("openslide.objective-power")
        vendor = props.get("openslide.vendor")
        container = {"mirax": "mrxs", "hamamatsu": "ndpi", "aperio": "svs"}.get(vendor or "", vendor or "openslide")
        return Slide(path, container, levels, level0, "user" if mpp is not None else "file",
                     float(power) if power else None, vendor, "RGB", lambda: OpenSlideHandle(path))
    finally:
        handle.close()


def _open_tiff(path: Path, mpp: float | None, max_pixels: int | None) -> Slide:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:  # the header alone: sizes are checked before tiffslide maps anything
            series = tif.series[0]
            axes, shape = series.axes, series.shape
    except Exception as exc:
        raise DataError(f"{path}: not a readable TIFF whole-slide image ({type(exc).__name__}: {exc}); Lepton reads "
                        "pyramidal TIFF, SVS, OME-TIFF, QPTIFF and DICOM VL whole-slide files") from exc
    dims = dict(zip(axes, shape, strict=True))
    _check_size(path, int(dims.get("X", 0)), int(dims.get("Y", 0)), max_pixels)
    try:
        handle = _TiffHandle(path)
    except Exception as exc:
        raise DataError(f"{path}: tiffslide cannot open it ({type(exc).__name__}: {exc})") from exc
    ts = handle.slide
    props = ts.properties
    try:
        found = props.get("tiffslide.mpp-x")
        level0 = mpp if mpp is not None else _check_mpp(path, float(found) if found is not None else None, "")
        levels = [Level(int(w), int(h), float(d), level0 * float(d))
                  for (w, h), d in zip(ts.level_dimensions, ts.level_downsamples, strict=True)]
        power = props.get("tiffslide.objective-power")
        channels = "RGB" if axes.endswith("S") and dims.get("S") in (3, 4) else f"{axes} {dict(dims)}"
        slide = Slide(path, _tiff_kind(path, props), levels, level0,
                      "user" if mpp is not None else "file", float(power) if power else None,
                      props.get("tiffslide.vendor"), channels, lambda: _TiffHandle(path))
    finally:
        handle.close()
    return slide


def _tiff_kind(path: Path, props: Any) -> str:
    suffix = path.suffix.lower()
    if suffix == ".qptiff":
        return "qptiff"
    if props.get("tiffslide.vendor") == "aperio":
        return "svs"
    if props.get("tiffslide.vendor") == "hamamatsu":
        return "ndpi"
    if path.name.lower().endswith((".ome.tif", ".ome.tiff")):
        return "ome-tiff"
    return "tiff"


def _open_dicom(path: Path, mpp: float | None, max_pixels: int | None) -> Slide:
    import pydicom

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    power = None
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:
            raise DataError(f"{f}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
        if ds.get("SOPClassUID") != "1.2.840.10008.5.1.4.1.1.77.1.6":
            raise DataError(f"{f}: a DICOM file, but not a VL Whole Slide Microscopy image (SOP class "
                            f"{ds.get('SOPClassUID', 'missing')}); Lepton reads pathology slides only as WSI")
        _check_size(f, int(ds.get("TotalPixelMatrixColumns", 0) or 0), int(ds.get("TotalPixelMatrixRows", 0) or 0),
                    max_pixels)
        if "ImageType" not in ds or "VOLUME" not in list(ds.ImageType):
            raise DataError(f"{f}: a DICOM whole-slide file whose ImageType is "
                            f"{list(ds.ImageType) if 'ImageType' in ds else 'missing'}: without VOLUME in it no "
                            "pyramid level can be told from a label or overview image (wsidicom needs it); re-export "
                            "the slide with a complete header (e.g. with wsidicomizer)")
        shared = ds.get("SharedFunctionalGroupsSequence") or [{}]
        measures = shared[0].get("PixelMeasuresSequence") or [{}]
        if "PixelSpacing" not in measures[0]:
            if mpp is None:
                _check_mpp(f, None, " (no PixelSpacing in its shared functional groups)")
            raise DataError(f"{f}: no PixelSpacing in its shared functional groups, and wsidicom reads no DICOM slide "
                            "without one (--mpp cannot stand in for it here); re-export the slide with its pixel "
                            "spacing")
        for optical in ds.get("OpticalPathSequence", []):
            power = float(optical.ObjectiveLensPower) if optical.get("ObjectiveLensPower") else power
    try:
        handle = _DicomHandle(path)
    except Exception as exc:
        raise DataError(f"{path}: wsidicom cannot open it as a whole-slide image ({type(exc).__name__}: "
                        f"{exc})") from exc
    try:
        base = handle.levels[0]
        found = base.mpp.width if base.mpp is not None else None
        level0 = mpp if mpp is not None else _check_mpp(path, found, " (no PixelSpacing)")
        levels = [Level(int(lv.size.width), int(lv.size.height), base.size.width / lv.size.width,
                        level0 * base.size.width / lv.size.width) for lv in handle.levels]
        slide = Slide(path, "dicom", levels, level0, "user" if mpp is not None else "file", power, "dicom", "RGB",
                      lambda: _DicomHandle(path))
    finally:
        handle.close()
    return slide
