"""The ``lepton`` command line (``lepton.cli.app``): one module per verb group over the library API.

``app`` and ``main`` are handed on lazily, so that importing a verb module (which runs this file first) never
comes back here.
"""

from __future__ import annotations

from lepton.utils import lazy_exports

_EXPORTS = {"app": "lepton.cli.app", "main": "lepton.cli.app"}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
