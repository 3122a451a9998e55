"""Metrics per subgroup (sex, age band, manufacturer, site, view, …) with bootstrap 95 % CIs over the task's unit
(an image for classification, a case for segmentation), each subgroup's gap to the rest of the data with its CI,
the largest gap per column, and a flag where a subgroup is too small to judge.

Binary classification is scored by Fairlearn's ``MetricFrame`` (AUC, sensitivity, specificity at the run's decision
threshold); the bootstrap resamples each subgroup and the rest apart (AUC by ranks, vectorised). A dense task is
scored per case by its own report (``Task.report``'s per-case Dice), and the subgroup figure is the mean over its
cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lepton.validation.covariates import AGE_BANDS, MISSING

#: Below these a subgroup's figures are reported but flagged as too small to judge.
MIN_SIZE = 30
MIN_EVENTS = 5
#: Levels listed even when no image has them (a subgroup of size 0 is reported, not silently dropped).
KNOWN_LEVELS = {"sex": ("F", "M"), "age_band": tuple(name for _, name in AGE_BANDS)}


def rank_auc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores`` (R, n) against labels ``y`` (R, n) in {0, 1} (Mann–Whitney, ties
    averaged); NaN for a row with one class."""
    from scipy.stats import rankdata

    y = np.atleast_2d(y).astype(bool)
    ranks = rankdata(np.atleast_2d(scores), axis=1)
    pos = y.sum(1)
    neg = y.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(1) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def binary_scorer(y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> tuple[list[str], Callable]:
    """Metric names and a function from index arrays (R, m) to figures (R,) per name, for a binary classifier."""
    def score(idx: np.ndarray) -> dict[str, np.ndarray]:
        yy, pp, dd = y[idx], p[idx], pred[idx]
        pos, neg = yy.sum(1), (1 - yy).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = np.where(pos > 0, (dd * yy).sum(1) / pos, np.nan)
            spec = np.where(neg > 0, ((1 - dd) * (1 - yy)).sum(1) / neg, np.nan)
        return {"auc": rank_auc(yy, pp), "sensitivity": sens, "specificity": spec}

    return ["auc", "sensitivity", "specificity"], score


def mean_scorer(values: np.ndarray, name: str) -> tuple[list[str], Callable]:
    """A per-unit figure (a case's Dice) averaged over the unit's subgroup."""
    values = np.asarray(values, dtype=np.float64)

    def score(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.nanmean(values[idx], axis=1) if idx.shape[1] else np.full(len(idx), np.nan)}

    return [name], score


def task_scorer(task, y, outputs, info: Mapping[str, Any]) -> tuple[list[str], Callable]:
    """Any task's own headline figures (``Task.scores``) on each resample (slower: one call per resample)."""
    names = list(task.scores(y, outputs, info))

    def score(idx: np.ndarray) -> dict[str, np.ndarray]:
        rows = [task.scores(_take(y, i), _take(outputs, i), info) for i in idx]
        return {k: np.asarray([r[k] for r in rows], dtype=np.float64) for k in names}

    return names, score


def _take(a, idx):
    return a[idx] if isinstance(a, np.ndarray) else [a[i] for i in idx]


def _ci(values: np.ndarray) -> list[float] | None:
    v = values[np.isfinite(values)]
    if len(v) < max(10, len(values) // 2):  # most resamples undefined (one class): no interval
        return None
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


def _resample(members: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return members[rng.integers(0, len(members), size=(n, len(members)))] if len(members) else \
        np.zeros((n, 0), dtype=np.int64)


def subgroup_metrics(
    columns: Mapping[str, np.ndarray], scorer: tuple[list[str], Callable], *, events: np.ndarray | None = None,
    n_bootstrap: int = 1000, min_size: int = MIN_SIZE, min_events: int = MIN_EVENTS, seed: int = 0,
    unit: str = "image",
) -> dict[str, Any]:
    """Per column and subgroup: size, figures, 95 % CIs, the gap to the rest (subgroup − rest) with its CI, and
    ``too_small`` (fewer than ``min_size`` units, or with ``events`` — the positive class — fewer than
    ``min_events`` positives or negatives). ``largest_gap`` per column and metric is the subgroup, among those
    large enough, furthest from the rest; ``clear`` when its CI excludes 0."""
    names, score = scorer
    rng = np.random.default_rng(seed)
    n_boot = max(int(n_bootstrap), 0)
    result: dict[str, Any] = {"unit": unit, "metrics": names, "min_size": min_size, "min_events": min_events,
                              "bootstrap": n_boot, "columns": {}}
    for column, values in columns.items():
        values = np.asarray(values, dtype=object)
        levels = sorted(set(values.tolist()) | set(KNOWN_LEVELS.get(column, ())),
                        key=lambda v: (v == MISSING, _order(column, v)))
        groups = []
        for level in levels:
            members = np.flatnonzero(values == level)
            rest = np.flatnonzero(values != level)
            entry: dict[str, Any] = {"group": level, "n": len(members)}
            if events is not None:
                entry["positives"] = int(events[members].sum())
                entry["negatives"] = int(len(members) - entry["positives"])
            reasons = []
            if len(members) < min_size:
                reasons.append(f"{len(members)} {unit}s (< {min_size})")
            if events is not None and min(entry["positives"], entry["negatives"]) < min_events:
                reasons.append(f"{min(entry['positives'], entry['negatives'])} in the rarer class (< {min_events})")
            entry["too_small"] = bool(reasons)
            entry["reason"] = "; ".join(reasons) or None
            if len(members) == 0:
                entry.update(metrics={k: None for k in names}, ci95={k: None for k in names},
                             gap={k: None for k in names}, gap_ci95={k: None for k in names})
                groups.append(entry)
                continue
            point = score(members[None])
            rest_point = score(rest[None]) if len(rest) else {k: np.array([np.nan]) for k in names}
            entry["metrics"] = {k: _num(point[k][0]) for k in names}
            entry["gap"] = {k: _num(point[k][0] - rest_point[k][0]) for k in names}
            if n_boot and len(members) > 1:
                boot = score(_resample(members, n_boot, rng))
                rest_boot = score(_resample(rest, n_boot, rng)) if len(rest) else None
                entry["ci95"] = {k: _ci(boot[k]) for k in names}
                entry["gap_ci95"] = {k: (_ci(boot[k] - rest_boot[k]) if rest_boot is not None else None)
                                     for k in names}
            else:
                entry["ci95"] = {k: None for k in names}
                entry["gap_ci95"] = {k: None for k in names}
            groups.append(entry)
        largest = {}
        for k in names:
            judged = [g for g in groups if not g["too_small"] and g["gap"][k] is not None]
            if not judged:
                largest[k] = None
                continue
            worst = max(judged, key=lambda g: abs(g["gap"][k]))
            ci = worst["gap_ci95"][k]
            largest[k] = {"group": worst["group"], "gap": worst["gap"][k], "ci95": ci,
                          "clear": bool(ci is not None and (ci[0] > 0 or ci[1] < 0))}
        result["columns"][column] = {"groups": groups, "largest_gap": largest}
    return result


def _order(column: str, value: str):
    known = KNOWN_LEVELS.get(column, ())
    return (0, known.index(value), "") if value in known else (1, 0, str(value))


def _num(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def fairlearn_frame(y: np.ndarray, p: np.ndarray, pred: np.ndarray, columns: Mapping[str, np.ndarray]):
    """Fairlearn's ``MetricFrame`` of a binary classifier over the subgroup columns together (intersections):
    count, AUC, sensitivity (true-positive rate) and specificity (true-negative rate) per combination."""
    import pandas as pd
    from fairlearn.metrics import MetricFrame, count, true_negative_rate, true_positive_rate

    def auc(y_true, y_pred, scores):
        value = rank_auc(np.asarray(y_true), np.asarray(scores))[0]
        return float(value)

    return MetricFrame(
        metrics={"count": count, "auc": auc, "sensitivity": true_positive_rate, "specificity": true_negative_rate},
        y_true=y, y_pred=pred, sensitive_features=pd.DataFrame({k: list(v) for k, v in columns.items()}),
        sample_params={"auc": {"scores": p}})


def markdown(table: dict[str, Any]) -> list[str]:
    """The subgroup table as Markdown lines: one table per column, then the largest gaps."""
    names = table["metrics"]
    lines = [f"Bootstrap 95 % CIs over {table['unit']}s ({table['bootstrap']} resamples); gap = subgroup − rest; "
             f"⚠ too small to judge (< {table['min_size']} {table['unit']}s"
             + (f" or < {table['min_events']} in the rarer class)" if "auc" in names else ")"), ""]
    for column, entry in table["columns"].items():
        lines += [f"### By {column}", "",
                  "| subgroup | n | " + " | ".join(f"{k} [95 % CI] | gap to rest [95 % CI]" for k in names) + " |",
                  "|---|---|" + "---|---|" * len(names)]
        for g in entry["groups"]:
            cells = []
            for k in names:
                cells.append(f"{_f(g['metrics'][k])} {_interval(g['ci95'][k])}")
                cells.append(f"{_signed(g['gap'][k])} {_interval(g['gap_ci95'][k])}")
            flag = " ⚠" if g["too_small"] else ""
            size = f"{g['n']}" + (f" ({g['positives']}+)" if "positives" in g else "")
            lines.append(f"| {g['group']}{flag} | {size} | " + " | ".join(cells) + " |")
        lines.append("")
        for k, gap in entry["largest_gap"].items():
            if gap is None:
                lines.append(f"- Largest {k} gap: none judged (every subgroup too small)")
            else:
                lines.append(f"- Largest {k} gap: {gap['group']} {_signed(gap['gap'])} {_interval(gap['ci95'])}"
                             + (" — the CI excludes 0" if gap["clear"] else " — the CI includes 0"))
        lines.append("")
    return lines


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _interval(ci: list[float] | None) -> str:
    return "" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
