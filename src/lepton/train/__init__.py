"""Training: a run directory driven through the task's loss and metrics, with AdamW, warm-up + cosine/step
schedules, class imbalance, EMA, early stopping, a time budget, atomic per-epoch checkpoints and exact resume.

The parts live beside this file: ``data`` (load, split, preprocess), ``loop`` (``Trainer``: epoch, step,
validation, state), ``optim`` (optimiser, schedule, EMA), ``checkpoint`` (best/last/history files),
``budget`` (the wall-clock plan) and ``progress`` (what the terminal shows).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton.config import TrainConfig, make_config
from lepton.data.transforms import Preprocessing
from lepton.errors import ConfigError, RunError
from lepton.models import create_model
from lepton.models.layout import model_layout
from lepton.models.precision import cpu_model, matrix_flags
from lepton.precision import VAL_SET_FILE, save_val_set
from lepton.runs import Run, load_run, predict_outputs
from lepton.tasks import Task, get_task
from lepton.train.budget import PLAN_AFTER_EPOCH, TimeBudget, fit_to_budget
from lepton.train.checkpoint import load_last, save_best, save_last, write_history
from lepton.train.data import Prepared, data_fingerprint, intensity_stats, prepare_data
from lepton.train.loop import Trainer, seed_epoch
from lepton.train.progress import Reporter
from lepton.utils import atomic_write_json

__all__ = ["Prepared", "Trainer", "data_fingerprint", "intensity_stats", "prepare_data", "resolve_device",
           "summary", "train"]

log = logging.getLogger("lepton.train")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available; use --device cpu")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ConfigError(f"device={device!r}: use auto, cpu or cuda[:N]")
    return device


def _run_name(config: TrainConfig) -> str:
    stem = Path(config.data.split(":")[-1]).stem or "data"
    return f"{stem}-{config.model}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def _better(task: Task, metrics: dict[str, float], best: dict[str, Any]) -> bool:
    """The task's selection metric improved, or tied with a lower validation loss."""
    score, previous = metrics[task.selection_metric], best["score"]
    if previous is None or score == previous:
        return previous is None or metrics["val_loss"] < best["loss"]
    return score > previous if task.higher_is_better else score < previous


