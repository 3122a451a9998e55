"""Knowledge distillation: a run's ensemble and flip TTA (the teacher) taught to one network (the student).

The teacher's activated outputs on the training images (and on any unlabelled images given) are computed once and
cached in the student's run directory (``teacher_outputs.npz``). The student trains on them with the usual parts of
``lepton.train`` — ``Trainer`` with a loss that mixes the KL divergence to the teacher's probabilities at a
temperature (Hinton et al., 2015) with the hard-label loss — checkpoints every epoch (``last.pt``; a killed
distillation resumes exactly), and ends as any run ends (``finish_run``: decision fitted on val, ``run.json`` with
its measured cost). The student is then evaluated on val beside its teacher (``lepton.evaluate``: metrics with CIs,
calibration) in ``distill_report.json``/``.md``; export, quantisation, serving and registration take it like any
run, and its card names its teacher.

What differs by task goes through the task seam (``Task.distill_targets``, ``Task.distill_loss``,
``Task.headline``; ``lepton.tasks.distillation``). A segmentation teacher's soft masks (its members' mean with flip
TTA, on each training case) are cached on disk one compressed uint8 file per case (``teacher_masks/``) and read per
batch, stacked behind the label map so that patches and augmentation move them with the image; the student learns
them by voxel-wise KL at the temperature and a soft Dice, mixed with the task's Dice + cross-entropy, and is compared
with its teacher by Dice. Tasks without these hooks (detection, sequences) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError, DataError, RunError
from lepton.tasks.distillation import has_soft_mask, kd_loss, soft_targets, write_soft_mask

__all__ = ["DistillSettings", "compare", "distill", "kd_loss", "soft_targets", "teacher_masks", "teacher_outputs"]

log = logging.getLogger("lepton.distill")

SETTINGS_FILE = "distill.json"
TEACHER_FILE = "teacher_outputs.npz"
TEACHER_MASKS = "teacher_masks"
REPORT_FILE = "distill_report.json"


@dataclasses.dataclass
class DistillSettings:
    """What a distillation was asked for (saved as ``distill.json``, so a resume repeats it)."""

    teacher: str
    student: str
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft-target (KL) loss; 1 - alpha goes to the hard labels
    unlabelled: str | None = None
    teacher_version: str | None = None
    #: The teacher answers on every augmented batch as the student sees it (consistent teaching, Beyer et al. 2022:
    #: the student matches the teacher's function on new views, not one fixed output per image), at the cost of the
    #: teacher's forward passes each step; otherwise the cached outputs on the un-augmented images are the targets.
    consistent: bool = False

    def check(self) -> DistillSettings:
        if not 0.5 <= self.temperature <= 50:
            raise ConfigError(f"temperature must be between 0.5 and 50 (got {self.temperature})")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha (the soft-target weight) must be in [0, 1] (got {self.alpha})")
        return self


def _unlabelled_images(source: str, spec) -> Any:
    """Images without labels, in [0, 1] at the teacher's input size: a folder (every readable image file under it,
    recursively; unreadable ones skipped with a warning) or a MedMNIST-format ``.npz`` (its ``train_images``, never
    its val or test images), listed by ``lepton.data.readers.unlabelled``."""
    import torch

    from lepton.data.readers.io import read_image
    from lepton.data.readers.unlabelled import load_unlabelled

    path = Path(source)
    if not (path.is_dir() or (path.is_file() and path.suffix.lower() == ".npz")):
        raise DataError(f"{source}: unlabelled images are a folder of image files or a MedMNIST-format .npz")
    pool = load_unlabelled(path, window=spec.window, slices=spec.slices, steps=spec.steps)
    if pool.arrays is not None:
        images = list(pool.arrays)
    else:
        images = []
        for file in pool.paths:
            try:
                frames = read_image(file, window=spec.window, slices=spec.slices, steps=spec.steps)
            except DataError as exc:
                log.warning("unlabelled: skipped %s (%s)", file, exc)
                continue
            images += [f.pixels for f in frames]
    if not images:
        raise DataError(f"{source}: no readable images")
    return torch.cat([spec.resize(images[i:i + 512]) for i in range(0, len(images), 512)])


def _key(teacher_dir: Path, fingerprint: dict[str, Any], unlabelled: int) -> str:
    """What the cached teacher outputs were computed from: the teacher's weights, the data, the unlabelled count."""
    from lepton.rundir import BEST, RunDir
    from lepton.utils import sha256_bytes

    return sha256_bytes(RunDir(teacher_dir).file(BEST).read_bytes() + json.dumps(
        [fingerprint.get("sha256"), unlabelled]).encode())


