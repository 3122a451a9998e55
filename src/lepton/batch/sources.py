"""What a batch job reads, enumerated lazily: a file, a folder (recursively, in a stable order), a CSV manifest
(``path[,label]``), a Decathlon folder (``dataset.json``: its training images and its test list), a text list of
paths, or DICOMweb sources (``dicomweb+http://…``, or such URLs one a line in a ``.txt`` study list), each series
fetched into the local cache when its turn comes.

Nothing here holds the whole archive: folders are walked one directory at a time and manifests read one row at a
time, so a million inputs cost what one does. An input's ``path`` is its key: the output has one row per key, and a
resumed job skips the keys already written.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lepton.errors import DataError

#: Files that are never images: skipped when a folder is walked.
SKIP_NAMES = {"dataset.json", "labels.json", "manifest.csv", "README", "README.md", "LICENSE"}


@dataclass(frozen=True)
class Input:
    """One input: ``path`` (its key), the ground truth a source gives (a manifest's ``label``, a class folder's
    name when ``labelled``), and the folder it was found under (mask files mirror the path below it)."""

    path: str
    truth: str | None = None
    root: str | None = None


def iter_inputs(sources: Iterable[str | Path], *, series: bool = False, labelled: bool = False) -> Iterator[Input]:
    """Every input of ``sources``, lazily, in a stable order. ``series``: the model takes volumes, so a folder that
    directly holds DICOM files is one input (a series). ``labelled``: a folder's first-level sub-folders are classes
    and give each input its ``truth``."""
    for source in sources:
        text = str(source)
        if text.startswith("dicomweb+"):
            yield from _dicomweb(text)
            continue
        path = Path(text)
        if path.is_dir():
            if (path / "dataset.json").is_file():
                yield from _decathlon(path)
            else:
                yield from _walk(path, series=series, labelled=labelled)
        elif path.suffix.lower() == ".csv" and path.is_file():
            yield from _manifest(path)
        elif path.suffix.lower() == ".txt" and path.is_file():
            yield from _listing(path, series=series)
        else:  # a file, or a missing path: its row says why it could not be read
            yield Input(str(path))


def count_inputs(sources: Iterable[str | Path], *, series: bool = False, labelled: bool = False) -> int | None:
    """How many inputs ``sources`` hold (a walk that keeps nothing); None when counting would fetch DICOMweb data."""
    sources = list(sources)
    if any(str(s).startswith("dicomweb+") or str(s).lower().endswith(".txt") for s in sources):
        return None
    return sum(1 for _ in iter_inputs(sources, series=series, labelled=labelled))


def _walk(root: Path, *, series: bool, labelled: bool) -> Iterator[Input]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files = sorted(f for f in filenames if not f.startswith(".") and f not in SKIP_NAMES)
        here = Path(dirpath)
        rel = here.relative_to(root).parts
        truth = rel[0] if labelled and rel else None
        if series and here != root and _holds_dicom(here, files):
            dirnames[:] = []
            yield Input(str(here), truth, str(root))
            continue
        for name in files:
            yield Input(str(here / name), truth, str(root))


def _holds_dicom(folder: Path, files: list[str]) -> bool:
    from lepton.data.readers.io import sniff_format

    for name in files[:8]:
        try:
            if sniff_format(folder / name) == "dicom":
                return True
        except Exception:  # an unreadable file is not a series
            continue
    return False


def _manifest(path: Path) -> Iterator[Input]:
    """A CSV manifest's rows: ``path`` (relative to the CSV's folder) and an optional ``label``; a path listed twice is
    one input (its first row)."""
    import hashlib

    seen: set[bytes] = set()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise DataError(f"{path}: a manifest needs a 'path' column (found: "
                                f"{', '.join(reader.fieldnames or []) or 'no header'})")
            for row in reader:
                item = (row.get("path") or "").strip()
                if not item:
                    continue
                full = item if item.startswith("dicomweb+") or Path(item).is_absolute() else str(path.parent / item)
                digest = hashlib.blake2b(full.encode(), digest_size=8).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                if full.startswith("dicomweb+"):
                    yield from _dicomweb(full, truth=row.get("label") or None)
                else:
                    yield Input(full, (row.get("label") or "").strip() or None, str(path.parent))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from exc


def _listing(path: Path, *, series: bool) -> Iterator[Input]:
    """A text file of inputs, one a line (``#`` comments): paths relative to the file, or DICOMweb sources."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                item = line.strip()
                if not item or item.startswith("#"):
                    continue
                if item.startswith("dicomweb+"):
                    yield from _dicomweb(item)
                else:
                    yield Input(item if Path(item).is_absolute() else str(path.parent / item), None, str(path.parent))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable list ({exc})") from exc


def _decathlon(root: Path) -> Iterator[Input]:
    """A Decathlon folder's images: ``training`` entries' images, then the ``test`` list."""
    from lepton.data.readers.masks import _inside

    where = str(root / "dataset.json")
    try:
        spec = json.loads((root / "dataset.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: unreadable ({exc})") from exc
    if not isinstance(spec, dict):
        raise DataError(f"{where}: not a Decathlon dataset.json")
    for entry in [*(spec.get("training") or []), *(spec.get("test") or [])]:
        image = entry.get("image") if isinstance(entry, dict) else entry
        if isinstance(image, str):
            yield Input(str(_inside(root, image, where)), None, str(root))


def _dicomweb(url: str, truth: str | None = None) -> Iterator[Input]:
    """A DICOMweb source's series, fetched into the local cache (those fetched before are not fetched again)."""
    from lepton.hospital.dicomweb import Source, cache_root, fetch

    for folder in fetch(Source.parse(url)):
        yield Input(str(folder), truth, str(cache_root()))
