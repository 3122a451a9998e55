"""Portable bundles: one tar archive with a version's artifacts, card and a manifest of hashes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from lepton.errors import RegistryError
from lepton.utils import atomic_write_bytes

FORMAT = "lepton-bundle/1"
MAX_MEMBER_BYTES = 2 << 30


def export_bundle(registry, ref: str, path: Path) -> Path:
    """Write ``ref`` to ``path`` (a ``.lepton`` tar archive), verifying every artifact first."""
    v = registry.get(ref)
    files = {f"artifacts/{key}": registry.store.get(sha, f"{v.ref} {key}") for key, sha in v.artifacts.items()}
    meta = v.to_dict()
    meta.pop("stage")  # stages belong to a registry, not to the model
    manifest = {"format": FORMAT, "version": meta,
                "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in {"manifest.json": json.dumps(manifest, indent=2).encode(), **files}.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    atomic_write_bytes(path, buf.getvalue())
    return path


def import_bundle(registry, path: Path, name: str | None = None):
    """Verify and register a bundle as the next version of ``name`` (default: the bundle's name)."""
    files: dict[str, bytes] = {}
    try:
        tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the with-block below
    except (OSError, tarfile.TarError) as exc:
        raise RegistryError(f"{path}: not a readable bundle ({exc})") from exc
    with tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.name.startswith(("/", "\\")) or ".." in parts or not member.isfile():
                raise RegistryError(f"{path}: refused member {member.name!r} (links, absolute paths and '..' "
                                    "are not allowed in a bundle)")
            if member.size > MAX_MEMBER_BYTES:
                raise RegistryError(f"{path}: member {member.name} is too large")
            files[member.name] = tar.extractfile(member).read()
    if "manifest.json" not in files:
        raise RegistryError(f"{path}: no manifest.json; not a Lepton bundle")
    try:
        manifest = json.loads(files.pop("manifest.json"))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}: manifest.json is not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise RegistryError(f"{path}: unsupported bundle format {manifest.get('format')!r}")
    expected = manifest.get("files", {})
    if set(expected) != set(files):
        raise RegistryError(f"{path}: files {sorted(set(files) ^ set(expected))} do not match the manifest")
    for member, sha in expected.items():
        if hashlib.sha256(files[member]).hexdigest() != sha:
            raise RegistryError(f"{path}: {member} does not match its hash in the manifest (corrupted or altered)")
    meta = manifest["version"]
    artifacts = {member.removeprefix("artifacts/"): registry.store.put(data) for member, data in files.items()}
    if artifacts != meta["artifacts"]:
        raise RegistryError(f"{path}: artifact hashes disagree with the recorded version")
    fields = {k: meta[k] for k in ("format", "artifacts", "labels", "preprocessing", "config", "metrics",
                                   "data_fingerprint", "threshold")}
    fields["source_run"] = f"bundle:{meta['name']}@{meta['version']}"
    card = meta["artifacts"].get("card")
    text = registry.store.get(card, "model card").decode("utf-8") if card else None
    return registry.add_version(name or meta["name"], fields, card=text)
