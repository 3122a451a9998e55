"""Tracking: a run's figures as they are made, for TensorBoard and MLflow, and runs side by side.

``base`` is the seam (``Tracker``, no-op by default; ``open_tracker`` for a run directory; the record in
``RUN/tracking/tracking.json``), ``board`` writes TensorBoard event files into the run directory, ``mlflow_tracker``
logs to an MLflow tracking store or server from a background thread (buffered, retried, written to the run directory
when the server stays away), and ``compare`` lists and compares run directories (``lepton runs``).

The names below are handed on lazily, as ``lepton.data`` does: neither TensorBoard nor MLflow is imported until a
run asks for it, so ``lepton --help`` stays fast and both stay optional (``pip install lepton-imaging[tracking]``).
"""

from __future__ import annotations

from lepton.utils import lazy_exports

_EXPORTS = {
    "Tracker": "lepton.tracking.base",
    "open_tracker": "lepton.tracking.factory",
    "parse_track": "lepton.tracking.base",
    "log_report": "lepton.tracking.factory",
    "compare_runs": "lepton.tracking.compare",
    "list_runs": "lepton.tracking.compare",
    "plot_compare": "lepton.tracking.compare",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
