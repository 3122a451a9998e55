"""``train``: a run directory driven through the task's loss and metrics — data prepared once, each ensemble member
trained from its own seed with early stopping, the time budget and a checkpoint every epoch (exact resume), then the
members chosen on val (``members``) and the run finished (``finish``)."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton.config import TrainConfig, make_config
from lepton.data.transforms.preprocessing import Preprocessing
from lepton.errors import ConfigError, RunError
from lepton.models.precision import cpu_model, matrix_flags
from lepton.rundir import BEST, CONFIG, LAST, RunDir
from lepton.runs import Run, load_run
from lepton.tasks import Task, choose_task, get_task
from lepton.tracking.base import Tracker, code_version, flat_params, image_grid
from lepton.tracking.factory import open_tracker
from lepton.train import distributed
from lepton.train.budget import PLAN_AFTER_EPOCH, TimeBudget, announce_members, fit_to_budget
from lepton.train.checkpoint import load_last, save_best, save_last, write_history
from lepton.train.data import (
    Prepared,
    prepare_data,
)
from lepton.train.distributed import Dist
from lepton.train.finish import finish_run
from lepton.train.loop import seed_epoch
from lepton.train.members import choose_members, member_epoch_seconds, members_done
from lepton.train.progress import Reporter
from lepton.train.semi import SEMI_FIELDS, make_trainer

log = logging.getLogger("lepton.train")
def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available; use --device cpu")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ConfigError(f"device={device!r}: use auto, cpu or cuda[:N]")
    return device


def run_name(config: TrainConfig) -> str:
    """The default run directory name: data stem, network and the UTC time."""
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
    track: str | list[str] | None = None,
    **overrides: Any,
) -> Run:
    """Train a model for the config's task (classification by default) and return the loaded run.

    Either pass ``data`` (a source for ``load_dataset``) with a ``preset`` and config overrides,
    a full ``config``, or ``resume`` with a run directory whose training was interrupted.

    >>> run = train("chest_xrays/", model="resnet18", epochs=10)      # doctest: +SKIP
    >>> run.predict(["new_patient.dcm"])                              # doctest: +SKIP

    Started by torchrun (``WORLD_SIZE`` > 1), every process calls this; they train one model data-parallel and
    rank 0 alone writes the run directory. After an elastic restart the run resumes from ``last.pt``.

    ``track`` watches the run as it trains (``lepton.tracking``): ``"tensorboard"``, ``"mlflow"`` or
    ``"mlflow=URI"``, or a list of them; rank 0 alone logs. A resumed run keeps the tracking it started with.
    """
    dist = distributed.from_env()
    if resume is not None:
        run_dir = Path(resume)
        config = RunDir(run_dir).read_config().validate() if RunDir(run_dir).has(CONFIG) else None
    elif config is None:
        if data is not None:  # the data's layout picks the task; a contradicting task is refused
            overrides["task"], layout = choose_task(data, overrides.get("task"))
            log.info("%s", layout.describe())
        config = make_config(preset, data=str(data) if data is not None else None, **overrides)
    else:
        config.validate()
        if config.data:
            choose_task(config.data, config.task)
    device = distributed.init(dist, resolve_device(config.device)) if config is not None else "cpu"
    try:
        return _train(config, resume, dist, device, quiet, track)
    finally:
        distributed.shutdown(dist)


def _train(config: TrainConfig | None, resume: str | Path | None, dist: Dist, device: str, quiet: bool,
           track: str | list[str] | None = None) -> Run:
    if resume is None:
        config.name = dist.broadcast(config.name or run_name(config))
        run_dir = Path(config.output_dir) / config.name
        if dist.restarts and (run_dir / LAST).is_file():
            log.warning("torchrun restart %d: resuming %s from its last checkpoint", dist.restarts, run_dir)
            resume = run_dir
        elif (run_dir / CONFIG).exists() and not dist.restarts:
            raise RunError(f"{run_dir} already holds a run; pass --resume {run_dir} or choose another --name")
    if resume is not None:
        run_dir = Path(resume)
        state = load_last(run_dir)
        config = RunDir(run_dir).read_config().validate()
        spec = Preprocessing.from_dict(state["preprocessing"])
        if state.get("world", 1) != dist.world:
            raise RunError(f"{run_dir} was trained by {state.get('world', 1)} process(es); resume it with as many "
                           f"(--nproc {state.get('world', 1)}), not {dist.world}")
    else:
        state, spec = None, None
    dist.barrier()  # every process has looked at the run directory before rank 0 writes into it
    task = get_task(config.task, config.task_options)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_epoch(config.seed, 0)
    prepared = prepare_data(config, spec, task, quiet=quiet or not dist.main)
    if state is not None and state["fingerprint"]["sha256"] != prepared.fingerprint["sha256"]:
        raise RunError(f"{run_dir}: the data at {config.data} changed since training started; "
                       "resume needs the same data")
    spec = prepared.spec
    if state is None and dist.main:
        files = RunDir(run_dir).create()
        files.write_config(config)
        files.write_preprocessing(spec)
        files.write_labels(prepared.label_names)
        files.write_data(prepared.fingerprint)
    precision = _precision(config, device, spec.spatial_dims)
    tracker = open_tracker(track, run_dir, run_name=config.name, resume=state is not None) if dist.main else Tracker()
    with tracker:  # a failure ends the tracked run as FAILED
        if tracker.backend != "none":  # (tags read git and /proc: only for a tracked run)
            tracker.start(flat_params(config.to_dict()), _run_tags(config, task, prepared, device, precision, dist))
            samples = _samples(prepared, task) if state is None else None
            if samples is not None:
                tracker.log_images("samples/val", samples)
        history: list[dict[str, Any]] = state["history"] if state is not None else []
        done: list[dict[str, Any]] = state.get("members_done", []) if state is not None else []
        member = state.get("member", 1) if state is not None else 1
        budget = TimeBudget(config.time_budget_s)
        if state is None and dist.main:
            announce_members(config)
        while True:
            best, finished = _train_member(config, task, prepared, device, run_dir, member, history, budget,
                                           state if state is not None and state.get("member", 1) == member else None,
                                           quiet or not dist.main, dist, tracker)
            state = None
            if finished:
                done.append({"member": member, **best})
            if member >= max(1, config.ensemble) or not finished:
                break
            if member == 1 and (run_dir / BEST).exists() and dist.main:  # the first member's best becomes one
                (run_dir / "members").mkdir(exist_ok=True)  # of several (a resume after the move finds it there)
                os.replace(run_dir / BEST, run_dir / "members" / "1.pt")
            member += 1
        if not history:
            raise RunError(f"{run_dir}: no epoch was trained")
        if not dist.main:  # rank 0 chooses members and writes run.json; the others wait for the finished run
            dist.barrier()
            return load_run(run_dir, device=device)
        chosen = choose_members(run_dir, task, prepared, config, device, done) if len(done) > 1 or (
            done and (run_dir / "members").is_dir()) else None
        run = finish_run(run_dir, config, task, prepared, history, done[0] if done else _best_of(history, task),
                         chosen, budget.elapsed(), device, precision, dist, tracker)
        dist.barrier()
        return run


def _precision(config: TrainConfig, device: str, spatial_dims: int) -> str:
    from lepton.models.precision import resolve_precision

    return resolve_precision(config.precision if config.amp else "fp32", device, spatial_dims)


def _run_tags(config: TrainConfig, task: Task, prepared: Prepared, device: str, precision: str,
              dist: Dist) -> dict[str, str]:
    """What a tracked run is tagged with: the data's fingerprint, the code's version, the CPU and precision."""
    fp = prepared.fingerprint
    return {"task": task.name, "model": config.model, "data.source": str(fp.get("source", config.data)),
            "data.sha256": str(fp.get("sha256")), "data.images": str(fp.get("images")), "device": device,
            "precision": precision, "cpu.model": cpu_model(), "cpu.flags": ",".join(matrix_flags()) or "none",
            "torch": torch.__version__, "processes": str(dist.world), **code_version()}


def _samples(prepared: Prepared, task: Task) -> np.ndarray | None:
    """A few val inputs side by side (a task's label maps over them: ``Task.annotation`` "mask") for the trackers;
    None when the val set is read case by case from the cache."""
    if not isinstance(prepared.x_val, torch.Tensor) or not len(prepared.x_val):
        return None
    masks = prepared.y_val[:8].numpy() if task.annotation == "mask" and isinstance(prepared.y_val, torch.Tensor) \
        else None
    return image_grid(prepared.x_val[:8].float().numpy(), masks)


def _on_step(reporter: Reporter, tracker: Tracker, prefix: str, first: int) -> Callable[[float, float], None]:
    """The per-step callback: the progress bar, and each step's loss and speed to the trackers."""
    steps = itertools.count(first)

    def on_step(loss: float, images_per_s: float) -> None:
        reporter.step(loss, images_per_s)
        tracker.log_step({f"{prefix}step/train_loss": loss, f"{prefix}step/images_per_s": images_per_s}, next(steps))

    return on_step


def _best_of(history: list[dict[str, Any]], task: Task) -> dict[str, Any]:
    rows = [h for h in history if h.get("member", 1) == 1]
    pick = max(rows, key=lambda h: h[task.selection_metric] * (1 if task.higher_is_better else -1))
    return {"score": pick[task.selection_metric], "epoch": pick["epoch"], "loss": pick["val_loss"]}


def _train_member(config: TrainConfig, task: Task, prepared: Prepared, device: str, run_dir: Path, member: int,
                  history: list[dict[str, Any]], budget: TimeBudget, state: dict[str, Any] | None,
                  quiet: bool, dist: Dist, tracker: Tracker | None = None) -> tuple[dict[str, Any], bool]:
    """Train one member (the run itself unless it is an ensemble) from its own seed; its best weights go to
    ``best.pt`` (``members/K.pt`` for later members). Returns its best record and whether its schedule finished."""
    seed = config.seed + member - 1
    member_config = config if member == 1 else TrainConfig.from_dict({**config.to_dict(), "seed": seed,
                                                                       "task": config.task})
    seed_epoch(seed, 0)
    fresh = state is None
    trainer = make_trainer(member_config, task, prepared, device,
                           pretrained=config.pretrained if fresh and member == 1 else None, dist=dist)
    best: dict[str, Any] = {"score": None, "epoch": 0, "loss": float("inf")}
    start_epoch, stale = 1, 0
    if state is not None:
        trainer.load_state_dict(state)
        best, stale = state["best"], state["stale"]
        start_epoch = state["epoch"] + 1
        log.info("resuming %s at member %d, epoch %d", run_dir, member, start_epoch)
    best_path = run_dir / BEST if member == 1 else run_dir / "members" / f"{member}.pt"
    tag = {"member": member} if member > 1 or config.ensemble > 1 else {}
    reporter = Reporter(quiet, config.epochs, trainer.steps_per_epoch, task.selection_metric)
    finished = True
    tracker = tracker or Tracker()
    prefix = f"member{member}/" if member > 1 else ""  # an ensemble's later members: figures of their own
    if fresh and member == 1 and tracker.backend != "none":
        example = torch.zeros(1, prepared.spec.channels, *prepared.spec.size, device=device)
        tracker.log_graph(trainer.module, example)
    with reporter:
        for epoch in range(start_epoch, config.epochs + 1):
            if stale and config.early_stopping and stale >= config.early_stopping:
                break
            last = next((h for h in reversed(history) if h.get("member", 1) == member), None)
            # Clock-driven decisions are rank 0's, so every process stops at the same epoch.
            if last is not None and dist.broadcast(budget.would_overrun(last["seconds"])):
                if member == 1:
                    log.warning("time budget of %.0f s: stopping after %d epochs", config.time_budget_s, epoch - 1)
                    config.epochs = epoch - 1
                    config.ensemble = 1
                else:  # an ensemble member that cannot finish its schedule is left out
                    log.warning("time budget of %.0f s: member %d left out after %d of %d epochs",
                                config.time_budget_s, member, epoch - 1, config.epochs)
                    config.ensemble = member - 1
                    finished = False
                if dist.main:
                    RunDir(run_dir).write_config(config)
                break
            if member > 1 and last is None and dist.broadcast(budget.would_overrun(
                    config.epochs * member_epoch_seconds(history))):
                log.info("time budget of %.0f s: no time for member %d", config.time_budget_s, member)
                config.ensemble = member - 1
                if dist.main:
                    RunDir(run_dir).write_config(config)
                return best, False
            t0 = time.perf_counter()
            reporter.start_epoch(epoch)
            trained = trainer.train_epoch(epoch, on_step=_on_step(reporter, tracker, prefix,
                                                                  (epoch - 1) * trainer.steps_per_epoch + 1))
            metrics = trainer.validate()
            row = {"epoch": epoch, **tag, "lr": trained["lr"], "train_loss": trained["train_loss"],
                   **{k: trained[k] for k in SEMI_FIELDS if k in trained}, **metrics,
                   "images_per_s": trained["seen"] / trained["train_seconds"], "seconds": time.perf_counter() - t0}
            history.append(row)
            tracker.log_metrics({prefix + k: v for k, v in row.items() if k not in ("epoch", "member")}, epoch)
            if _better(task, metrics, best):  # the metrics are the same in every process (gathered predictions)
                best = {"score": metrics[task.selection_metric], "epoch": epoch, "loss": metrics["val_loss"]}
                stale = 0
                if dist.main:
                    save_best(run_dir, trainer.eval_model, trainer.spec, epoch, metrics, path=best_path)
            else:
                stale += 1
            if dist.main:
                save_last(run_dir, {"epoch": epoch, "member": member, **trainer.state_dict(), "history": history,
                                    "best": best, "stale": stale, "preprocessing": prepared.spec.to_dict(),
                                    "fingerprint": prepared.fingerprint, "world": dist.world,
                                    "members_done": members_done(history, task, member)})
                write_history(run_dir, history)
            reporter.end_epoch(row, best)
            if config.time_budget_s and member == 1 and epoch == PLAN_AFTER_EPOCH and fresh:
                if dist.main:
                    fit_to_budget(config, budget.elapsed(), row["seconds"], run_dir, reporter)
                config.epochs, config.ensemble = dist.broadcast((config.epochs, config.ensemble))
                reporter.epochs = config.epochs
    return best, finished


