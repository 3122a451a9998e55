"""Tasks: what differs between classification, segmentation, … behind one small contract (``Task``).

``get_task(name)`` returns one; the built-in tasks' modules are imported (and so registered) the first time a task
is looked up. The names below are handed on lazily from ``lepton.tasks.base``, so the package is in no import circle
with its own modules.
"""

from __future__ import annotations

from lepton.utils import lazy_exports

_EXPORTS = {"Task": "lepton.tasks.base", "choose_task": "lepton.tasks.base", "get_task": "lepton.tasks.base",
            "inspect_data": "lepton.tasks.base", "list_tasks": "lepton.tasks.base",
            "register_task": "lepton.tasks.base"}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
