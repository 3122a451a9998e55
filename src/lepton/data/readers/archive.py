"""A zip archive of one DICOM series (how a browser or a PACS export hands over a study), read as a volume.

The archive is checked before anything is written: member count, declared and actual sizes, compression ratio,
and names (absolute paths, ``..``, links). Members are extracted under names of their own, so a hostile member
name can never choose where a file lands.
"""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from lepton.data.base import MAX_FILE_BYTES, MAX_PIXELS, Frame
from lepton.data.readers.registry import MAGIC, NO, register_reader
from lepton.errors import DataError

#: Most files one archive may hold (a CT series rarely has more than ~1,500 slices).
MAX_MEMBERS = 4096
#: Largest compression ratio of a member: beyond it, the archive is treated as a zip bomb.
MAX_RATIO = 200


def _sniff(head: bytes, name: str) -> int:
    return MAGIC if head[:4] == b"PK\x03\x04" else NO


def _check(zf: zipfile.ZipFile, label: str) -> list[zipfile.ZipInfo]:
    members = [m for m in zf.infolist() if not m.is_dir()]
    if not members:
        raise DataError(f"{label}: the zip archive holds no files")
    if len(members) > MAX_MEMBERS:
        raise DataError(f"{label}: {len(members)} files is over the limit of {MAX_MEMBERS} in one archive")
    total = 0
    for m in members:
        parts = PurePosixPath(m.filename.replace("\\", "/")).parts
        if m.filename.startswith(("/", "\\")) or ".." in parts or (len(m.filename) > 1 and m.filename[1] == ":"):
            raise DataError(f"{label}: refused member {m.filename!r} (absolute paths and '..' are not allowed)")
        if (m.external_attr >> 16) & 0o170000 == 0o120000:
            raise DataError(f"{label}: refused member {m.filename!r} (symbolic links are not allowed)")
        if m.file_size > MAX_RATIO * max(m.compress_size, 1) and m.file_size > 1 << 20:
            raise DataError(f"{label}: member {m.filename!r} expands {m.file_size // max(m.compress_size, 1)}x: "
                            "refused as a zip bomb")
        total += m.file_size
    if total > MAX_FILE_BYTES:
        raise DataError(f"{label}: the archive expands to {total} bytes, over the {MAX_FILE_BYTES} byte limit")
    return members


@contextmanager
def unpacked(source, label: str) -> Iterator[Path]:
    """A zip archive (a path or a binary stream) checked member by member and written, under names of our own, into
    a temporary folder that is removed afterwards."""
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{label}: not a readable zip archive ({exc})") from None
    with zf, tempfile.TemporaryDirectory() as tmp:
        members = _check(zf, label)
        written = 0
        for i, member in enumerate(members):
            with zf.open(member) as src, open(Path(tmp) / f"{i:05d}.dcm", "wb") as dst:
                while chunk := src.read(1 << 20):  # sizes in the directory may lie: count what really comes out
                    written += len(chunk)
                    if written > MAX_FILE_BYTES:
                        raise DataError(f"{label}: the archive expands past {MAX_FILE_BYTES} bytes")
                    dst.write(chunk)
        yield Path(tmp)


@register_reader("zip", _sniff, priority=50)
def read_zip(path: Path, label: str | None = None, *, window: str | None = None, slices: str = "middle",
             max_pixels: int = MAX_PIXELS) -> list[Frame]:
    """The one DICOM series in a zip archive: as a volume (``slices="volume"``) or its middle or every slice."""
    from lepton.data.readers.series import read_series
    from lepton.data.readers.volume import volume_frames

    label = label or str(path)
    with unpacked(path, label) as tmp:
        try:
            volumes = read_series(tmp, max_voxels=max_pixels)
        except DataError as exc:
            raise DataError(str(exc).replace(str(tmp), label)) from None
    if len(volumes) != 1:
        raise DataError(f"{label}: holds {len(volumes)} DICOM series; send one series per archive")
    volumes[0].name = Path(label).name
    return volume_frames(volumes[0], window, slices)
