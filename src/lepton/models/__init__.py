"""Model stage: one registry of networks and one factory, ``create_model``.

The names below are handed on lazily from the modules that define them, as ``lepton`` itself does: the package
imports none of its own modules, so importing one of them (which runs this file first) never comes back here.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ModelInfo": "lepton.models.registry",
    "create_model": "lepton.models.factory",
    "head_parameters": "lepton.models.factory",
    "list_models": "lepton.models.factory",
    "model_info": "lepton.models.factory",
    "register_model": "lepton.models.registry",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = globals()[name] = getattr(import_module(_EXPORTS[name]), name)
        return value
    raise AttributeError(f"module 'lepton.models' has no attribute {name!r}")
