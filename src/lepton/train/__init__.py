"""Training: a run directory driven through the task's loss and metrics, with AdamW, warm-up + cosine/step
schedules, class imbalance, EMA, early stopping, a time budget, atomic per-epoch checkpoints and exact resume.

The parts live beside this file: ``data`` (load, split, preprocess), ``loop`` (``Trainer``: epoch, step,
validation, state), ``optim`` (optimiser, schedule, EMA), ``checkpoint`` (best/last/history files),
``budget`` (the wall-clock plan) and ``progress`` (what the terminal shows).
"""

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
from lepton.data.transforms import Preprocessing
from lepton.errors import ConfigError, RunError
from lepton.models import create_model
from lepton.models.layout import model_layout
from lepton.models.precision import cpu_model, matrix_flags
from lepton.runs import Run, load_run
from lepton.tasks import Task, choose_task, get_task
from lepton.tracking.base import Tracker, code_version, flat_params, image_grid
from lepton.tracking.factory import open_tracker
from lepton.train import distributed
from lepton.train.budget import PLAN_AFTER_EPOCH, TimeBudget, announce_members, fit_to_budget
from lepton.train.checkpoint import VAL_SET_FILE, load_last, save_best, save_last, save_val_set, write_history
from lepton.train.data import (
    Prepared,
    data_fingerprint,
    intensity_stats,
    prepare_data,
    val_outputs,
    val_targets,
)
from lepton.train.distributed import Dist
from lepton.train.loop import Trainer, seed_epoch
from lepton.train.progress import Reporter
from lepton.train.semi import SEMI_FIELDS, make_trainer
from lepton.utils import atomic_torch_save, atomic_write_json

__all__ = ["Prepared", "Trainer", "data_fingerprint", "finish_run", "intensity_stats", "prepare_data",
           "resolve_device", "run_name", "summary", "train"]

log = logging.getLogger("lepton.train")
#: The run directory's files a tracked run stores with it (MLflow: under ``run/``, what ``lepton models register
#: runs:/ID`` registers).
TRACKED_FILES = ("config.yaml", "run.json", "best.pt", "labels.json", "preprocessing.json", "data.json",
                 "history.csv", "curves.png", VAL_SET_FILE)


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
        config = TrainConfig.from_yaml(run_dir / "config.yaml").validate() if (
            run_dir / "config.yaml").is_file() else None
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
        if dist.restarts and (run_dir / "last.pt").is_file():
            log.warning("torchrun restart %d: resuming %s from its last checkpoint", dist.restarts, run_dir)
            resume = run_dir
        elif (run_dir / "config.yaml").exists() and not dist.restarts:
            raise RunError(f"{run_dir} already holds a run; pass --resume {run_dir} or choose another --name")
    if resume is not None:
        run_dir = Path(resume)
        state = load_last(run_dir)
        config = TrainConfig.from_yaml(run_dir / "config.yaml").validate()
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
        run_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(run_dir / "config.yaml")
        atomic_write_json(run_dir / "preprocessing.json", spec.to_dict())
        atomic_write_json(run_dir / "labels.json", prepared.label_names)
        atomic_write_json(run_dir / "data.json", prepared.fingerprint)
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
            if member == 1 and (run_dir / "best.pt").exists() and dist.main:  # the first member's best becomes one
                (run_dir / "members").mkdir(exist_ok=True)  # of several (a resume after the move finds it there)
                os.replace(run_dir / "best.pt", run_dir / "members" / "1.pt")
            member += 1
        if not history:
            raise RunError(f"{run_dir}: no epoch was trained")
        if not dist.main:  # rank 0 chooses members and writes run.json; the others wait for the finished run
            dist.barrier()
            return load_run(run_dir, device=device)
        chosen = _choose_members(run_dir, task, prepared, config, device, done) if len(done) > 1 or (
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
    """A few val inputs side by side (a dense task's masks over them) for the trackers; None when the val set is
    read case by case from the cache."""
    if not isinstance(prepared.x_val, torch.Tensor) or not len(prepared.x_val):
        return None
    masks = prepared.y_val[:8].numpy() if task.dense and isinstance(prepared.y_val, torch.Tensor) else None
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
    best_path = run_dir / "best.pt" if member == 1 else run_dir / "members" / f"{member}.pt"
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
                    config.to_yaml(run_dir / "config.yaml")
                break
            if member > 1 and last is None and dist.broadcast(budget.would_overrun(
                    config.epochs * _member_epoch_seconds(history))):
                log.info("time budget of %.0f s: no time for member %d", config.time_budget_s, member)
                config.ensemble = member - 1
                if dist.main:
                    config.to_yaml(run_dir / "config.yaml")
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
                                    "members_done": _members_done(history, task, member)})
                write_history(run_dir, history)
            reporter.end_epoch(row, best)
            if config.time_budget_s and member == 1 and epoch == PLAN_AFTER_EPOCH and fresh:
                if dist.main:
                    fit_to_budget(config, budget.elapsed(), row["seconds"], run_dir, reporter)
                config.epochs, config.ensemble = dist.broadcast((config.epochs, config.ensemble))
                reporter.epochs = config.epochs
    return best, finished


