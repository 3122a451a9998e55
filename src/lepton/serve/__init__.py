"""Serve stage: an HTTP inference server over registered models (FastAPI on uvicorn).

The names below are handed on lazily (as ``lepton.data`` does): ``from lepton.serve import ServeConfig`` imports the
configuration alone, not FastAPI, and the package is in no import circle with its modules. ``server.py`` runs it.
"""

from __future__ import annotations

from lepton.utils import lazy_exports

_EXPORTS = {"ServeConfig": "lepton.serve.config", "create_app": "lepton.serve.app", "serve": "lepton.serve.server",
            "worker_config": "lepton.serve.server"}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
