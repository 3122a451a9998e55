"""Package stage: a versioned model registry with stages, model cards and portable bundles.

The names below are handed on lazily from ``lepton.registry.core`` (as ``lepton.data`` does), so the package is in
no import circle with its own modules.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {"ModelVersion": "lepton.registry.core", "Registry": "lepton.registry.core",
            "parse_ref": "lepton.registry.core"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = globals()[name] = getattr(import_module(_EXPORTS[name]), name)
        return value
    raise AttributeError(f"module 'lepton.registry' has no attribute {name!r}")
