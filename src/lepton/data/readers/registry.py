"""The reader registry: each input format registers a content sniffer and a reader here.

A format module (``raster``, ``npy``, ``dicom``, ``nifti``; volumes and series next) decorates its read
function with ``@register_reader``; ``lepton.data.readers.io`` imports the built-in format modules and dispatches
through this table, so formats never import each other and a new one is added in its own module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lepton.data.base import Frame

#: Bytes of a file's head that sniffers see: a NIfTI-1 magic sits at offset 344, and a gzip-compressed NIfTI
#: header is inflated from its first few hundred bytes (more with a long name in the gzip header).
SNIFF_BYTES = 4096

#: What a sniffer says: the content's magic number matched, only the file name suggests the format, or neither.
MAGIC, NAME, NO = 2, 1, 0

Sniffer = Callable[[bytes, str], int]
ReadFn = Callable[..., list[Frame]]  # read(source: Path | BinaryIO, label, *, window, slices, max_pixels) -> frames


@dataclass(frozen=True)
class Reader:
    """One registered input format.

    ``sniff(head, lower_case_name)`` returns MAGIC, NAME or NO; among readers that answer, the highest answer
    wins and ties go to the lower ``priority``. ``read(source, label, *, window, slices, max_pixels)`` takes a
    path, or an in-memory stream when ``in_memory`` (other readers are handed a temporary file for uploads);
    errors name ``label``, and sizes in the header are checked against ``max_pixels`` before decoding.
    """

    name: str
    sniff: Sniffer
    read: ReadFn
    in_memory: bool = False
    priority: int = 50


_READERS: dict[str, Reader] = {}
_ORDER: list[Reader] = []  # _READERS in sniffing order, rebuilt on registration (match runs per upload)


def register_reader(name: str, sniff: Sniffer, *, in_memory: bool = False, priority: int = 50):
    """Decorator: register ``read(source, label, *, window, slices, max_pixels) -> list[Frame]`` for ``name``."""

    def wrap(fn: ReadFn) -> ReadFn:
        _READERS[name] = Reader(name, sniff, fn, in_memory, priority)
        _ORDER[:] = sorted(_READERS.values(), key=lambda r: (r.priority, r.name))
        return fn

    return wrap


def readers() -> list[Reader]:
    """The registered readers in sniffing order."""
    return list(_ORDER)


def match(head: bytes, name: str = "") -> Reader | None:
    """The reader for content starting with ``head`` (``name`` only breaks ties, e.g. ``.nii.gz``, bare ``.dcm``)."""
    best, best_score = None, NO
    lower = name.lower()
    for reader in _ORDER:
        score = reader.sniff(head, lower)
        if score > best_score:
            best, best_score = reader, score
    return best


Source = Path | BinaryIO
