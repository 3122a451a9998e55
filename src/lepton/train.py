"""The training loop: AdamW, warm-up + cosine/step schedules, class imbalance, EMA, early stopping,
atomic per-epoch checkpoints and exact resume."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lepton.config import TrainConfig, make_config
from lepton.data import ImageSet, load_dataset
from lepton.data.splits import assign_splits
from lepton.data.transforms import Preprocessing, augment_batch, augment_options
from lepton.errors import ConfigError, DataError, RunError
from lepton.models import create_model, head_parameters
from lepton.robustness import attack
from lepton.runs import Run, load_run, predict_proba
from lepton.utils import atomic_torch_save, atomic_write_json, atomic_write_text, sha256_bytes

log = logging.getLogger("lepton.train")
HISTORY_FIELDS = ("epoch", "lr", "train_loss", "val_loss", "val_acc", "val_auc", "images_per_s", "seconds")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available; use --device cpu")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ConfigError(f"device={device!r}: use auto, cpu or cuda[:N]")
    return device


@dataclass
class Prepared:
    """Tensors and metadata of a loaded, split, preprocessed dataset."""

    spec: Preprocessing
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    label_names: list[str]
    fingerprint: dict[str, Any]


def data_fingerprint(data: ImageSet, splits: np.ndarray) -> dict[str, Any]:
    """A content hash of every image, label and split assignment, plus counts (no paths, no ids)."""
    rows = sorted(f"{h}:{int(y)}:{s}" for h, y, s in
                  zip(data.content_hashes(), data.labels, splits, strict=True))
    counts = {
        split: {name: int(((splits == split) & (data.labels == k)).sum())
                for k, name in enumerate(data.label_names)}
        for split in ("train", "val", "test") if (splits == split).any()
    }
    return {"source": data.source, "sha256": sha256_bytes("\n".join(rows).encode()),
            "images": len(data), "counts": counts, "patient_grouped": data.has_patient_ids}


def intensity_stats(x: torch.Tensor) -> dict[str, float]:
    """Mean intensity of preprocessed training images and the spread of per-image means (drift reference)."""
    means = x.mean(dim=(1, 2, 3))
    return {"mean": float(means.mean()), "std_of_image_means": float(means.std().clamp_min(1e-6))}


def prepare_data(config: TrainConfig, spec: Preprocessing | None = None) -> Prepared:
    """Load, split and preprocess the data a config names (``spec`` fixed when resuming)."""
    data = load_dataset(config.data, window=config.window, slices=config.slices, skip_bad=config.skip_bad)
    splits = assign_splits(data, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                           seed=config.seed)
    train, val = data.subset(splits == "train"), data.subset(splits == "val")
    if len(val) == 0:
        raise DataError(f"{config.data}: the val split is empty; set val_fraction > 0 or add val data")
    if spec is None:
        size = config.image_size or _native_size(train)
        channels = config.channels or (3 if all(np.shape(im)[0] == 3 for im in train.images) else 1)
        spec = Preprocessing((size, size), channels, [0.5] * channels, [0.5] * channels,
                             config.window, config.slices)
        x = spec.resize(train.images)
        if config.normalize == "dataset":
            spec.mean = x.mean(dim=(0, 2, 3)).tolist()
            spec.std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    else:
        x = spec.resize(train.images)
    fingerprint = data_fingerprint(data, splits) | {"intensity": intensity_stats(x)}
    return Prepared(
        spec=spec, x_train=x, y_train=torch.from_numpy(train.labels),
        x_val=spec.resize(val.images), y_val=torch.from_numpy(val.labels),
        label_names=data.label_names, fingerprint=fingerprint,
    )


def _native_size(data: ImageSet) -> int:
    sides = [max(np.shape(im)[1:]) for im in data.images] if isinstance(data.images, list) \
        else [max(data.images.shape[2:])]
    return int(min(224, np.median(sides)))


def _lr_lambda(config: TrainConfig, steps_per_epoch: int):
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        total = config.epochs * steps_per_epoch  # read each step: a time budget may shorten the run
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if config.schedule == "step":
            return config.gamma ** ((step // steps_per_epoch) // config.step_size)
        return 1.0

    return factor


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    backbone, head = head_parameters(model, config.model)
    if config.freeze_backbone:
        for p in backbone:
            p.requires_grad_(False)
        backbone = []
    groups = []
    for params, lr in ((backbone, config.backbone_lr or config.lr), (head, config.lr)):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [{"params": decay, "lr": lr, "weight_decay": config.weight_decay},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def _run_name(config: TrainConfig) -> str:
    stem = Path(config.data.split(":")[-1]).stem or "data"
    return f"{stem}-{config.model}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def _set_threads(config: TrainConfig) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)


def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    # Every epoch's randomness derives from (seed, epoch) alone, so a resumed run repeats exactly.
    torch.manual_seed(seed * 1_000_003 + epoch)
    random.seed(seed * 1_000_003 + epoch)
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train(
    data: str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    resume: str | Path | None = None,
    preset: str = "auto",
    quiet: bool = False,
    **overrides: Any,
) -> Run:
    """Train a classifier and return the loaded run.

    Either pass ``data`` (a source for ``load_dataset``) with a ``preset`` and config overrides,
    a full ``config``, or ``resume`` with a run directory whose training was interrupted.

    >>> run = train("chest_xrays/", model="resnet18", epochs=10)      # doctest: +SKIP
    >>> run.predict(["new_patient.dcm"])                              # doctest: +SKIP
    """
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "last.pt").is_file() or not (run_dir / "config.yaml").is_file():
            raise RunError(f"{run_dir}: nothing to resume (no last.pt/config.yaml)")
        config = TrainConfig.from_yaml(run_dir / "config.yaml").validate()
        state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
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
    _set_threads(config)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = resolve_device(config.device)
    _seed_epoch(config.seed, 0)
    prepared = prepare_data(config, spec)
    if state is not None and state["fingerprint"]["sha256"] != prepared.fingerprint["sha256"]:
        raise RunError(f"{run_dir}: the data at {config.data} changed since training started; "
                       "resume needs the same data")
    spec = prepared.spec
    num_classes = len(prepared.label_names)
    model_spec = {"name": config.model, "in_channels": spec.channels, "num_classes": num_classes,
                  "image_size": spec.size[0]}
    model = create_model(**model_spec, pretrained=config.pretrained if state is None else None)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(prepared.y_train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps_per_epoch))
    ema = None
    if config.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=_ema_update(config.ema_decay),
                                                  use_buffers=True)
    amp_dtype = None
    if device.startswith("cuda") and config.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    counts = torch.bincount(prepared.y_train, minlength=num_classes).float()
    class_weight = None
    if config.imbalance == "weighted":
        class_weight = (counts.sum() / (num_classes * counts.clamp_min(1))).to(device)
    sample_weight = (1.0 / counts.clamp_min(1))[prepared.y_train] if config.imbalance == "balanced" else None
    aug = augment_options(config.augment, config.augment_options)

    history: list[dict[str, Any]] = []
    best = {"auc": -1.0, "epoch": 0, "loss": float("inf")}
    start_epoch, stale = 1, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history, best, stale = state["history"], state["best"], state["stale"]
        start_epoch = state["epoch"] + 1
        log.info("resuming %s at epoch %d", run_dir, start_epoch)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(run_dir / "config.yaml")
        atomic_write_json(run_dir / "preprocessing.json", spec.to_dict())
        atomic_write_json(run_dir / "labels.json", prepared.label_names)
        atomic_write_json(run_dir / "data.json", prepared.fingerprint)

    reporter = _Reporter(quiet, config.epochs, steps_per_epoch)
    x_val_norm = spec.normalize(prepared.x_val)
    # Averaged weights do not match averaged BatchNorm statistics; the EMA model's statistics are
    # recomputed on a fixed, un-augmented slice of the training set before each evaluation.
    bn_batch = spec.normalize(prepared.x_train[torch.randperm(len(prepared.y_train),
                              generator=torch.Generator().manual_seed(config.seed))[:2048]])
    started = time.perf_counter()
    with reporter:
        for epoch in range(start_epoch, config.epochs + 1):
            if stale and config.early_stopping and stale >= config.early_stopping:
                break
            if epoch > config.epochs:  # the time budget shortened the run
                break
            if config.time_budget_s and history and \
                    time.perf_counter() - started + history[-1]["seconds"] > config.time_budget_s:
                log.warning("time budget of %.0f s: stopping after %d epochs", config.time_budget_s, epoch - 1)
                config.epochs = epoch - 1
                config.to_yaml(run_dir / "config.yaml")
                break
            gen = _seed_epoch(config.seed, epoch)
            n = len(prepared.y_train)
            order = (torch.multinomial(sample_weight, n, replacement=True, generator=gen)
                     if sample_weight is not None else torch.randperm(n, generator=gen))
            model.train()
            t0, seen, loss_sum = time.perf_counter(), 0, 0.0
            reporter.start_epoch(epoch)
            for step in range(steps_per_epoch):
                idx = order[step * config.batch_size:(step + 1) * config.batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                    continue
                x01 = augment_batch(prepared.x_train[idx], aug, gen).to(device, non_blocking=True)
                yb = prepared.y_train[idx].to(device, non_blocking=True)
                if config.adversarial:
                    adv = attack(model, spec.normalize, x01, yb, config.adv_epsilon, config.adversarial,
                                 steps=config.adv_steps, seed=epoch * 100_000 + step)
                    model.train()
                    x01, yb = torch.cat([x01, adv]), torch.cat([yb, yb])
                xb = spec.normalize(x01).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(xb)
                    loss = F.cross_entropy(logits.float(), yb, weight=class_weight,
                                           label_smoothing=config.label_smoothing)
                if not torch.isfinite(loss):
                    raise RunError(f"loss became {loss.item()} at epoch {epoch}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                seen += len(idx)
                loss_sum += loss.item() * len(idx)
                reporter.step(loss.item(), seen / (time.perf_counter() - t0))
            train_seconds = time.perf_counter() - t0
            eval_model = model
            if ema is not None:
                eval_model = ema.module
                _recalibrate_bn(eval_model, bn_batch, device)
            probs = predict_proba(eval_model, x_val_norm, tta=config.tta, device=device)
            metrics = _val_metrics(prepared.y_val.numpy(), probs, class_weight)
            row = {"epoch": epoch, "lr": optimizer.param_groups[-1]["lr"],
                   "train_loss": loss_sum / max(1, seen), **metrics,
                   "images_per_s": seen / train_seconds, "seconds": time.perf_counter() - t0}
            history.append(row)
            improved = metrics["val_auc"] > best["auc"] or (
                metrics["val_auc"] == best["auc"] and metrics["val_loss"] < best["loss"])
            if improved:
                best = {"auc": metrics["val_auc"], "epoch": epoch, "loss": metrics["val_loss"]}
                stale = 0
                atomic_torch_save(run_dir / "best.pt", {
                    "model": {k: v.cpu() for k, v in eval_model.state_dict().items()},
                    "spec": model_spec, "epoch": epoch, "val": metrics})
            else:
                stale += 1
            atomic_torch_save(run_dir / "last.pt", {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "history": history,
                "best": best, "stale": stale, "preprocessing": spec.to_dict(),
                "fingerprint": prepared.fingerprint})
            _write_history(run_dir, history)
            reporter.end_epoch(row, best)
            if config.time_budget_s and epoch == 2 and state is None:  # epoch 2: past first-epoch warm-up costs
                _fit_to_budget(config, time.perf_counter() - started, row["seconds"], run_dir, reporter)
    if not history:
        raise RunError(f"{run_dir}: no epoch was trained")
    return _finish(run_dir, config, prepared, history, best, time.perf_counter() - started, device)


def _fit_to_budget(config: TrainConfig, elapsed: float, epoch_s: float, run_dir: Path, reporter: _Reporter) -> None:
    """Re-plan a fresh run after its second epoch to the epochs that fit ``time_budget_s`` at that epoch's pace;
    the new count is saved in config.yaml (so a resume keeps it) and the cosine schedule stretches over it."""
    fit = 2 + max(0, int((config.time_budget_s - elapsed) // max(epoch_s, 1e-9)))
    if fit >= config.epochs:
        return
    log.warning("time budget %.0f s: at %.1f s per epoch this run trains %d of %d epochs",
                config.time_budget_s, epoch_s, fit, config.epochs)
    config.epochs = fit
    config.to_yaml(run_dir / "config.yaml")
    reporter.epochs = fit


def _ema_update(decay: float):
    """EMA with warm-up: the decay ramps as (1 + n) / (10 + n) up to ``decay``, so short runs
    average recent weights instead of staying near the initialisation."""

    def update(ema_params, params, num_averaged) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for e, p in zip(ema_params, params, strict=True):
            e.lerp_(p.to(e.dtype), weight) if e.is_floating_point() else e.copy_(p)

    return update


def _recalibrate_bn(model: nn.Module, x: torch.Tensor, device: str, batch_size: int = 256) -> None:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the slice
    model.train()
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size].to(device).contiguous(memory_format=torch.channels_last))
    for m, momentum in momenta.items():
        m.momentum = momentum
    model.eval()


def _val_metrics(y: np.ndarray, probs: np.ndarray, class_weight) -> dict[str, float]:
    from lepton.evaluate import auc_score

    p = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    return {"val_loss": float(-np.log(p).mean()), "val_acc": float((probs.argmax(1) == y).mean()),
            "val_auc": auc_score(y, probs)}


def _write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(run_dir / "history.csv", buf.getvalue())


def _finish(run_dir: Path, config: TrainConfig, prepared: Prepared, history, best, seconds, device) -> Run:
    from lepton.evaluate import youden_threshold
    from lepton.plots import plot_curves

    plot_curves(history, run_dir / "curves.png")
    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model = create_model(**ckpt["spec"])
    model.load_state_dict(ckpt["model"])
    model = model.to(device).to(memory_format=torch.channels_last)
    probs = predict_proba(model, prepared.spec.normalize(prepared.x_val), tta=config.tta, device=device)
    y_val = prepared.y_val.numpy()
    threshold = youden_threshold(y_val, probs[:, 1]) if probs.shape[1] == 2 else None
    info = {
        "status": "complete", "name": config.name, "model": config.model, "epochs": len(history),
        "best_epoch": best["epoch"], "val_auc": best["auc"],
        "val_acc": next(h["val_acc"] for h in history if h["epoch"] == best["epoch"]),
        "threshold": threshold, "threshold_rule": "Youden J on val" if threshold is not None else None,
        "train_images": len(prepared.y_train), "val_images": len(y_val),
        "images_per_s": float(np.mean([h["images_per_s"] for h in history])),
        "wall_seconds_this_call": round(seconds, 2), "device": device, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "pid": os.getpid(),
    }
    atomic_write_json(run_dir / "run.json", info)
    return load_run(run_dir, device=device)


class _Reporter:
    """A rich progress bar on a terminal, one line per epoch otherwise, nothing when quiet."""

    def __init__(self, quiet: bool, epochs: int, steps: int):
        from rich.console import Console

        self.quiet, self.epochs, self.steps = quiet, epochs, steps
        self.console = Console(stderr=True)
        self.progress = None
        self.task = None
        if not quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[ips]:.0f} img/s"), TextColumn("val AUC {task.fields[auc]}"),
                TimeRemainingColumn(), console=self.console, transient=False)

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def start_epoch(self, epoch: int) -> None:
        if self.progress:
            if self.task is None:
                self.task = self.progress.add_task("train", total=self.steps, epoch=epoch,
                                                   epochs=self.epochs, loss=0.0, ips=0.0, auc="-")
            self.progress.reset(self.task, total=self.steps, epoch=epoch)

    def step(self, loss: float, ips: float) -> None:
        if self.progress:
            self.progress.update(self.task, advance=1, loss=loss, ips=ips)

    def end_epoch(self, row: dict[str, Any], best: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.progress:
            self.progress.update(self.task, auc=f"{row['val_auc']:.4f}")
        else:
            self.console.print(
                f"epoch {row['epoch']}/{self.epochs}  loss {row['train_loss']:.4f}  "
                f"val loss {row['val_loss']:.4f}  val acc {row['val_acc']:.4f}  "
                f"val AUC {row['val_auc']:.4f}  {row['images_per_s']:.0f} img/s  (best epoch {best['epoch']})",
                highlight=False, soft_wrap=True)


def summary(run: Run) -> dict[str, Any]:
    """The headline numbers of a run, as JSON-ready values."""
    return {"run": str(run.path), **{k: run.info.get(k) for k in
            ("model", "epochs", "best_epoch", "val_auc", "val_acc", "threshold", "images_per_s")}}
