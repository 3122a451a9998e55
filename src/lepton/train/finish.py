"""The end of a run: curves, the val set kept for precision checks, the task's decision fitted on val, the measured
cost of an answer and ``run.json`` — what makes a run directory complete — and the run's headline numbers."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton.config import TrainConfig
from lepton.models.precision import cpu_model, matrix_flags
from lepton.rundir import CURVES, TRACKED, RunDir
from lepton.runs import Run, load_run
from lepton.tasks import Task
from lepton.tracking.base import Tracker
from lepton.train import distributed
from lepton.train.checkpoint import VAL_SET_FILE, save_val_set
from lepton.train.data import (
    Prepared,
    val_outputs,
    val_targets,
)
from lepton.train.distributed import Dist

#: The run directory's files a tracked run stores with it (``lepton.rundir.TRACKED``).
TRACKED_FILES = TRACKED



def finish_run(run_dir: Path, config: TrainConfig, task: Task, prepared: Prepared, history, best, chosen, seconds,
               device, precision: str, dist: Dist = distributed.SINGLE, tracker: Tracker | None = None,
               extra: dict[str, Any] | None = None) -> Run:
    """Curves, the task's decision fitted on val with the best weights, and ``run.json`` (with ``extra``, and the
    measured cost of an answer): the run is complete. Other ways of training a run (``lepton.distill``) end here
    too, so their runs are complete in the same sense."""
    from lepton.plots import plot_curves

    files = RunDir(run_dir)
    plot_curves(history, files.file(CURVES))
    model = files.load_model(device=device)
    outputs = val_outputs(model, prepared, task.activate, tta=config.tta, device=device,
                          batch_size=config.batch_size)
    # for checking lower serving precisions of this run once registered (lepton.precision)
    save_val_set(run_dir / VAL_SET_FILE, task, prepared.x_val, prepared.y_val, prepared.x_train, prepared.spec,
                 seed=config.seed)
    if chosen is None:
        best_row = next(h for h in history if h["epoch"] == best["epoch"] and h.get("member", 1) == 1)
        selected = {k: v for k, v in best_row.items() if k.startswith("val_") and k != "val_loss"}
        ensemble = {}
    else:  # several members: the ensemble or the best of them, chosen on val
        best = chosen["best"]
        selected = {k: v for k, v in chosen["metrics"].items() if k != "val_loss"}
        ensemble = {"members": chosen["members"], "members_trained": len(chosen["member_val"]),
                    "member_val": chosen["member_val"], "ensemble_val": chosen["ensemble_val"]}
    info = {
        "status": "complete", "name": config.name, "task": task.name, "model": config.model, "epochs": len(history),
        "best_epoch": best["epoch"], **ensemble, **selected,
        **task.fit_decision(val_targets(prepared.y_val), outputs),
        "train_images": len(prepared.y_train), "val_images": len(prepared.y_val),
        "images_per_s": float(np.mean([h["images_per_s"] for h in history])),
        "wall_seconds_this_call": round(seconds, 2), "device": device, "precision": precision,
        "cpu": {"model": cpu_model(), "flags": matrix_flags()}, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "pid": os.getpid(), **(extra or {}),
    }
    if dist.enabled:
        info["distributed"] = {
            "processes": dist.world, "backend": "nccl" if device.startswith("cuda") else "gloo",
            "batch_per_process": config.batch_size, "effective_batch_size": config.batch_size * dist.world,
            "lr": config.lr, "lr_scaling": config.lr_scaling,
            "effective_lr": config.lr * distributed.LR_SCALING[config.lr_scaling](dist.world),
            "restarts": dist.restarts}
    from lepton.cost import measure_cost

    # What each answer of this run costs, timed on its own input shape (the predict path, members and TTA as served).
    info["cost"] = measure_cost(model.eval(), (prepared.spec.channels, *prepared.spec.size), task.activate,
                                tta=config.tta, device=device, windows=task.on_grid)
    files.write_info(info)
    if tracker is not None:  # the run's figures, its files and its model, for the trackers
        final = {f"final/{k}": v for k, v in info.items() if k.startswith(("val_", "threshold"))
                 and k != "val_images" and isinstance(v, int | float) and not isinstance(v, bool)}
        tracker.log_metrics(final, len(history))
        tracker.log_artifacts([run_dir / f for f in TRACKED_FILES], "run")
        tracker.log_artifacts([run_dir / "tracking" / "tracking.json"], "run/tracking")
        tracker.log_model(model)
    return load_run(run_dir, device=device)


def summary(run: Run) -> dict[str, Any]:
    """The headline numbers of a run, as JSON-ready values."""
    keys = ("task", "model", "epochs", "best_epoch", "members", *(k for k in run.info if k.startswith("val_")),
            "threshold", "precision", "images_per_s", "teacher")
    out = {"run": str(run.path), **{k: run.info.get(k) for k in dict.fromkeys(keys) if k in run.info}}
    cost = run.info.get("cost")
    if cost:  # the headline of the cost record: passes per image and fp32 ms/image at batch 1 and served batch
        fp32, b = cost["precisions"].get("fp32", {}), cost["serving_batch"]
        out["cost"] = {"forward_passes_per_image": cost["forward_passes_per_image"],
                       "fp32_ms_per_image_b1": fp32.get("ms_per_image_b1"),
                       f"fp32_ms_per_image_b{b}": fp32.get(f"ms_per_image_b{b}")}
    return out
