"""A content-addressed, on-disk cache of decoded, preprocessed cases.

An entry is a folder named by the SHA-256 of the source files' contents and the preprocessing options (window,
volume steps, cache version): ``image.npy`` (uint16 steps of 1/65535 for values in [0, 1], else float32),
``mask.npy`` (uint8) when there is one, ``fg.npy`` (a sample of foreground voxel coordinates for patch sampling) and
``meta.json`` (shape, geometry, class voxel counts, intensity sums, the decoded content hashes and a CRC-32 of every
array file).

Why plain ``.npy`` files: a case is opened by memory map and a training patch reads only the pages it covers, with no
decompression on the two cores that also train; a compressed, chunked store (blosc2, zarr) saves disk at the price of
decoding every patch, and adds a dependency. Writes go to a temporary folder that is renamed into place, so a killed
build leaves no half entry (a rebuild resumes with what finished) and two processes building the same entry both
succeed (the second finds it there). An entry whose files do not match their CRC-32 is removed and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import DataError

log = logging.getLogger("lepton.data")

#: Bumped when the decoding or the entry format changes: older entries are then simply not found.
CACHE_VERSION = 2  # 2: segmentation images in [0, 1] stored as uint16 (``cases.compact``)
BLOCK = 1 << 24


def default_cache_dir() -> Path:
    """``$LEPTON_CACHE``, else ``$XDG_CACHE_HOME/lepton``, else ``~/.cache/lepton``."""
    if os.environ.get("LEPTON_CACHE"):
        return Path(os.environ["LEPTON_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lepton"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


@dataclass(frozen=True)
class Entry:
    """One cached case: its folder and metadata. Arrays are opened by memory map on each call and closed when the
    caller lets go of them, so reading a patch keeps only that patch in memory."""

    path: Path
    meta: dict[str, Any]

    @property
    def key(self) -> str:
        return self.path.name

    def array(self, name: str) -> np.ndarray:
        return np.load(self.path / f"{name}.npy", mmap_mode="r", allow_pickle=False)

    def verify(self, *, full: bool = True) -> bool:
        """Whether every array file matches the CRC-32 recorded when it was written. With ``full=False`` a file whose
        size and modification time are those it had when it last passed (``verified.json``) is not read again: at
        160 CT cases a run's start would otherwise read the whole cache (24 GB)."""
        crcs = self.meta.get("crc32", {})
        stats = {}
        for name in crcs:
            try:
                st = (self.path / name).stat()
            except OSError:
                return False
            stats[name] = [st.st_size, st.st_mtime_ns]
        stamp = self.path / "verified.json"
        if not full:
            try:
                known = json.loads(stamp.read_text())
                # as git's racily clean index entries: a file changed within the timestamps' granularity of the
                # check could keep its size and time, so a stamp vouches only for files older than it by 2 s
                if known["files"] == stats and all(t < known["at"] - 2e9 for _, t in stats.values()):
                    return True
            except (OSError, ValueError, KeyError, TypeError):
                pass
        now = time.time_ns()
        if any(_crc32(self.path / name) != crc for name, crc in crcs.items()):
            return False
        with contextlib.suppress(OSError):  # a read-only cache still works: it is checked in full each time
            from lepton.utils import atomic_write_json

            atomic_write_json(stamp, {"files": stats, "at": now})
        return True

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