def _member_epoch_seconds(history: list[dict[str, Any]]) -> float:
    """A member's epoch time, from the first member's epochs after the planning point (all of them when it trained
    fewer: a one-epoch member still tells what the next one costs)."""
    first = [h["seconds"] for h in history if h.get("member", 1) == 1]
    rows = first[PLAN_AFTER_EPOCH - 1:] or first
    return float(np.median(rows)) if rows else 0.0


def _members_done(history: list[dict[str, Any]], task: Task, member: int) -> list[dict[str, Any]]:
    """The best records of the members before ``member`` (kept in last.pt, so a resume knows them)."""
    out = []
    for k in range(1, member):
        rows = [h for h in history if h.get("member", 1) == k]
        if rows:
            pick = max(rows, key=lambda h: h[task.selection_metric] * (1 if task.higher_is_better else -1))
            out.append({"member": k, "score": pick[task.selection_metric], "epoch": pick["epoch"],
                        "loss": pick["val_loss"]})
    return out


def _choose_members(run_dir: Path, task: Task, prepared: Prepared, config: TrainConfig, device: str,
                    done: list[dict[str, Any]]) -> dict[str, Any]:
    """Ensemble or best member, by val alone: the members' mean probabilities are kept when they score at least
    the members' mean on the selection metric, else the best member. Writes ``best.pt`` and returns the choice."""
    ckpts, outputs = [], []
    for d in done:
        ckpt = torch.load(run_dir / "members" / f"{d['member']}.pt", map_location="cpu", weights_only=True)
        model = create_model(**ckpt["spec"])
        model.load_state_dict(ckpt["model"])
        ckpts.append(ckpt)
        found = val_outputs(model_layout(model.to(device)), prepared, task.activate, tta=config.tta, device=device)
        outputs.append(found if isinstance(found, np.ndarray) else list(found))
    scores = [task.val_metrics(val_targets(prepared.y_val), o) for o in outputs]
    sign = 1 if task.higher_is_better else -1
    best_k = max(range(len(done)), key=lambda k: sign * scores[k][task.selection_metric])
    mean = (np.mean(outputs, axis=0) if isinstance(outputs[0], np.ndarray)
            else [np.mean(case, axis=0) for case in zip(*outputs, strict=True)])
    ensemble = task.val_metrics(val_targets(prepared.y_val), mean)
    # Against the members' mean, not their best: the best of K figures on a small val set is an optimistic one
    # (a maximum of noisy estimates), while the ensemble's expected gain over a member is real.
    typical = float(np.mean([sc[task.selection_metric] for sc in scores]))
    keep = len(done) > 1 and sign * ensemble[task.selection_metric] >= sign * typical
    if keep:
        spec = {**ckpts[0]["spec"], "members": len(done)}
        weights = {f"members.{k}.{name}": v for k, c in enumerate(ckpts) for name, v in c["model"].items()}
        atomic_torch_save(run_dir / "best.pt", {"model": weights, "spec": spec, "epoch": None, "val": ensemble})
    else:
        atomic_torch_save(run_dir / "best.pt", ckpts[best_k])
    log.info("members' val %s: %s; ensemble %.4f: %s", task.selection_metric,
             ", ".join(f"{s[task.selection_metric]:.4f}" for s in scores), ensemble[task.selection_metric],
             "kept" if keep else f"member {done[best_k]['member']} kept")
    return {"members": len(done) if keep else 1, "member_val": [s[task.selection_metric] for s in scores],
            "ensemble_val": ensemble[task.selection_metric], "metrics": ensemble if keep else scores[best_k],
            "best": done[best_k]}


def finish_run(run_dir: Path, config: TrainConfig, task: Task, prepared: Prepared, history, best, chosen, seconds,
               device, precision: str, dist: Dist = distributed.SINGLE, tracker: Tracker | None = None,
               extra: dict[str, Any] | None = None) -> Run:
    """Curves, the task's decision fitted on val with the best weights, and ``run.json`` (with ``extra``, and the
    measured cost of an answer): the run is complete. Other ways of training a run (``lepton.distill``) end here
    too, so their runs are complete in the same sense."""
    from lepton.plots import plot_curves

    plot_curves(history, run_dir / "curves.png")
    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model = create_model(**ckpt["spec"])
    model.load_state_dict(ckpt["model"])
    model = model_layout(model.to(device))
    outputs = val_outputs(model, prepared, task.activate, tta=config.tta, device=device)
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
                                tta=config.tta, device=device, dense=task.dense)
    atomic_write_json(run_dir / "run.json", info)
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

