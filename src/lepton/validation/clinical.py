"""The clinical sections of an evaluation (``lepton.evaluate.evaluate`` calls ``clinical_sections``): subgroups,
the decision curve with operating points, and external validation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import DataError
from lepton.rundir import RunDir

log = logging.getLogger("lepton.validation")


def clinical_sections(run, subset, y, outputs, body: dict[str, Any], *, by: list[str], external: bool,
                      prevalence: float | None, min_size: int, n_bootstrap: int,
                      plots: Path | None) -> tuple[dict[str, Any], list[str]]:
    """The report keys (``subgroups``, ``decision``, ``external``, ``calibration_fit``; ``_plots`` the figures
    written) and Markdown lines for an evaluated split."""
    from lepton.validation import decision, subgroups

    task = run.task
    binary = task.binary_test(run.label_names)
    sections: dict[str, Any] = {"_plots": []}
    lines: list[str] = []
    if by:
        from lepton.validation.covariates import subgroup_columns

        columns = subgroup_columns(subset, by)
        if binary:
            p = np.asarray(outputs)[:, 1]
            pred = task.decide(np.asarray(outputs), run.info)
            scorer = subgroups.binary_scorer(np.asarray(y), p, pred)
            events = np.asarray(y)
        elif (per_unit := task.unit_scores(body, run.label_names)) is not None:  # e.g. each case's Dice
            scorer, events = subgroups.mean_scorer(per_unit[1], per_unit[0]), None
        else:
            scorer, events = subgroups.task_scorer(task, y, outputs, run.info), None
        table = subgroups.subgroup_metrics(columns, scorer, events=events, n_bootstrap=n_bootstrap,
                                           min_size=min_size, unit=task.unit)
        if binary:  # Fairlearn's intersectional view beside the per-column table
            frame = subgroups.fairlearn_frame(np.asarray(y), p, pred, columns)
            table["fairlearn"] = {"overall": _clean(frame.overall.to_dict()),
                                  "by_group": [{**dict(zip(columns, k if isinstance(k, tuple) else (k,),
                                                           strict=True)), **_clean(v)}
                                               for k, v in frame.by_group.to_dict("index").items()],
                                  "difference": _clean(frame.difference(method="between_groups").to_dict())}
        sections["subgroups"] = table
        lines += ["", "## Subgroups", "", *subgroups.markdown(table)]
        if plots is not None:
            sections["_plots"].append(str(_forest(table, plots / "subgroups.png")))
    if binary and len(np.unique(y)) > 1:
        p = np.asarray(outputs)[:, 1]
        curve = decision.decision_curve(y, p, prevalence=prevalence)
        points = decision.operating_points(y, p, decision.default_thresholds(y, p, run.info.get("threshold")),
                                           prevalence=prevalence)
        sections["decision"] = {**curve, "operating_points": points}
        lines += ["", "## Decision curve and operating points", "", *decision.markdown(curve, points)]
        if plots is not None:
            from lepton.plots import plot_decision_curve

            sections["_plots"].append(str(plot_decision_curve(curve, plots / "decision_curve.png")))
    if external:
        sections["external"], ext_lines = external_section(run, subset, y, outputs, binary=binary,
                                                           n_bootstrap=n_bootstrap)
        lines += ["", "## External validation", "", *ext_lines]
        if plots is not None and binary and sections["external"].get("calibration"):
            from lepton.plots import plot_calibration_curves

            sections["_plots"].append(str(plot_calibration_curves(
                {"external": (np.asarray(y), np.asarray(outputs)[:, 1])}, plots / "calibration_external.png")))
    return sections, lines


def _forest(table: dict[str, Any], path: Path) -> Path:
    from lepton.plots import plot_subgroups

    return plot_subgroups(table, table["metrics"][0], path)


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        v = v.item() if hasattr(v, "item") else v
        out[str(k)] = None if isinstance(v, float) and not np.isfinite(v) else v
    return out


def training_reference(run):
    """The run's training split, re-split exactly as in training; None (with a log line) when its source is not
    readable here."""
    from lepton.data.index.splits import assign_splits

    cfg, spec = run.config, run.preprocessing
    try:
        data = run.task.load(cfg.data, window=spec.window, slices=spec.slices, steps=spec.steps,
                             skip_bad=cfg.skip_bad)
    except DataError as exc:
        log.warning("the training data %s are not readable here (%s): comparing with the fingerprint only",
                    cfg.data, exc)
        return None
    splits = assign_splits(data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    return data.subset(splits == "train")


def external_section(run, subset, y, outputs, *, binary: bool, n_bootstrap: int) -> tuple[dict[str, Any], list[str]]:
    """The external set against the training data and fingerprint, and calibration on its labels."""

    from lepton.validation.covariates import covariate_table
    from lepton.validation.external import calibration_summary, compare_sets, markdown

    reference = training_reference(run)
    fingerprint = RunDir(run.path).read_data(default={})
    ext_intensity = None
    if run.preprocessing.fit == "resize":  # at the network's size, as the training fingerprint measured it
        means = [float(run.preprocessing.resize(subset.images[i:i + 256]).mean(dim=(1, 2, 3)).sum())
                 for i in range(0, len(subset), 256)]
        ext_intensity = sum(means) / max(len(subset), 1)
    result = compare_sets(reference.images if reference is not None else None, subset.images,
                          ref_columns=covariate_table(reference) if reference is not None else {},
                          ext_columns=covariate_table(subset), fingerprint=fingerprint,
                          ext_intensity=ext_intensity, n_bootstrap=n_bootstrap)
    calib = calibration_summary(np.asarray(y), np.asarray(outputs)[:, 1], n_bootstrap=n_bootstrap) \
        if binary else None
    if calib is not None:
        result["calibration"] = calib
    return result, markdown(result, calib)