def teacher_outputs(teacher, x, run_dir: Path, key: str, quiet: bool = False) -> np.ndarray:
    """The teacher's activated outputs (its members' mean, flip TTA as it predicts) for images ``x`` in [0, 1]:
    read from ``RUN/teacher_outputs.npz`` when it was computed from the same teacher and data, else computed (in
    chunks) and cached atomically."""
    import io

    import torch

    from lepton.runs import predict_outputs
    from lepton.utils import atomic_write_bytes

    cache = run_dir / TEACHER_FILE
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key and len(z["probs"]) == len(x):
                return z["probs"]
        log.warning("%s: computed from another teacher or other data; computing it again", cache)
    t0 = time.perf_counter()
    parts = []
    spec, chunk = teacher.preprocessing, 1024
    for start in range(0, len(x), chunk):
        xb = spec.normalize(torch.as_tensor(x[start:start + chunk]).float())
        parts.append(predict_outputs(teacher.model, xb, teacher.task.activate, tta=teacher.config.tta,
                                     device=teacher.device))
    probs = np.concatenate(parts).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, probs=probs, key=np.array(key))
    atomic_write_bytes(cache, buf.getvalue())
    if not quiet:
        log.info("teacher outputs for %d images in %.1f s, cached in %s", len(x), time.perf_counter() - t0, cache)
    return probs


def teacher_masks(teacher, x, run_dir: Path, key: str, quiet: bool = False) -> Path:
    """A dense teacher's soft masks (its members' mean, flip TTA as it predicts) for the cases ``x`` (N, C, …) in
    [0, 1], one case at a time, each written to ``RUN/teacher_masks/`` as a compressed uint8 file as soon as it is
    computed: a case already there from the same teacher and data is not computed again (a killed distillation
    picks up where it stopped), and no more than one case's outputs are ever in memory."""
    import torch
    from rich.progress import Progress

    from lepton.runs import predict_outputs

    folder = run_dir / TEACHER_MASKS
    folder.mkdir(parents=True, exist_ok=True)
    spec, shape = teacher.preprocessing, tuple(x.shape[2:])
    todo = [i for i in range(len(x)) if not has_soft_mask(folder, i, key, shape)]
    t0 = time.perf_counter()
    with Progress(disable=quiet, transient=True) as progress:
        bar = progress.add_task("teacher soft masks", total=len(todo))
        for i in todo:
            xb = spec.normalize(torch.as_tensor(x[i:i + 1]).float())
            probs = predict_outputs(teacher.model, xb, teacher.task.activate, tta=teacher.config.tta,
                                    device=teacher.device)[0]
            write_soft_mask(folder, i, probs, key)
            progress.advance(bar)
    if todo and not quiet:
        log.info("teacher soft masks for %d of %d cases in %.1f s, cached in %s", len(todo), len(x),
                 time.perf_counter() - t0, folder)
    return folder


