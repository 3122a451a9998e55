"""Archive-scale batch inference: a trained run over a folder, a CSV manifest, a Decathlon folder or DICOMweb
studies, streamed, decoded in parallel, batched, written incrementally to Parquet or CSV and resumable exactly once;
on this machine (``engine.py``) or on a Ray cluster (``cluster.py``).

Names are handed on lazily (the package's ``__init__`` imports none of its modules)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "predict_batch": "lepton.batch.engine",
    "BatchSummary": "lepton.batch.engine",
    "iter_inputs": "lepton.batch.sources",
    "PartStore": "lepton.batch.store",
    "evaluate_stream": "lepton.batch.scoring",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lepton.batch' has no attribute {name!r}")
