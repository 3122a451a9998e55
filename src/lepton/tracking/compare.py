"""Runs side by side, from their directories alone: ``lepton runs list`` (every run under a folder, with its state
and headline figures) and ``lepton runs compare`` (configuration differences, figures with their confidence
intervals, and the curves overlaid in one image)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lepton.errors import RunError
from lepton.rundir import CONFIG, HISTORY, LAST, RunDir
from lepton.tracking.base import flat_params, read_record

#: Configuration keys that name a run rather than say how it was trained.
IDENTITY_KEYS = {"name", "output_dir"}
#: Most panels in an overlay: train and val loss, then the validation figures all runs share.
MAX_PANELS = 6


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _info(run_dir: Path) -> dict[str, Any]:
    """``run.json``, or nothing while the run has none (still training) or an unreadable one."""
    try:
        return RunDir(run_dir).read_info(default={})
    except RunError:
        return {}


def _config(run_dir: Path) -> dict[str, Any]:
    """What a run's ``config.yaml`` says, flat (a grouped one flattened), unvalidated."""
    if not (run_dir / CONFIG).is_file():
        raise RunError(f"{run_dir}: not a run directory (no config.yaml)")
    return RunDir(run_dir).read_config_values()


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """``history.csv`` as rows of numbers (empty cells and non-numbers left out)."""
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            numbers = {}
            for key, value in row.items():
                try:
                    numbers[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(numbers)
    return rows


def _state(run_dir: Path, info: dict[str, Any]) -> str:
    if info.get("status") == "complete":
        return "complete"
    return "stopped or training" if (run_dir / LAST).is_file() else "started"


def _reports(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: _json(p) for p in sorted(Path(run_dir).glob("eval/*/report.json"))}


#: Sections of a report not searched for figures: the CIs themselves, calibration curves, a segmentation report's
#: lesion-level "detection" table (sensitivities at fixed false-positive rates), class counts.
NOT_FIGURES = frozenset({"ci95", "calibration", "detection", "class_counts"})


def report_figures(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An evaluation report's figures that carry a 95 % CI (classification: the primary decision rule's; dense
    tasks: the mean and per-class ones), plus its calibration error: ``{name: {"value", "ci95"}}``."""
    out: dict[str, dict[str, Any]] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        cis = node.get("ci95") if isinstance(node.get("ci95"), dict) else {}
        for key, value in node.items():
            if isinstance(value, dict) and key not in NOT_FIGURES:
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, int | float) and not isinstance(value, bool):
                ci = cis.get(key) or node.get(f"{key}_ci95")
                if ci or key == "ece":
                    out[f"{prefix}{key}"] = {"value": float(value), "ci95": list(ci) if ci else None}

    metrics = report.get("metrics")
    primary = report.get("primary_threshold")
    if isinstance(metrics, dict) and primary in metrics:
        walk(metrics[primary], "")
        out["ece"] = {"value": report["ece"], "ci95": None} if "ece" in report else out.get("ece")
    else:
        walk({k: v for k, v in report.items() if k not in ("cases", "metrics")}, "")
    return {k: v for k, v in out.items() if v is not None}


def describe_run(run_dir: Path) -> dict[str, Any]:
    """One run directory as a row: state, task, network, epochs, best epoch, validation and test figures, where it
    was tracked."""
    run_dir = Path(run_dir)
    config = _config(run_dir)
    info, history, record = _info(run_dir), read_history(run_dir), read_record(run_dir)
    last = history[-1] if history else {}
    val = {k: v for k, v in info.items() if k.startswith("val_") and isinstance(v, int | float)} or {
        k: v for k, v in last.items() if k.startswith("val_")}
    tests = {split: report_figures(rep) for split, rep in _reports(run_dir).items()}
    tracked = [*(["tensorboard"] if "tensorboard" in record else []),
               *([f"mlflow {record['mlflow'].get('run_id') or 'offline'}"] if record.get("mlflow") else [])]
    return {"name": run_dir.name, "path": str(run_dir), "status": _state(run_dir, info),
            "task": info.get("task") or config.get("task", "classification"), "model": config.get("model"),
            "epochs": len(history), "best_epoch": info.get("best_epoch"), "val": val,
            "eval": {split: {k: f["value"] for k, f in figs.items()} for split, figs in tests.items()},
            "tracking": tracked, "finished": info.get("finished")}


def list_runs(root: Path | str = "runs") -> list[dict[str, Any]]:
    """Every run directory directly under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root}: no such folder of runs")
    dirs = [p for p in root.iterdir() if (p / CONFIG).is_file()]
    return [describe_run(p) for p in sorted(dirs, key=lambda p: (p / CONFIG).stat().st_mtime, reverse=True)]


