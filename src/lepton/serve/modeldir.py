"""Serving from a model folder instead of a shared registry: how KServe runs Lepton as a custom Open Inference
Protocol v2 runtime. KServe's storage initializer places the ``storageUri`` contents at ``/mnt/models``: a
Lepton bundle (``lepton models export``), either the ``.lepton`` archive itself or its unpacked contents (a
``.tar.gz`` storageUri is unpacked). The bundle is verified and registered in a private registry of this process;
API keys come from a mounted secret file (one ``TENANT SCOPE KEY`` line per key), stored there as hashes only.
"""

from __future__ import annotations

import atexit
import io
import shutil
import tarfile
import tempfile
from pathlib import Path

from lepton.errors import ConfigError

MANIFEST = "manifest.json"
MAX_KEY_LINES = 10_000


def find_bundle(model_dir: Path) -> Path | bytes:
    """The bundle in ``model_dir``: a bundle archive's path, or an unpacked bundle packed again (bytes)."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        return model_dir
    if not model_dir.is_dir():
        raise ConfigError(f"--model-dir {model_dir}: no such folder (KServe mounts storageUri at /mnt/models)")
    if (model_dir / MANIFEST).is_file():  # unpacked: pack it again for the verifying importer
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for path in sorted(model_dir.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    tar.add(path, arcname=path.relative_to(model_dir).as_posix())
        return buf.getvalue()
    archives = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith((".lepton", ".tar.gz", ".tgz")))
    if len(archives) != 1:
        listing = ", ".join(sorted(p.name for p in model_dir.iterdir())[:10]) or "nothing"
        raise ConfigError(f"--model-dir {model_dir}: expected one Lepton bundle (a .lepton file from `lepton models "
                          f"export`, or its unpacked manifest.json and artifacts/), found {listing}")
    return archives[0]


def read_keys(path: Path) -> list[tuple[str, str, str]]:
    """``(tenant, scope, key)`` per non-empty, non-comment line of a keys file."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--keys-file {path}: cannot read it ({exc})") from None
    if len(lines) > MAX_KEY_LINES:
        raise ConfigError(f"--keys-file {path}: more than {MAX_KEY_LINES} lines")
    keys = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ConfigError(f"--keys-file {path}, line {number}: expected TENANT SCOPE KEY (3 fields, got "
                              f"{len(parts)})")
        keys.append((parts[0], parts[1], parts[2]))
    if not keys:
        raise ConfigError(f"--keys-file {path}: no keys in it (one TENANT SCOPE KEY line per key)")
    return keys


def registry_from_model_dir(model_dir: Path, name: str, keys_file: Path | None = None,
                            root: Path | None = None) -> str:
    """A private registry (under ``root``, default a new temporary folder) holding the bundle in ``model_dir`` as
    ``name`` and the keys of ``keys_file``; returns its location for ``ServeConfig.registry``."""
    from lepton.errors import RegistryError
    from lepton.registry import Registry

    bundle = find_bundle(model_dir)
    if root is None:  # private to this server: removed when it exits
        root = Path(tempfile.mkdtemp(prefix="lepton-model-dir-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    root = Path(root)
    reg = Registry.open(root)
    if isinstance(bundle, bytes):
        packed = root / "bundle.lepton"
        packed.write_bytes(bundle)
        bundle = packed
    try:
        reg.import_bundle(bundle, name)
        for number, (tenant, scope, key) in enumerate(read_keys(keys_file) if keys_file else [], 1):
            try:
                reg.add_key(key, tenant, scope)
            except RegistryError as exc:
                raise ConfigError(f"--keys-file {keys_file}, key {number}: {exc}") from None
    except RegistryError as exc:
        raise ConfigError(f"--model-dir {model_dir}: {exc}") from None
    return str(root)