def train(
    data: str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    resume: str | Path | None = None,
    preset: str = "auto",
    quiet: bool = False,
    **overrides: Any,
) -> Run:
    """Train a model for the config's task (classification by default) and return the loaded run.

    Either pass ``data`` (a source for ``load_dataset``) with a ``preset`` and config overrides,
    a full ``config``, or ``resume`` with a run directory whose training was interrupted.

    >>> run = train("chest_xrays/", model="resnet18", epochs=10)      # doctest: +SKIP
    >>> run.predict(["new_patient.dcm"])                              # doctest: +SKIP
    """
    if resume is not None:
        run_dir = Path(resume)
        state = load_last(run_dir)
        config = TrainConfig.from_yaml(run_dir / "config.yaml").validate()
        spec = Preprocessing.from_dict(state["preprocessing"])
    else:
        if config is None:
            config = make_config(preset, data=str(data) if data is not None else None, **overrides)
        else:
            config.validate()
        config.name = config.name or _run_name(config)
        run_dir = Path(config.output_dir) / config.name
        if (run_dir / "config.yaml").exists():
            raise RunError(f"{run_dir} already holds a run; pass --resume {run_dir} or choose another --name")
        state, spec = None, None
    task = get_task(config.task)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = resolve_device(config.device)
    seed_epoch(config.seed, 0)
    prepared = prepare_data(config, spec, task)
    if state is not None and state["fingerprint"]["sha256"] != prepared.fingerprint["sha256"]:
        raise RunError(f"{run_dir}: the data at {config.data} changed since training started; "
                       "resume needs the same data")
    spec = prepared.spec
    trainer = Trainer(config, task, prepared, device, pretrained=config.pretrained if state is None else None)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": None, "epoch": 0, "loss": float("inf")}
    start_epoch, stale = 1, 0
    if state is not None:
        trainer.load_state_dict(state)
        history, best, stale = state["history"], state["best"], state["stale"]
        start_epoch = state["epoch"] + 1
        log.info("resuming %s at epoch %d", run_dir, start_epoch)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(run_dir / "config.yaml")
        atomic_write_json(run_dir / "preprocessing.json", spec.to_dict())
        atomic_write_json(run_dir / "labels.json", prepared.label_names)
        atomic_write_json(run_dir / "data.json", prepared.fingerprint)

    reporter = Reporter(quiet, config.epochs, trainer.steps_per_epoch, task.selection_metric)
    budget = TimeBudget(config.time_budget_s)
    with reporter:
        for epoch in range(start_epoch, config.epochs + 1):
            if stale and config.early_stopping and stale >= config.early_stopping:
                break
            if epoch > config.epochs:  # the time budget shortened the run
                break
            if history and budget.would_overrun(history[-1]["seconds"]):
                log.warning("time budget of %.0f s: stopping after %d epochs", config.time_budget_s, epoch - 1)
                config.epochs = epoch - 1
                config.to_yaml(run_dir / "config.yaml")
                break
            t0 = time.perf_counter()
            reporter.start_epoch(epoch)
            trained = trainer.train_epoch(epoch, on_step=reporter.step)
            metrics = trainer.validate()
            row = {"epoch": epoch, "lr": trained["lr"], "train_loss": trained["train_loss"], **metrics,
                   "images_per_s": trained["seen"] / trained["train_seconds"], "seconds": time.perf_counter() - t0}
            history.append(row)
            if _better(task, metrics, best):
                best = {"score": metrics[task.selection_metric], "epoch": epoch, "loss": metrics["val_loss"]}
                stale = 0
                save_best(run_dir, trainer.eval_model, trainer.spec, epoch, metrics)
            else:
                stale += 1
            save_last(run_dir, {"epoch": epoch, **trainer.state_dict(), "history": history, "best": best,
                                "stale": stale, "preprocessing": spec.to_dict(), "fingerprint": prepared.fingerprint})
            write_history(run_dir, history)
            reporter.end_epoch(row, best)
            if config.time_budget_s and epoch == PLAN_AFTER_EPOCH and state is None:
                fit_to_budget(config, budget.elapsed(), row["seconds"], run_dir, reporter)
    if not history:
        raise RunError(f"{run_dir}: no epoch was trained")
    return _finish(run_dir, config, task, prepared, history, best, budget.elapsed(), device, trainer.precision)


def _finish(run_dir: Path, config: TrainConfig, task: Task, prepared: Prepared, history, best, seconds,
            device, precision: str) -> Run:
    """Curves, the task's decision fitted on val with the best weights, and ``run.json``: the run is complete."""
    from lepton.plots import plot_curves

    plot_curves(history, run_dir / "curves.png")
    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model = create_model(**ckpt["spec"])
    model.load_state_dict(ckpt["model"])
    model = model_layout(model.to(device))
    outputs = predict_outputs(model, prepared.spec.normalize(prepared.x_val), task.activate, tta=config.tta,
                              device=device)
    if not task.dense:  # for checking lower serving precisions of this run once registered
        save_val_set(run_dir / VAL_SET_FILE, prepared.x_val, prepared.y_val, prepared.x_train, seed=config.seed)
    best_row = next(h for h in history if h["epoch"] == best["epoch"])
    info = {
        "status": "complete", "name": config.name, "task": task.name, "model": config.model, "epochs": len(history),
        "best_epoch": best["epoch"], **{k: v for k, v in best_row.items() if k.startswith("val_") and k != "val_loss"},
        **task.fit_decision(prepared.y_val.numpy(), outputs),
        "train_images": len(prepared.y_train), "val_images": len(prepared.y_val),
        "images_per_s": float(np.mean([h["images_per_s"] for h in history])),
        "wall_seconds_this_call": round(seconds, 2), "device": device, "precision": precision,
        "cpu": {"model": cpu_model(), "flags": matrix_flags()}, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "pid": os.getpid(),
    }
    atomic_write_json(run_dir / "run.json", info)
    return load_run(run_dir, device=device)


def summary(run: Run) -> dict[str, Any]:
    """The headline numbers of a run, as JSON-ready values."""
    keys = ("task", "model", "epochs", "best_epoch", *(k for k in run.info if k.startswith("val_")), "threshold",
            "images_per_s")
    return {"run": str(run.path), **{k: run.info.get(k) for k in dict.fromkeys(keys) if k in run.info}}
