"""The ``lepton`` command line (``lepton.cli.app``): one module per verb group over the library API.

``app`` and ``main`` are handed on lazily, so that importing a verb module (which runs this file first) never
comes back here.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {"app": "lepton.cli.app", "main": "lepton.cli.app"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = globals()[name] = getattr(import_module(_EXPORTS[name]), name)
        return value
    raise AttributeError(f"module 'lepton.cli' has no attribute {name!r}")
