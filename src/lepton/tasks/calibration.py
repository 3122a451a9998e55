"""Probability recalibration of a binary classifier: Platt scaling (logistic on the logit) and isotonic regression,
fitted on a local site's labelled data, kept as a small JSON record in ``run.json`` and applied wherever the task's
probabilities are made (``Classification.activate``), so ``predict``, ``evaluate``, the server and ONNX exports agree.
Also the calibration-in-the-large and calibration slope that say whether a model needs it."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from lepton.errors import ConfigError

METHODS = ("platt", "isotonic")
_EPS = 1e-12


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def fit_calibration(y: np.ndarray, p: np.ndarray, method: str = "platt") -> dict[str, Any]:
    """A recalibration map of P(positive) fitted on labels ``y`` (0/1): ``platt`` — p' = σ(a·logit(p) + b), by
    unpenalised logistic regression; ``isotonic`` — a non-decreasing step map (scikit-learn), kept as knots and
    interpolated linearly between them."""
    y = np.asarray(y).astype(np.int64)
    p = np.asarray(p, dtype=np.float64)
    if method not in METHODS:
        raise ConfigError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if len(np.unique(y)) < 2:
        raise ConfigError(f"recalibration needs both classes in the local data (found only class {int(y[0])} "
                          f"in {len(y)} images)")
    if method == "platt":
        b, a = logistic_fits(y[None].astype(np.float64), logit(p)[None])
        return {"method": "platt", "a": float(a[0]), "b": float(b[0]), "n": len(y)}
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
    x, inverse = np.unique(iso.X_thresholds_, return_inverse=True)  # one knot per x: NumPy and torch agree
    v = np.bincount(inverse, weights=iso.y_thresholds_) / np.bincount(inverse)
    v = np.clip(v, 0.5 / len(y), 1 - 0.5 / len(y))  # finite data never show a probability of exactly 0 or 1
    return {"method": "isotonic", "x": [float(t) for t in x], "y": [float(t) for t in v], "n": len(y)}


def check_record(record: dict[str, Any]) -> dict[str, Any]:
    """A calibration record read from a run, checked (a clear error for a damaged or foreign one)."""
    method = record.get("method") if isinstance(record, dict) else None
    ok = False
    if method == "platt":
        ok = all(isinstance(record.get(k), int | float) and math.isfinite(record[k]) for k in ("a", "b"))
    elif method == "isotonic":
        x, v = record.get("x"), record.get("y")
        ok = (isinstance(x, list) and isinstance(v, list) and 1 <= len(x) == len(v)
              and all(isinstance(t, int | float) and math.isfinite(t) for t in [*x, *v])
              and all(b >= a for a, b in itertools.pairwise(x)))
    if not ok:
        raise ConfigError(f"run.json: calibration record {record!r} is not a platt (a, b) or isotonic (x, y) map")
    return record


def apply_calibration(p: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """P(positive) recalibrated by ``record`` (NumPy)."""
    p = np.asarray(p, dtype=np.float64)
    if record["method"] == "platt":
        return 1.0 / (1.0 + np.exp(-(record["a"] * logit(p) + record["b"])))
    return np.interp(p, record["x"], record["y"])


def calibrate_probs(probs, record: dict[str, Any]):
    """Two-class probabilities (N, 2) as a torch tensor with column 1 recalibrated and column 0 its complement.
    Written in elementwise operations only (the isotonic map as a sum of clamped ramps), so it exports to ONNX."""
    import torch

    p = probs[:, 1].double().clamp(_EPS, 1 - _EPS)  # float64: the map's tails lie beyond float32's 1 - 1e-7
    if record["method"] == "platt":
        q = torch.sigmoid(record["a"] * torch.log(p / (1 - p)) + record["b"])
    else:
        x, v = record["x"], record["y"]
        q = torch.full_like(p, v[0])
        for i in range(len(x) - 1):
            width = x[i + 1] - x[i]
            if width > 0 and v[i + 1] != v[i]:
                q = q + (v[i + 1] - v[i]) * ((p - x[i]) / width).clamp(0.0, 1.0)
    return torch.stack([1 - q, q], dim=1).to(probs.dtype)


def calibration_fit(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Calibration-in-the-large (the intercept of logit P(y) = α + logit(p), 0 when predictions are right on
    average; also observed/expected events) and the calibration slope (β of logit P(y) = α + β·logit(p); 1 is
    ideal, below 1 predictions too extreme, above 1 too timid). NaN with one class."""
    y = np.asarray(y, dtype=np.float64)
    z = logit(p)
    out = {"citl": math.nan, "slope": math.nan, "intercept": math.nan,
           "observed_expected": float(y.mean() / max(np.mean(np.clip(p, _EPS, 1)), _EPS)) if len(y) else math.nan}
    if len(np.unique(y)) < 2:
        return out
    intercept, slope = logistic_fits(y[None], z[None])
    out.update(citl=float(citl_fits(y[None], z[None])[0]), slope=float(slope[0]), intercept=float(intercept[0]))
    return out


def logistic_fits(y: np.ndarray, z: np.ndarray, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Intercept and slope of logit P(y) = a + b·z for each row of (R, n) at once (Newton–Raphson from a = 0,
    b = 1 with step halving, the slope lightly ridged so a separable sample stays finite)."""
    y, z = np.asarray(y, dtype=np.float64), np.asarray(z, dtype=np.float64)
    r = len(y)
    a, b = np.zeros(r), np.ones(r)
    ridge = 1e-4

    def loglik(a, b):
        eta = a[:, None] + b[:, None] * z
        return (y * eta - np.logaddexp(0, eta)).sum(1) - 0.5 * ridge * b ** 2

    current = loglik(a, b)
    for _ in range(iters):
        q = 1 / (1 + np.exp(-np.clip(a[:, None] + b[:, None] * z, -30, 30)))
        w = q * (1 - q) + 1e-9
        ga, gb = (y - q).sum(1), ((y - q) * z).sum(1) - ridge * b
        haa, hab, hbb = w.sum(1), (w * z).sum(1), (w * z * z).sum(1) + ridge
        det = haa * hbb - hab ** 2
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        step = np.ones(r)
        for _ in range(30):  # halve each row's step until its likelihood does not fall
            trial = loglik(a + step * da, b + step * db)
            worse = trial < current - 1e-12
            if not worse.any():
                break
            step = np.where(worse, step / 2, step)
        a, b = a + step * da, b + step * db
        previous, current = current, loglik(a, b)
        if np.all(np.abs(current - previous) < 1e-10):
            break
    return a, b


def citl_fits(y: np.ndarray, z: np.ndarray, iters: int = 60) -> np.ndarray:
    """Calibration-in-the-large of each row: the intercept α of logit P(y) = α + z, z the logit taken as an
    offset."""
    a = np.zeros(len(y))
    for _ in range(iters):
        q = 1 / (1 + np.exp(-np.clip(a[:, None] + z, -30, 30)))
        a = a + np.clip((y - q).sum(1) / ((q * (1 - q)).sum(1) + 1e-12), -2, 2)  # bounded steps: no overshoot
    return a