def distill(
    teacher: str | Path | None = None,
    *,
    student: str | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    unlabelled: str | None = None,
    consistent: bool = False,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    name: str | None = None,
    output_dir: str | Path | None = None,
    resume: str | Path | None = None,
    teacher_version: str | None = None,
    n_bootstrap: int = 1000,
    quiet: bool = False,
) -> Any:
    """Distil the run ``teacher`` (its ensemble and flip TTA) into one ``student`` network (default: the teacher's
    architecture), trained on the teacher's training images — and the images of ``unlabelled`` — with the
    teacher's probabilities at ``temperature`` as soft targets (weight ``alpha``) and the hard labels. Returns the
    student as a loaded ``Run`` in ``output_dir/name`` (default: beside the teacher, ``<teacher>-distilled``).

    A segmentation teacher's soft masks are the targets (cached per case in ``teacher_masks/``; no
    ``unlabelled``). ``consistent`` asks the teacher on every augmented batch instead of using its cached outputs.
    ``resume`` continues a killed distillation from its run directory. The student predicts without TTA (one
    forward pass per image); ``epochs`` defaults to the teacher's schedule, ``teacher_version`` names the teacher's
    registered version for the card.

    >>> student = distill("runs/pneumonia", student="lepton_cnn", temperature=4)   # doctest: +SKIP
    """
    import torch

    from lepton.config import TrainConfig
    from lepton.data.transforms.preprocessing import Preprocessing
    from lepton.rundir import CONFIG, RunDir
    from lepton.runs import load_run
    from lepton.train import finish_run, prepare_data, resolve_device
    from lepton.train.checkpoint import load_last
    from lepton.utils import atomic_write_json

    state = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / SETTINGS_FILE).is_file():
            raise RunError(f"{run_dir}: not a distillation (no {SETTINGS_FILE}); resume training runs with "
                           "`lepton train --resume`")
        settings = DistillSettings(**json.loads((run_dir / SETTINGS_FILE).read_text())).check()
        state = load_last(run_dir)
        config = RunDir(run_dir).read_config().validate()
        teacher_run = load_run(settings.teacher)
        spec = Preprocessing.from_dict(state["preprocessing"])
    else:
        if teacher is None:
            raise ConfigError("give the teacher RUN to distil, or --resume STUDENT_RUN")
        teacher_run = load_run(teacher)
        settings = DistillSettings(str(Path(teacher).resolve()), student or teacher_run.config.model, temperature,
                                   alpha, unlabelled, teacher_version, consistent).check()
        base = teacher_run.config
        values = {**base.to_dict(), "task": base.task, "model": settings.student, "ensemble": 1, "tta": False,
                  "time_budget_s": 0.0, "pretrained": None, "freeze_backbone": False, "adversarial": None,
                  "name": name or f"{Path(teacher).name}-distilled",
                  "output_dir": str(output_dir) if output_dir is not None else str(Path(teacher).parent)}
        # The teacher's seed and split fractions stay: the student's val split is the teacher's, never its train.
        for key, value in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size)):
            if value is not None:
                values[key] = value
        config = TrainConfig.from_dict(values).validate()
        run_dir = Path(config.output_dir) / config.name
        if RunDir(run_dir).has(CONFIG):
            raise RunError(f"{run_dir} already holds a run; pass resume={str(run_dir)!r} (--resume) or another name")
        spec = teacher_run.preprocessing
    task = teacher_run.task
    try:  # tasks without distillation refuse here, before any data are read
        task.distill_loss(task.loss, settings.temperature, settings.alpha)
    except ConfigError as exc:
        raise ConfigError(f"{settings.teacher}: a {task.name} run; {exc}") from None
    if settings.unlabelled and task.teacher_outputs != "rows":
        raise ConfigError(f"unlabelled images are taken for classifiers; a {task.name} student learns the "
                          "teacher's soft masks on its training cases")
    device = resolve_device(config.device)
    teacher_run.device = device
    teacher_run.model = teacher_run.model.to(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    prepared = prepare_data(dataclasses.replace(config, data_engine="memory"), spec, task, quiet=quiet)
    from lepton.train.loop import model_spec

    model_spec(config, task, prepared)  # the student's network fits the task (a classifier for classification, …)
    if state is not None and state["fingerprint"]["sha256"] != prepared.fingerprint["sha256"]:
        raise RunError(f"{run_dir}: the data at {config.data} changed since distillation started")
    if state is None:
        files = RunDir(run_dir).create()
        files.write_config(config)
        atomic_write_json(run_dir / SETTINGS_FILE, dataclasses.asdict(settings))
        files.write_preprocessing(prepared.spec)
        files.write_labels(prepared.label_names)
        files.write_data(prepared.fingerprint)
    extra_x = _unlabelled_images(settings.unlabelled, prepared.spec) if settings.unlabelled else None
    x_all = prepared.x_train if extra_x is None else torch.cat([prepared.x_train, extra_x.to(prepared.x_train.dtype)])
    key = _key(Path(settings.teacher), prepared.fingerprint, 0 if extra_x is None else len(extra_x))
    if task.teacher_outputs == "cases":  # soft masks: on disk, one case at a time
        outputs: Any = teacher_masks(teacher_run, x_all, run_dir, key, quiet)
    else:
        outputs = torch.from_numpy(teacher_outputs(teacher_run, x_all, run_dir, key, quiet))
    history, best, t0 = _fit(config, task, prepared, device, run_dir, settings, outputs, x_all, state, quiet,
                             teacher_run if settings.consistent else None)
    from lepton.cost import run_cost
    from lepton.models.precision import resolve_precision

    teacher_cost = teacher_run.info.get("cost")
    if not _measured_here(teacher_cost):  # timed elsewhere (or before costs were measured): time it here
        teacher_cost = run_cost(teacher_run)
    record = {"run": settings.teacher, "version": settings.teacher_version, "model": teacher_run.config.model,
              "members": teacher_cost["members"], "tta_views": teacher_cost["tta_views"],
              "forward_passes_per_image": teacher_cost["forward_passes_per_image"],
              task.selection_metric: teacher_run.info.get(task.selection_metric),
              "temperature": settings.temperature, "alpha": settings.alpha, "consistent": settings.consistent,
              "unlabelled_images": 0 if extra_x is None else len(extra_x)}
    precision = resolve_precision(config.precision if config.amp else "fp32", device, spec.spatial_dims)
    run = finish_run(run_dir, config, task, prepared, history, best, None, time.perf_counter() - t0, device, precision,
                     extra={"teacher": record})
    report = compare(teacher_run, run, teacher_cost, n_bootstrap=n_bootstrap)
    metric = report["metric"]
    log.info("student %s: val %s %.4f against the teacher's %.4f; %.1fx its throughput at batch %d",
             config.model, metric, report["student"][f"val_{metric}"], report["teacher"][f"val_{metric}"],
             report["speedup"][f"b{report['serving_batch']}"], report["serving_batch"])
    return run


def _fit(config, task, prepared, device: str, run_dir: Path, settings: DistillSettings, outputs, x_all,
         state: dict[str, Any] | None, quiet: bool, teacher=None):
    """The student's epochs: ``Trainer``'s steps on the teacher's soft targets (``outputs``: probabilities per image,
    or a dense teacher's folder of soft masks), best/last checkpoints and history each epoch (as training writes
    them), from ``state`` when resuming. With ``teacher`` (consistent teaching) each step's targets are its answers on
    that step's augmented batch."""
    import torch

    from lepton.train.checkpoint import save_best, save_last, write_history
    from lepton.train.loop import Trainer, seed_epoch
    from lepton.train.optim import lr_lambda
    from lepton.train.progress import Reporter

    seed_epoch(config.seed, 0)
    trainer = Trainer(config, task, prepared, device)
    n_labelled = len(prepared.y_train)
    targets = task.distill_targets(prepared.y_train, outputs, settings.temperature)
    trainer.loss_fn = task.distill_loss(trainer.loss_fn, settings.temperature, settings.alpha)
    trainer.data = dataclasses.replace(prepared, x_train=x_all, y_train=targets)
    if teacher is not None:
        _teach_on_each_batch(trainer, teacher, settings.temperature)
    steps = trainer.steps_per_epoch * config.epochs
    horizon = 1.0 / (1.0 - config.ema_decay) if config.ema_decay > 0 else 0.0
    if steps < horizon / 2:
        # AdrenalMNIST3D (150 volumes, 4 epochs of 3 steps = 12): the averaged weights stayed near the first steps' and
        # the student fell 0.033 AUC short of its teacher; 30 epochs (90 steps) closed the gap (docs/benchmarks.md).
        log.warning("the student trains %d optimiser steps, fewer than half the EMA horizon (1/(1 - %.3g) = %.0f "
                    "steps): its averaged weights will lag; give more --epochs (a student learns the teacher's "
                    "function slowly) or a smaller batch size", steps, config.ema_decay, horizon)
    if len(x_all) != n_labelled:  # unlabelled images lengthen the epoch: the schedule follows
        if trainer.sample_weight is not None:  # balanced sampling by the teacher's classes where labels are absent
            trainer.sample_weight = task.sample_weights(outputs.argmax(1), config)
        trainer.steps_per_epoch = -(-len(x_all) // trainer.global_batch)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer,
                                                              lr_lambda(config, trainer.steps_per_epoch))
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": None, "epoch": 0, "loss": float("inf")}
    start = 1
    if state is not None:
        trainer.load_state_dict(state)
        history, best, start = state["history"], state["best"], state["epoch"] + 1
        log.info("resuming the distillation in %s at epoch %d", run_dir, start)
    t0 = time.perf_counter()
    reporter = Reporter(quiet, config.epochs, trainer.steps_per_epoch, task.selection_metric)
    with reporter:
        for epoch in range(start, config.epochs + 1):
            e0 = time.perf_counter()
            reporter.start_epoch(epoch)
            trained = trainer.train_epoch(epoch, on_step=reporter.step)
            metrics = trainer.validate()
            row = {"epoch": epoch, "lr": trained["lr"], "train_loss": trained["train_loss"], **metrics,
                   "images_per_s": trained["seen"] / trained["train_seconds"], "seconds": time.perf_counter() - e0}
            history.append(row)
            if _improved(task, metrics, best):
                best = {"score": metrics[task.selection_metric], "epoch": epoch, "loss": metrics["val_loss"]}
                save_best(run_dir, trainer.eval_model, trainer.spec, epoch, metrics)
            save_last(run_dir, {"epoch": epoch, **trainer.state_dict(), "history": history, "best": best,
                                "preprocessing": prepared.spec.to_dict(), "fingerprint": prepared.fingerprint})
            write_history(run_dir, history)
            reporter.end_epoch(row, best)
    if not history:
        raise RunError(f"{run_dir}: no epoch was trained")
    return history, best, t0


def _teach_on_each_batch(trainer, teacher, temperature: float) -> None:
    """Make ``trainer``'s steps take their soft targets from ``teacher`` on the very batch the student trains on (after
    augmentation and patch cutting; normalised as both networks see it), its members and flip TTA as it predicts."""
    import torch

    from lepton.runs import predict_outputs

    step, task = trainer.step, trainer.task

    def consistent_step(xb, yb, epoch, weight=1.0, extras=None):
        probs = predict_outputs(teacher.model, xb, teacher.task.activate, tta=teacher.config.tta,
                                device=trainer.device, batch_size=len(xb))
        return step(xb, task.distill_batch(yb, torch.from_numpy(probs).to(yb.device), temperature), epoch, weight,
                    extras)

    trainer.step = consistent_step


def _measured_here(cost: dict[str, Any] | None) -> bool:
    """Whether a cost record was timed on this machine as it is set up now (CPU, threads, torch)."""
    import torch

    from lepton.models.precision import cpu_model

    return bool(cost) and (cost.get("cpu"), cost.get("threads"), cost.get("torch")) == (
        cpu_model(), torch.get_num_threads(), torch.__version__)


def _improved(task, metrics: dict[str, float], best: dict[str, Any]) -> bool:
    """The selection metric improved (ties: a lower val loss), as training selects its best epoch."""
    score, previous = metrics[task.selection_metric], best["score"]
    if previous is None or score == previous:
        return previous is None or metrics["val_loss"] < best["loss"]
    return score > previous if task.higher_is_better else score < previous


def compare(teacher, student, teacher_cost: dict[str, Any] | None = None, *, n_bootstrap: int = 1000,
            split: str = "val") -> dict[str, Any]:
    """Teacher and student evaluated on the same split (``lepton.evaluate``: metrics with CIs, calibration) and
    their measured costs side by side; writes ``distill_report.json``/``.md`` in the student's run directory (the
    evaluations under ``eval/``: the student's own in ``eval/<split>``, the teacher's in ``eval/teacher-<split>``)."""
    from lepton.cost import run_cost
    from lepton.evaluate import evaluate
    from lepton.runs import Run, load_run
    from lepton.utils import atomic_write_json, atomic_write_text

    student = student if isinstance(student, Run) else load_run(student)
    teacher = teacher if isinstance(teacher, Run) else load_run(teacher)
    out = student.path
    costs = {"teacher": teacher_cost or run_cost(teacher), "student": student.info.get("cost") or run_cost(student)}
    reports = {"teacher": evaluate(teacher, split=split, output=out / "eval" / f"teacher-{split}",
                                   n_bootstrap=n_bootstrap, plots=False, track=[]),
               "student": evaluate(student, split=split, output=out / "eval" / split, n_bootstrap=n_bootstrap)}
    batch = costs["student"]["serving_batch"]
    unit = costs["student"].get("unit", "image")  # a dense task is timed per sliding window
    rows: dict[str, dict[str, Any]] = {}
    metric = "auc"
    for who, rep in reports.items():
        metric, value, ci = student.task.headline(rep)
        fp32 = costs[who]["precisions"]["fp32"]
        rows[who] = {"run": str((teacher if who == "teacher" else student).path), "images": rep["images"],
                     f"val_{metric}": value, f"{metric}_ci95": ci, "ece": rep.get("ece"),
                     "forward_passes_per_image": costs[who]["forward_passes_per_image"],
                     **{f"{k}_b{b}": fp32[f"{k}_b{b}"] for k in ("ms_per_image", "images_per_s") for b in (1, batch)}}
    speed = {f"b{b}": rows["teacher"][f"ms_per_image_b{b}"] / rows["student"][f"ms_per_image_b{b}"] for b in (1, batch)}
    report = {"split": split, "metric": metric, "teacher": rows["teacher"], "student": rows["student"],
              f"{metric}_delta": rows["student"][f"val_{metric}"] - rows["teacher"][f"val_{metric}"],
              "speedup": speed, "serving_batch": batch, "unit": unit, "cost": costs}
    atomic_write_json(out / REPORT_FILE, report)
    name = metric.upper() if metric == "auc" else metric.capitalize()
    lines = [f"# Distillation: {student.path.name}", "", f"Split **{split}** ({rows['student']['images']} images), "
             f"fp32 timings per {unit} on {costs['student'].get('cpu')} ({costs['student'].get('threads')} "
             "threads).", "",
             f"| | {name} [95% CI] | ECE | passes/{unit} | ms/{unit} b1 | ms/{unit} b{batch} |", "|---" * 6 + "|"]
    for who in ("teacher", "student"):
        r = rows[who]
        ci = " [{:.4f}, {:.4f}]".format(*r[f"{metric}_ci95"]) if r[f"{metric}_ci95"] else ""
        lines.append(f"| {who} | {r[f'val_{metric}']:.4f}{ci} | {r['ece']:.4f} | "
                     f"{r['forward_passes_per_image']} | {r['ms_per_image_b1']:.3f} | "
                     f"{r[f'ms_per_image_b{batch}']:.3f} |")
    lines += ["", f"- {name} student − teacher: {report[f'{metric}_delta']:+.4f}",
              f"- Student speed-up: {speed['b1']:.1f}× at batch 1, {speed[f'b{batch}']:.1f}× at batch {batch}"]
    atomic_write_text(out / "distill_report.md", "\n".join(lines) + "\n")
    return report
