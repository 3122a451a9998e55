"""Tasks: what differs between classification, segmentation, … behind one small contract (``Task``).

Importing this package registers the built-in tasks; ``get_task(name)`` returns one.
"""

from lepton.tasks import classification, detection, segmentation, sequence  # noqa: F401  (registers the built-in tasks)
from lepton.tasks.base import Task, choose_task, get_task, inspect_data, list_tasks, register_task

__all__ = ["Task", "choose_task", "get_task", "inspect_data", "list_tasks", "register_task"]
