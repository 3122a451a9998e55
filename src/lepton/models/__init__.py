"""Model stage: one registry of networks and one factory, ``create_model``.

The names below are handed on lazily from the modules that define them, as ``lepton`` itself does: the package
imports none of its own modules, so importing one of them (which runs this file first) never comes back here.
"""

from __future__ import annotations

from lepton.utils import lazy_exports

_EXPORTS = {
    "ModelInfo": "lepton.models.registry",
    "create_model": "lepton.models.factory",
    "head_parameters": "lepton.models.factory",
    "list_models": "lepton.models.factory",
    "model_info": "lepton.models.factory",
    "register_model": "lepton.models.registry",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