def _labels(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def compare_runs(paths: list[Path | str]) -> dict[str, Any]:
    """Runs side by side: the configuration keys whose values differ, every figure of each run (validation figures
    from ``run.json``, test figures with their 95 % CIs from ``eval/*/report.json``), and the histories."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise RunError("compare needs two runs or more")
    labels = _labels(paths)
    configs = [flat_params(_config(p)) for p in paths]
    keys = sorted({k for c in configs for k in c} - IDENTITY_KEYS)
    config = {k: [c.get(k) for c in configs] for k in keys if len({c.get(k) for c in configs}) > 1}
    figures: list[dict[str, dict[str, Any]]] = []
    for path in paths:
        info, mine = _info(path), {}
        for key in ("epochs", "best_epoch", "threshold", "images_per_s", "wall_seconds_this_call"):
            if isinstance(info.get(key), int | float):
                mine[key] = {"value": float(info[key]), "ci95": None}
        mine.update({k: {"value": float(v), "ci95": None} for k, v in info.items()
                     if k.startswith("val_") and isinstance(v, int | float)})
        for split, report in _reports(path).items():
            mine.update({f"{split}.{k}": f for k, f in report_figures(report).items()})
        figures.append(mine)
    names = sorted({k for f in figures for k in f}, key=lambda k: (k.count("."), k))
    return {"runs": labels, "paths": [str(p) for p in paths], "config": config,
            "metrics": {k: [f.get(k) for f in figures] for k in names},
            "history": {label: read_history(p) for label, p in zip(labels, paths, strict=True)}}


def plot_compare(compared: dict[str, Any], path: Path) -> dict[str, Any]:
    """The runs' curves overlaid, one panel per figure (train and val loss, then the validation figures every run
    has), one line per run, written to ``path`` (PNG). Returns what the figure holds, read from its axes: pixel size
    and, per panel, its title, axis labels and lines (label, x, y); also written beside the image as JSON."""
    from lepton.plots import _figure, _save

    histories = compared["history"]
    shared = set.intersection(*(set().union(*rows) if rows else set() for rows in histories.values()))
    panels = [k for k in ("train_loss", "val_loss") if k in shared]
    panels += sorted(k for k in shared if k.startswith("val_") and k not in panels)
    panels = panels[:MAX_PANELS]
    if not panels:
        raise RunError("the runs share no figure in their histories: nothing to overlay")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    plt, fig, axes = _figure(rows, cols, (4.5 * cols, 3.6 * rows))
    axes = list(getattr(axes, "flat", [axes]))
    for ax, key in zip(axes, panels, strict=False):
        for label, history in histories.items():
            ax.plot([h["epoch"] for h in history], [h[key] for h in history], "o-", ms=3, label=label)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.axis("off")
    width, height = (fig.get_size_inches() * 110).round().astype(int).tolist()
    drawn = {"path": str(path), "size": [width, height], "axes": [
        {"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
         "lines": [{"label": line.get_label(), "x": [float(v) for v in line.get_xdata()],
                    "y": [float(v) for v in line.get_ydata()]} for line in ax.get_lines()]}
        for ax in axes[:len(panels)]]}
    _save(plt, fig, Path(path))
    Path(path).with_suffix(".json").write_text(json.dumps(drawn, indent=1))
    return drawn