class CaseCache:
    """The cache under ``root`` (default: ``default_cache_dir()/cases``)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else default_cache_dir() / "cases"

    # -- keys -------------------------------------------------------------------------------------------------
    def file_hash(self, path: Path) -> str:
        """SHA-256 of a file's bytes (of every file, by relative name, for a folder such as a DICOM series),
        remembered by path, size and modification time so an unchanged file is not read again."""
        path = Path(path).absolute()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{path}: no files to read")
        stat = [(str(p.relative_to(path)) if path.is_dir() else "", p.stat().st_size, p.stat().st_mtime_ns)
                for p in files]
        memo = self.root / "hashes" / f"{hashlib.sha256(str(path).encode()).hexdigest()}.json"
        try:
            known = json.loads(memo.read_text())
            if known.get("stat") == [list(s) for s in stat]:
                return known["sha256"]
        except (OSError, ValueError):
            pass
        digest = hashlib.sha256()
        for (rel, _, _), p in zip(stat, files, strict=True):
            digest.update(rel.encode() + b"\0")
            with open(p, "rb") as fh:
                while block := fh.read(BLOCK):
                    digest.update(block)
        value = digest.hexdigest()
        from lepton.utils import atomic_write_json

        with contextlib.suppress(OSError):  # a read-only cache still works, it just hashes again
            atomic_write_json(memo, {"stat": stat, "sha256": value})
        return value

    def key(self, files: list[Path], options: dict[str, Any]) -> str:
        """The entry key of a case: its files' contents and the options that change what is decoded."""
        payload = {"v": CACHE_VERSION, "files": [self.file_hash(f) for f in files], "options": options}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def folder(self, key: str) -> Path:
        return self.root / key[:2] / key

    # -- entries ----------------------------------------------------------------------------------------------
    def get(self, key: str, *, verify: bool = True) -> Entry | None:
        """The entry for ``key``, or None when it is absent, unreadable or (with ``verify``) corrupt — a corrupt
        entry is removed, with a warning, so that it is rebuilt. Files unchanged since they last passed are not read
        again (``Entry.verify``); ``prune(verify=True)`` reads every byte."""
        folder = self.folder(key)
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            meta = None
        entry = Entry(folder, meta) if isinstance(meta, dict) else None
        if entry is None or meta.get("version") != CACHE_VERSION or (verify and not entry.verify(full=False)):
            log.warning("cache entry %s is corrupt or incomplete: removed, it will be rebuilt", folder)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return entry

    def put(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Entry:
        """Write an entry atomically: into a temporary folder, then renamed into place. When another process wrote
        the same key first, its entry is kept (the contents are the same by construction)."""
        final = self.folder(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{key}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        tmp.mkdir()
        try:
            crcs = {}
            for name, arr in arrays.items():
                path = tmp / f"{name}.npy"
                with open(path, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
                    fh.flush()
                    os.fsync(fh.fileno())
                crcs[path.name] = _crc32(path)
            meta = {**meta, "version": CACHE_VERSION, "crc32": crcs, "written": time.time()}
            (tmp / "meta.json").write_text(json.dumps(meta, default=_plain))
            try:
                os.rename(tmp, final)
            except OSError:  # the key exists: another writer finished first (or left a corrupt entry, now gone)
                if self.get(key) is None:
                    os.rename(tmp, final)
                else:
                    shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Entry(final, meta)

    def entries(self) -> list[Entry]:
        """Every complete entry (unverified), oldest first."""
        found = []
        if not self.root.is_dir():
            return found
        for meta_path in self.root.glob("??/*/meta.json"):
            try:
                found.append(Entry(meta_path.parent, json.loads(meta_path.read_text())))
            except (OSError, ValueError):
                found.append(Entry(meta_path.parent, {}))
        return sorted(found, key=lambda e: e.meta.get("written", 0))

    def show(self) -> dict[str, Any]:
        """What the cache holds: entries, bytes, sources, and leftovers of interrupted writes."""
        entries = self.entries()
        leftovers = list(self.root.glob("??/.*.tmp")) if self.root.is_dir() else []
        return {"root": str(self.root), "entries": len(entries), "bytes": sum(e.nbytes() for e in entries),
                "sources": sorted({e.meta.get("source", "?") for e in entries}), "interrupted_writes": len(leftovers)}

    def prune(self, *, older_than_days: float | None = None, source: str | None = None,
              verify: bool = False) -> dict[str, int]:
        """Remove interrupted writes, and entries older than ``older_than_days``, of ``source``, or (with
        ``verify``) corrupt ones. Returns how many entries and bytes were removed."""
        removed, freed = 0, 0
        if self.root.is_dir():
            for tmp in self.root.glob("??/.*.tmp"):
                freed += sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
                shutil.rmtree(tmp, ignore_errors=True)
        cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
        for entry in self.entries():
            old = cutoff is not None and entry.meta.get("written", 0) < cutoff
            mine = source is not None and entry.meta.get("source") == source
            bad = verify and (entry.meta.get("version") != CACHE_VERSION or not entry.verify())
            if old or mine or bad:
                freed += entry.nbytes()
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        return {"removed": removed, "bytes": freed}


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
