"""Evaluation: a run scored on a split, with the task's metrics (CIs, calibration, …), a report and plots."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lepton.errors import DataError, RunError
from lepton.tasks.metrics import (  # noqa: F401  (the classification metrics' public home before tasks)
    auc_score,
    bootstrap_ci,
    calibration,
    classification_metrics,
    youden_threshold,
)

log = logging.getLogger("lepton.evaluate")


def evaluate(
    run,
    data: str | Path | None = None,
    *,
    split: str = "test",
    output: str | Path | None = None,
    n_bootstrap: int = 1000,
    skip_bad: bool = False,
    plots: bool = True,
    track: str | list[str] | None = None,
    by: Sequence[str] | None = None,
    external: bool = False,
    prevalence: float | None = None,
    min_size: int = 30,
) -> dict[str, Any]:
    """Evaluate a run (a ``Run`` or its directory) on a split and write a report.

    Without ``data`` the run's own source is re-split exactly as in training. A different source
    is evaluated on its ``split`` if it defines splits, else on all of its images. Writes
    ``report.json``, ``report.md`` and ROC, confusion-matrix and reliability PNGs to ``output``
    (default ``RUN/eval/<split>``) and returns the report. The figures, with their CIs, and the files go to the
    trackers ``track`` names (``lepton.tracking``), by default to those the run was trained with.

    Clinical validation (``lepton.validation``): ``by`` names subgroup columns (``sex``, ``age_band``, ``view``,
    ``manufacturer``, ``site``, a manifest's own columns) scored per subgroup with CIs and gaps (subgroups under
    ``min_size`` flagged); a binary classifier also gets its decision curve and operating points (PPV and NPV at
    ``prevalence``, else the sample's); ``external`` compares ``data`` — another site's — with the training data
    and reports calibration there.
    """
    from lepton.runs import Run, load_run
    from lepton.utils import atomic_write_json, atomic_write_text

    run = run if isinstance(run, Run) else load_run(run)
    cfg = run.config
    source = str(data) if data is not None else cfg.data
    if external and (data is None or str(data) == cfg.data):
        raise DataError("--external compares another site's data with the training data: pass that data with "
                        f"--data (the run was trained on {cfg.data})")
    subset, used = select_split(run, data, split, skip_bad=skip_bad, cached=not external and not by and
                                _trained_from_cache(run))
    same_source = source == cfg.data
    y = run.task.targets(subset)
    # (segmentation: each case at its own size, with its spacing for distances in mm)
    outputs, extra = run.task.evaluation_outputs(run, subset)
    report: dict[str, Any] = {"run": str(run.path), "task": run.task.name, "model": cfg.model, "data": source,
                              "split": used, "images": len(y)}
    out = Path(output) if output else run.path / "eval" / (used if same_source else f"{Path(source).stem}-{used}")
    out.mkdir(parents=True, exist_ok=True)
    body, lines = run.task.report(y, outputs, run.label_names, run.info, n_bootstrap=n_bootstrap,
                                  plots=out if plots else None, **extra)
    report.update(body)
    report["output"] = str(out)
    markdown = [f"# Evaluation: {run.path.name}", "", f"- Model: `{cfg.model}` ({run.task.name})",
                f"- Data: `{source}`, split **{used}**, {len(y)} images", *lines]
    if run.task.prediction_table:
        _write_predictions(out / "predictions.csv", subset.names, y, outputs, run.label_names)
    from lepton.validation.clinical import clinical_sections

    sections, extra_lines = clinical_sections(
        run, subset, y, outputs, body, by=list(by or []), external=external, prevalence=prevalence,
        min_size=min_size, n_bootstrap=n_bootstrap, plots=out if plots else None)
    extra_plots = sections.pop("_plots", [])
    report.update(sections)
    if extra_plots:
        report.setdefault("plots", []).extend(extra_plots)
    markdown += extra_lines
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", "\n".join(markdown) + "\n")
    from lepton.tracking.base import with_cis
    from lepton.tracking.compare import report_figures
    from lepton.tracking.factory import log_report

    log_report(run.path, track, kind="evaluate", folder=f"eval/{out.name}", text="\n".join(markdown),
               metrics={"images": len(y), **with_cis(report_figures(report))},
               files=[out / "report.json", out / "report.md", *map(Path, report.get("plots", []))])
    return report


def _write_predictions(path: Path, names: list[str], y, outputs, labels: list[str]) -> None:
    """Each evaluated image's true class and probabilities (a CSV the validation report reads back)."""
    import csv
    import io

    from lepton.utils import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["name", "label", *[f"p_{n}" for n in labels]])
    for name, t, row in zip(names, y, outputs, strict=True):
        writer.writerow([name, int(t), *[f"{float(v):.6f}" for v in row]])
    atomic_write_text(path, buf.getvalue())


def _trained_from_cache(run) -> bool:
    """Whether the run read its data from the case cache (``data.json``'s engine) and its task scores images read
    batch by batch (the ``stream_eval`` capability)."""
    from lepton.rundir import RunDir

    try:
        engine = RunDir(run.path).read_data().get("engine")
    except RunError:
        return False
    return engine == "cache" and "stream_eval" in run.task.capabilities


def select_split(run, data: str | Path | None, split: str, *, skip_bad: bool = False, cached: bool = False):
    """The images a run is evaluated on, and the split name actually used.

    Without ``data`` the run's own source is re-split exactly as in training; another source is used
    at its ``split`` if it defines splits, else whole (split name ``all``). ``cached``: the source is read through
    the case cache (``Task.load_cases``) where the task can, so the split is chosen from metadata and its images
    are read a batch at a time (``Task.evaluation_outputs``), as the run was trained.
    """
    from lepton.data.index.splits import assign_splits

    cfg, spec = run.config, run.preprocessing
    source = str(data) if data is not None else cfg.data
    same_source = source == cfg.data
    skip = skip_bad or (same_source and cfg.skip_bad)
    dataset = None
    if cached:
        side = spec.size[-1] if len(set(spec.size)) == 1 else None  # the pixels training stored
        dataset = run.task.load_cases(source, window=spec.window, steps=spec.steps, skip_bad=skip,
                                      cache_dir=cfg.cache_dir, workers=cfg.workers, quiet=True, slices=spec.slices,
                                      image_size=side)
    if dataset is None:
        dataset = run.task.load(source, window=spec.window, slices=spec.slices, steps=spec.steps, skip_bad=skip)
    _check_labels(dataset.label_names, run.label_names, source)
    if same_source:
        splits = assign_splits(dataset, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                               seed=cfg.seed)
    else:
        splits = dataset.splits
    available = sorted(set(splits.tolist()) - {""})
    if not available:
        log.info("%s defines no splits: using all %d images", source, len(dataset))
        return dataset, "all"
    if split not in available:
        raise DataError(f"{source}: has no {split!r} split; available: {', '.join(available)}")
    if same_source and split == "train":
        log.warning("evaluating on the training split: figures are optimistic")
    return dataset.subset(splits == split), split


def _check_labels(found: list[str], expected: list[str], source: str) -> None:
    if found == expected:
        return
    if found == [str(i) for i in range(len(found))] and len(found) <= len(expected):
        log.warning("%s has unnamed labels; taking 0..%d as %s", source, len(found) - 1, expected)
        return
    raise DataError(f"{source}: classes {found} do not match the run's classes {expected}")
