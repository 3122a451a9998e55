"""Regenerate the vendored schemas in this folder from their projects' sources (run by hand, not by the tests).

    python deploy/schemas/vendor.py CRD.yaml [CRD.yaml ...]   # a CustomResourceDefinition: one schema per version
    python deploy/schemas/vendor.py compose-spec.json          # the Compose Specification's JSON schema

Each schema is written as ``<group>_<kind>_<version>.json.gz`` (CRDs) or ``compose-spec.json.gz``, gzipped
(the InferenceService schema alone is ~2 MB of YAML). Record the source and commit in SOURCES.md.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def write(name: str, schema: dict) -> None:
    data = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
    (HERE / name).write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    print(f"{name}: {len(data) // 1024} KiB of JSON")


def main(paths: list[str]) -> None:
    for path in map(Path, paths):
        if path.suffix == ".json":
            write(f"{path.stem}.json.gz", json.loads(path.read_text()))
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                write(f"{spec['group']}_{spec['names']['kind']}_{version['name']}.json.gz",
                      version["schema"]["openAPIV3Schema"])


if __name__ == "__main__":
    main(sys.argv[1:])
