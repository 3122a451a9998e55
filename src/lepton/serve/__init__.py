"""Serve stage: an HTTP inference server over registered models (FastAPI on uvicorn).

The names below are handed on lazily (as ``lepton.data`` does): ``from lepton.serve import ServeConfig`` imports the
configuration alone, not FastAPI, and the package is in no import circle with its modules. ``server.py`` runs it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {"ServeConfig": "lepton.serve.config", "create_app": "lepton.serve.app", "serve": "lepton.serve.server",
            "worker_config": "lepton.serve.server"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = globals()[name] = getattr(import_module(_EXPORTS[name]), name)
        return value
    raise AttributeError(f"module 'lepton.serve' has no attribute {name!r}")
