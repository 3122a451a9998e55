"""OpenSlide as an optional slide reader, for what tiffslide does not read — MIRAX (``.mrxs``), Hamamatsu VMS/VMU,
Aperio ``.svslide`` — and for any slide on request (``open_slide(..., backend="openslide")``). The library comes as
wheels with its own shared library (``openslide-bin``, ``openslide-python``: the ``openslide`` extra), no system
package; without them a slide that needs it is refused with the command that installs them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import DataError

#: Suffixes only OpenSlide reads (tiffslide reads the TIFF-based formats).
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
INSTALL = ("pip install 'lepton-imaging[openslide]' (openslide-bin and openslide-python wheels: no system package "
           "needed)")


def load_openslide() -> Any:
    """The ``openslide`` module; DataError with the install command when it is missing."""
    try:
        import openslide
    except ImportError as exc:  # the wheel, or its bundled library, is missing
        raise DataError(f"this slide needs OpenSlide: {INSTALL} ({exc})") from exc
    return openslide


class OpenSlideHandle:
    """One thread's OpenSlide reader: levels, properties, and RGB regions composited over white."""

    def __init__(self, path: Path):
        openslide = load_openslide()
        try:
            self.slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
            raise DataError(f"{path}: OpenSlide cannot open it ({type(exc).__name__}: {exc})") from exc
        self.properties = dict(self.slide.properties)
        self.dimensions = [(int(w), int(h)) for w, h in self.slide.level_dimensions]
        self.downsamples = [float(d) for d in self.slide.level_downsamples]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 of level ``level`` at its own pixel (x, y); transparent (unscanned) pixels are white."""
        ds = self.downsamples[level]
        rgba = np.asarray(self.slide.read_region((round(x * ds), round(y * ds)), level, (w, h)), dtype=np.uint8)
        alpha = rgba[..., 3:4].astype(np.uint16)
        # OpenSlide gives premultiplied-then-unpremultiplied RGBA: blend onto white by alpha
        return ((rgba[..., :3] * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)

    def close(self) -> None:
        self.slide.close()
