"""Lepton: medical-image classification and segmentation, 2-D and 3-D, from images to a trained, evaluated model.

The public API is re-exported here and imported lazily, so ``import lepton`` (and ``lepton --help``)
does not load PyTorch.

>>> import lepton
>>> run = lepton.train("chest_xrays/", model="resnet18", epochs=10)      # doctest: +SKIP
>>> report = lepton.evaluate(run, split="test")                          # doctest: +SKIP
>>> lepton.load_run(run.path).predict(["patient.dcm"])                   # doctest: +SKIP
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "train": "lepton.train",
    "evaluate": "lepton.evaluate",
    "load_run": "lepton.runs",
    "Run": "lepton.runs",
    "create_model": "lepton.models",
    "list_models": "lepton.models",
    "load_dataset": "lepton.data",
    "read_image": "lepton.data",
    "inspect_source": "lepton.data.index.inspection",
    "inspect_data": "lepton.tasks",
    "choose_task": "lepton.tasks",
    "make_config": "lepton.config",
    "TrainConfig": "lepton.config",
    "run_demo": "lepton.demo",
    "explain": "lepton.explain",
    "robustness": "lepton.robustness",
    "export_run": "lepton.export",
    "LeptonError": "lepton.errors",
}
__all__ = [*_EXPORTS, "__version__"]


class _Package(types.ModuleType):
    """Keeps ``lepton.train`` (and evaluate, explain, robustness) the public functions: importing the
    same-named submodule would otherwise rebind the package attribute to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}" \
                and _EXPORTS.get(name) == value.__name__ and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lepton' has no attribute {name!r}")
