"""Training: a run directory driven through the task's loss and metrics, with AdamW, warm-up + cosine/step
schedules, class imbalance, EMA, early stopping, a time budget, atomic per-epoch checkpoints and exact resume.

The parts live beside this file: ``job`` (``train``: the run from config to finished directory), ``data`` (load,
split, preprocess), ``loop`` (``Trainer``: epoch, step, validation, state), ``members`` (an ensemble's choice),
``finish`` (``run.json`` and what completes a run), ``optim`` (optimiser, schedule, EMA), ``checkpoint``
(best/last/history files), ``budget`` (the wall-clock plan) and ``progress`` (what the terminal shows). The names
below are handed on lazily (as ``lepton.data`` does), so the package is in no import circle with its modules.
"""

from __future__ import annotations

from lepton.utils import lazy_exports

_EXPORTS = {"Prepared": "lepton.train.data", "Trainer": "lepton.train.loop", "data_fingerprint": "lepton.train.data",
            "finish_run": "lepton.train.finish", "intensity_stats": "lepton.train.data",
            "prepare_data": "lepton.train.data", "resolve_device": "lepton.train.job", "run_name": "lepton.train.job",
            "summary": "lepton.train.finish", "train": "lepton.train.job"}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
