"""Decision curves (Vickers & Elkin 2006) and operating points of a binary classifier.

Net benefit at a threshold probability pₜ is what treating those above pₜ gains, in true positives per patient,
after charging each false positive at the odds pₜ / (1 − pₜ): NB = sens·π − (1 − spec)·(1 − π)·pₜ/(1 − pₜ), with π
the prevalence — the sample's, or a stated one (the sensitivity and specificity carry over; the counts do not).
Treating all: π − (1 − π)·pₜ/(1 − pₜ); treating none: 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lepton.errors import ConfigError

DEFAULT_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.01, 1.0, 0.01))


def _rates(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float]:
    pred = p >= t
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else math.nan
    spec = float((~pred[neg]).mean()) if neg.any() else math.nan
    return sens, spec


def check_prevalence(prevalence: float | None) -> float | None:
    if prevalence is not None and not (isinstance(prevalence, int | float) and 0 < prevalence < 1):
        raise ConfigError(f"prevalence must be a proportion strictly between 0 and 1 (got {prevalence!r})")
    return None if prevalence is None else float(prevalence)


def decision_curve(y: np.ndarray, p: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *,
                   prevalence: float | None = None) -> dict[str, Any]:
    """Net benefit of the model, of treating all and of treating none at each threshold probability in (0, 1)."""
    y, p = np.asarray(y).astype(np.int64), np.asarray(p, dtype=np.float64)
    prev = check_prevalence(prevalence)
    pi = prev if prev is not None else float(y.mean())
    rows = []
    for t in thresholds:
        if not 0 < t < 1:
            raise ConfigError(f"decision-curve thresholds must lie strictly between 0 and 1 (got {t})")
        sens, spec = _rates(y, p, t)
        odds = t / (1 - t)
        model = sens * pi - (1 - spec) * (1 - pi) * odds
        rows.append({"threshold": float(t), "model": _round(model), "treat_all": _round(pi - (1 - pi) * odds),
                     "treat_none": 0.0})
    useful = [r["threshold"] for r in rows if r["model"] is not None
              and r["model"] > max(r["treat_all"], 0.0) + 1e-12]
    return {"prevalence": pi, "prevalence_source": "stated" if prev is not None else "sample", "curve": rows,
            "useful_range": [min(useful), max(useful)] if useful else None}


def operating_points(y: np.ndarray, p: np.ndarray, thresholds: Mapping[str, float], *,
                     prevalence: float | None = None) -> list[dict[str, Any]]:
    """Sensitivity, specificity, PPV and NPV (at the stated ``prevalence``, else the sample's) and net benefit at
    each named threshold on P(positive)."""
    y, p = np.asarray(y).astype(np.int64), np.asarray(p, dtype=np.float64)
    prev = check_prevalence(prevalence)
    pi = prev if prev is not None else float(y.mean())
    rows = []
    for name, t in thresholds.items():
        sens, spec = _rates(y, p, t)
        tp, fp = sens * pi, (1 - spec) * (1 - pi)
        fn, tn = (1 - sens) * pi, spec * (1 - pi)
        odds = t / (1 - t) if 0 < t < 1 else math.nan
        rows.append({"rule": name, "threshold": float(t), "sensitivity": _round(sens), "specificity": _round(spec),
                     "ppv": _round(tp / (tp + fp)) if tp + fp > 0 else None,
                     "npv": _round(tn / (tn + fn)) if tn + fn > 0 else None,
                     "flagged": _round(float((p >= t).mean())), "prevalence": pi,
                     "net_benefit": _round(tp - fp * odds) if math.isfinite(odds) else None})
    return rows


def threshold_for(y: np.ndarray, p: np.ndarray, *, sensitivity: float | None = None,
                  specificity: float | None = None) -> float:
    """The highest threshold reaching a sensitivity, or the lowest reaching a specificity (alternative operating
    points for the table)."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    candidates = np.unique(p)[::-1]
    if sensitivity is not None:
        for t in candidates:
            if _rates(y, p, t)[0] >= sensitivity:
                return float(t)
        return float(candidates[-1])
    for t in candidates[::-1]:
        if _rates(y, p, t)[1] >= (specificity or 0):
            return float(t)
    return float(candidates[0])


def default_thresholds(y: np.ndarray, p: np.ndarray, chosen: float | None) -> dict[str, float]:
    """The chosen threshold (the run's, else 0.5), 0.5, and those giving 90 % sensitivity and 90 % specificity."""
    out = {"chosen": float(chosen) if chosen is not None else 0.5}
    if chosen is not None:
        out["0.5"] = 0.5
    if len(np.unique(y)) > 1:
        out["sensitivity≥0.90"] = threshold_for(y, p, sensitivity=0.90)
        out["specificity≥0.90"] = threshold_for(y, p, specificity=0.90)
    return out


def markdown(curve: dict[str, Any], points: list[dict[str, Any]]) -> list[str]:
    """The operating-point table and the decision curve's summary as Markdown lines."""
    prev = f"{curve['prevalence']:.3f} ({curve['prevalence_source']})"
    lines = [f"Prevalence used for PPV, NPV and net benefit: {prev}.", "",
             "| rule | threshold | sensitivity | specificity | PPV | NPV | flagged | net benefit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in points:
        lines.append(f"| {r['rule']} | {r['threshold']:.3f} | {_f(r['sensitivity'])} | {_f(r['specificity'])} | "
                     f"{_f(r['ppv'])} | {_f(r['npv'])} | {_f(r['flagged'])} | {_f(r['net_benefit'])} |")
    rng = curve["useful_range"]
    lines += ["", "Net benefit above both treat-all and treat-none for threshold probabilities "
              + (f"{rng[0]:.2f} to {rng[1]:.2f} (not necessarily every one between)." if rng else
                 "nowhere on the grid: the model adds nothing over the default strategies."), ""]
    picks = [r for r in curve["curve"] if round(r["threshold"], 2) in (0.05, 0.1, 0.2, 0.3, 0.5)]
    if picks:
        lines += ["| threshold probability | model | treat all | treat none |", "|---|---|---|---|"]
        lines += [f"| {r['threshold']:.2f} | {_f(r['model'])} | {_f(r['treat_all'])} | 0 |" for r in picks]
        lines.append("")
    return lines


def _round(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
