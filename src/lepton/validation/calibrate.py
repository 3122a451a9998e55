"""A local site's recalibration of a trained binary classifier, written as a new run directory (the same weights,
``run.json`` carrying the calibration map) that predicts, evaluates, registers and serves with the recalibrated
probabilities."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from lepton import rundir
from lepton.errors import ConfigError

#: Run files carried over to the calibrated run unchanged (``run.json`` is rewritten).
CARRIED = (rundir.CONFIG, rundir.BEST, rundir.LABELS, rundir.PREPROCESSING, rundir.DATA, rundir.VAL_SET,
           rundir.HISTORY)


def raw_probabilities(run, images) -> np.ndarray:
    """The run's class probabilities before any recalibration it carries (its task's plain activation)."""
    import copy

    from lepton.runs import predict_outputs

    plain = copy.copy(run.task)
    plain.calibration = None
    return predict_outputs(run.model, run.preprocessing(images), plain.activate, tta=run.config.tta,
                           device=run.device)


def calibrate(run, data: str | Path, *, method: str = "platt", split: str = "val", output: str | Path | None = None,
              registry=None, name: str | None = None, plots: bool = True) -> dict[str, Any]:
    """Fit ``method`` (``platt`` or ``isotonic``) on a local site's labelled ``data`` (its ``split`` when it defines
    splits, else all of it) and write the recalibrated run to ``output`` (default ``RUN-calibrated-METHOD`` beside
    the run). The decision threshold is the original one carried through the map, so decisions stay as they were
    (exactly for Platt; isotonic steps may merge them). With ``registry`` (a ``lepton.registry.Registry``) and
    ``name`` the new run is registered as the next version of ``name``; its card says it was recalibrated.

    Returns the calibration record, the calibration slope and intercept before and after on the fitting data, the
    new run's folder and the version registered.
    """
    from lepton.evaluate import select_split
    from lepton.runs import Run, load_run
    from lepton.tasks.calibration import apply_calibration, calibration_fit, fit_calibration
    from lepton.utils import atomic_write_json

    run = run if isinstance(run, Run) else load_run(run)
    if not run.task.binary_test(run.label_names):
        raise ConfigError(f"{run.path}: recalibration applies to two-class classifiers (this run: {run.task.name}, "
                          f"{len(run.label_names)} classes)")
    if str(data) == run.config.data:
        raise ConfigError(f"{data} is the run's training source: recalibrate on the local site's own labelled data")
    subset, used = select_split(run, data, split)
    y = np.asarray(run.task.targets(subset))
    p = raw_probabilities(run, subset.images)[:, 1]
    record = fit_calibration(y, p, method)
    q = apply_calibration(p, record)
    before, after = calibration_fit(y, p), calibration_fit(y, q)
    info = dict(run.info)
    old_threshold = info.get("threshold")
    record.update(fitted_on=str(data), split=used, slope_before=before["slope"], slope_after=after["slope"],
                  citl_before=before["citl"], citl_after=after["citl"], parent_threshold=old_threshold)
    src = Path(run.path)
    out = Path(output) if output is not None else src.parent / f"{src.name}-calibrated-{method}"
    if out.resolve() == src.resolve():
        raise ConfigError(f"{out}: write the calibrated run to a new folder, not over the run it comes from")
    out.mkdir(parents=True, exist_ok=True)
    for file in CARRIED:
        if (src / file).is_file():
            shutil.copyfile(src / file, out / file)
    threshold = float(apply_calibration(np.array([old_threshold]), record)[0]) if old_threshold is not None else None
    info.update(calibration=_finite(record), threshold=threshold, calibrated_from=str(src.resolve()),
                threshold_rule=f"{info.get('threshold_rule') or 'original'}, carried through the {method} map")
    rundir.RunDir(out).write_info(info)
    result = {"output": str(out), "method": method, "images": len(y), "events": int(y.sum()), "split": used,
              "record": record, "before": _finite(before), "after": _finite(after), "threshold": threshold,
              "parent_threshold": old_threshold}
    if plots:
        from lepton.plots import plot_calibration_curves

        result["plot"] = str(plot_calibration_curves({"before": (y, p), f"after ({method})": (y, q)},
                                                     out / "calibration.png"))
    atomic_write_json(out / "calibration.json", _finite(result))
    if registry is not None and name:
        version = registry.register_run(out, name, description=f"recalibrated ({method}) on {data}")
        result["version"] = version.ref
    return result


def _finite(d: Any) -> Any:
    """JSON-safe: NaN and infinities as None."""
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_finite(v) for v in d]
    if isinstance(d, float) and not np.isfinite(d):
        return None
    return d
