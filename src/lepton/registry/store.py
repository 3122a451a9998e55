"""A content-addressed artifact store: every blob is filed under its SHA-256 and verified on read."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from lepton.errors import RegistryError
from lepton.utils import atomic_write_bytes

_SHA = re.compile(r"^[0-9a-f]{64}$")


class ArtifactStore:
    """Blobs under ``root/sha256/ab/abcdef…``; writes are atomic and idempotent."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, sha: str) -> Path:
        if not _SHA.match(sha):
            raise RegistryError(f"invalid artifact hash {sha!r}")
        return self.root / "sha256" / sha[:2] / sha

    def put(self, data: bytes) -> str:
        """Store ``data`` and return its SHA-256."""
        sha = hashlib.sha256(data).hexdigest()
        path = self._path(sha)
        if not path.is_file() or path.stat().st_size != len(data):
            atomic_write_bytes(path, data)
        return sha

    def get(self, sha: str, what: str = "artifact") -> bytes:
        """Read a blob and verify its hash; a missing or corrupted blob is a RegistryError."""
        path = self._path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"{what} {sha[:12]} is missing from the artifact store {self.root}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise RegistryError(
                f"{what} {sha[:12]} in {path} is corrupted (its content hashes to {actual[:12]}); "
                "restore it from a bundle or backup"
            )
        return data

    def path(self, sha: str) -> Path:
        """Where a blob lies (read it with ``get`` first to verify it)."""
        return self._path(sha)

    def exists(self, sha: str) -> bool:
        return self._path(sha).is_file()
