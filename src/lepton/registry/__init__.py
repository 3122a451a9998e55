"""Package stage: a versioned model registry with stages, model cards and portable bundles.

The names below are handed on lazily from ``lepton.registry.core`` (as ``lepton.data`` does), so the package is in
no import circle with its own modules.
"""

from __future__ import annotations

from lepton.utils import lazy_exports

_EXPORTS = {"ModelVersion": "lepton.registry.core", "Registry": "lepton.registry.core",
            "parse_ref": "lepton.registry.core"}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
