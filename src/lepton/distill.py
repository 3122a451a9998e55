"""Knowledge distillation: a run's ensemble and flip TTA (the teacher) taught to one network (the student).

The teacher's activated outputs on the training images (and on any unlabelled images given) are computed once and
cached in the student's run directory (``teacher_outputs.npz``). The student trains on them with the usual parts of
``lepton.train`` — ``Trainer`` with a loss that mixes the KL divergence to the teacher's probabilities at a
temperature (Hinton et al., 2015) with the hard-label loss — checkpoints every epoch (``last.pt``; a killed
distillation resumes exactly), and ends as any run ends (``finish_run``: decision fitted on val, ``run.json`` with
its measured cost). The student is then evaluated on val beside its teacher (``lepton.evaluate``: metrics with CIs,
calibration) in ``distill_report.json``/``.md``; export, quantisation, serving and registration take it like any
run, and its card names its teacher.

Classification only: a segmentation teacher's soft masks would need per-patch targets that follow the random
patches and augmentation of dense training (not built).
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

log = logging.getLogger("lepton.distill")

SETTINGS_FILE = "distill.json"
TEACHER_FILE = "teacher_outputs.npz"
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

    def check(self) -> DistillSettings:
        if not 0.5 <= self.temperature <= 50:
            raise ConfigError(f"temperature must be between 0.5 and 50 (got {self.temperature})")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha (the soft-target weight) must be in [0, 1] (got {self.alpha})")
        return self


def soft_targets(probs, temperature: float):
    """Probabilities sharpened or softened at ``temperature``: softmax(log p / T), the teacher's logits being the
    log of its (ensemble-mean) probabilities."""
    import torch

    return torch.softmax(torch.log(probs.float().clamp_min(1e-8)) / temperature, dim=1)


def kd_loss(hard_loss, temperature: float, alpha: float):
    """The student's loss on a target row ``[teacher probabilities at T …, hard label]`` (label -1: unlabelled):
    ``alpha · T² · KL(teacher_T ‖ student_T) + (1 - alpha) · hard_loss`` over the labelled rows."""
    import torch.nn.functional as F

    def loss(logits, target):
        logits = logits.float()
        soft, hard = target[:, :-1].float(), target[:, -1].long()
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean") * temperature ** 2
        labelled = hard >= 0
        ce = hard_loss(logits[labelled], hard[labelled]) if bool(labelled.any()) else logits.sum() * 0.0
        return alpha * kd + (1.0 - alpha) * ce

    return loss


def _unlabelled_images(source: str, spec) -> Any:
    """Images without labels, in [0, 1] at the teacher's input size: a folder (every readable image file under it,
    recursively; unreadable ones skipped with a warning) or a MedMNIST-format ``.npz`` (its ``train_images``, never
    its val or test images), listed by ``lepton.data.unlabelled``."""
    import torch

    from lepton.data.io import read_image
    from lepton.data.unlabelled import load_unlabelled

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
    from lepton.utils import sha256_bytes

    return sha256_bytes((teacher_dir / "best.pt").read_bytes() + json.dumps(
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


def distill(
    teacher: str | Path | None = None,
    *,
    student: str | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    unlabelled: str | None = None,
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

    ``resume`` continues a killed distillation from its run directory. The student predicts without TTA (one
    forward pass per image); ``epochs`` defaults to the teacher's schedule, ``teacher_version`` names the teacher's
    registered version for the card.

    >>> student = distill("runs/pneumonia", student="lepton_cnn", temperature=4)   # doctest: +SKIP
    """
    import torch

    from lepton.config import TrainConfig
    from lepton.data.transforms import Preprocessing
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
        config = TrainConfig.from_yaml(run_dir / "config.yaml").validate()
        teacher_run = load_run(settings.teacher)
        spec = Preprocessing.from_dict(state["preprocessing"])
    else:
        if teacher is None:
            raise ConfigError("give the teacher RUN to distil, or --resume STUDENT_RUN")
        teacher_run = load_run(teacher)
        if teacher_run.task.dense or teacher_run.task.name != "classification":
            raise ConfigError(f"{teacher}: a {teacher_run.task.name} run; distillation takes classifiers "
                              "(segmentation soft masks are not built)")
        settings = DistillSettings(str(Path(teacher).resolve()), student or teacher_run.config.model, temperature,
                                   alpha, unlabelled, teacher_version).check()
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
        if (run_dir / "config.yaml").exists():
            raise RunError(f"{run_dir} already holds a run; pass resume={str(run_dir)!r} (--resume) or another name")
        spec = teacher_run.preprocessing
    from lepton.models import model_info

    if model_info(config.model).task == "segmentation":
        raise ConfigError(f"{config.model} is a segmentation network; choose a classifier as the student")
    device = resolve_device(config.device)
    teacher_run.device = device
    teacher_run.model = teacher_run.model.to(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    task = teacher_run.task
    prepared = prepare_data(dataclasses.replace(config, data_engine="memory"), spec, task, quiet=quiet)
    if state is not None and state["fingerprint"]["sha256"] != prepared.fingerprint["sha256"]:
        raise RunError(f"{run_dir}: the data at {config.data} changed since distillation started")
    if state is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(run_dir / "config.yaml")
        atomic_write_json(run_dir / SETTINGS_FILE, dataclasses.asdict(settings))
        atomic_write_json(run_dir / "preprocessing.json", prepared.spec.to_dict())
        atomic_write_json(run_dir / "labels.json", prepared.label_names)
        atomic_write_json(run_dir / "data.json", prepared.fingerprint)
    extra_x = _unlabelled_images(settings.unlabelled, prepared.spec) if settings.unlabelled else None
    x_all = prepared.x_train if extra_x is None else torch.cat([prepared.x_train, extra_x.to(prepared.x_train.dtype)])
    key = _key(Path(settings.teacher), prepared.fingerprint, 0 if extra_x is None else len(extra_x))
    probs = torch.from_numpy(teacher_outputs(teacher_run, x_all, run_dir, key, quiet))
    history, best, t0 = _fit(config, task, prepared, device, run_dir, settings, probs, x_all, state, quiet)
    from lepton.cost import run_cost
    from lepton.models.precision import resolve_precision

    teacher_cost = teacher_run.info.get("cost")
    if not _measured_here(teacher_cost):  # timed elsewhere (or before costs were measured): time it here
        teacher_cost = run_cost(teacher_run)
    record = {"run": settings.teacher, "version": settings.teacher_version, "model": teacher_run.config.model,
              "members": teacher_cost["members"], "tta_views": teacher_cost["tta_views"],
              "forward_passes_per_image": teacher_cost["forward_passes_per_image"],
              "val_auc": teacher_run.info.get("val_auc"), "temperature": settings.temperature,
              "alpha": settings.alpha, "unlabelled_images": 0 if extra_x is None else len(extra_x)}
    precision = resolve_precision(config.precision if config.amp else "fp32", device, spec.spatial_dims)
    run = finish_run(run_dir, config, task, prepared, history, best, None, time.perf_counter() - t0, device, precision,
                     extra={"teacher": record})
    report = compare(teacher_run, run, teacher_cost, n_bootstrap=n_bootstrap)
    log.info("student %s: val AUC %.4f against the teacher's %.4f; %.1fx its throughput at batch %d",
             config.model, report["student"]["val_auc"], report["teacher"]["val_auc"],
             report["speedup"][f"b{report['serving_batch']}"], report["serving_batch"])
    return run


def _fit(config, task, prepared, device: str, run_dir: Path, settings: DistillSettings, probs, x_all,
         state: dict[str, Any] | None, quiet: bool):
    """The student's epochs: ``Trainer``'s steps on the teacher's soft targets, best/last checkpoints and history
    each epoch (as training writes them), from ``state`` when resuming."""
    import torch

    from lepton.train.checkpoint import save_best, save_last, write_history
    from lepton.train.loop import Trainer, seed_epoch
    from lepton.train.optim import lr_lambda
    from lepton.train.progress import Reporter

    seed_epoch(config.seed, 0)
    trainer = Trainer(config, task, prepared, device)
    n_labelled = len(prepared.y_train)
    hard = torch.cat([prepared.y_train.float(), torch.full((len(x_all) - n_labelled,), -1.0)])
    targets = torch.cat([soft_targets(probs, settings.temperature), hard[:, None]], dim=1)
    trainer.loss_fn = kd_loss(trainer.loss_fn, settings.temperature, settings.alpha)
    trainer.data = dataclasses.replace(prepared, x_train=x_all, y_train=targets)
    if len(x_all) != n_labelled:  # unlabelled images lengthen the epoch: the schedule follows
        if trainer.sample_weight is not None:  # balanced sampling by the teacher's classes where labels are absent
            trainer.sample_weight = task.sample_weights(probs.argmax(1), config)
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
    rows: dict[str, dict[str, Any]] = {}
    for who, rep in reports.items():
        m = rep["metrics"][rep["primary_threshold"]]
        fp32 = costs[who]["precisions"]["fp32"]
        rows[who] = {"run": str((teacher if who == "teacher" else student).path), "images": rep["images"],
                     "val_auc": m["auc"], "auc_ci95": (m.get("ci95") or {}).get("auc"), "val_acc": m["acc"],
                     "ece": rep.get("ece"), "forward_passes_per_image": costs[who]["forward_passes_per_image"],
                     **{f"{k}_b{b}": fp32[f"{k}_b{b}"] for k in ("ms_per_image", "images_per_s") for b in (1, batch)}}
    speed = {f"b{b}": rows["teacher"][f"ms_per_image_b{b}"] / rows["student"][f"ms_per_image_b{b}"] for b in (1, batch)}
    report = {"split": split, "teacher": rows["teacher"], "student": rows["student"],
              "auc_delta": rows["student"]["val_auc"] - rows["teacher"]["val_auc"], "speedup": speed,
              "serving_batch": batch, "cost": costs}
    atomic_write_json(out / REPORT_FILE, report)
    lines = [f"# Distillation: {student.path.name}", "", f"Split **{split}** ({rows['student']['images']} images), "
             f"fp32 timings on {costs['student'].get('cpu')} ({costs['student'].get('threads')} threads).", "",
             f"| | AUC [95% CI] | ACC | ECE | passes/image | ms/image b1 | ms/image b{batch} |", "|---" * 7 + "|"]
    for who in ("teacher", "student"):
        r = rows[who]
        ci = " [{:.4f}, {:.4f}]".format(*r["auc_ci95"]) if r["auc_ci95"] else ""
        lines.append(f"| {who} | {r['val_auc']:.4f}{ci} | {r['val_acc']:.4f} | {r['ece']:.4f} | "
                     f"{r['forward_passes_per_image']} | {r['ms_per_image_b1']:.3f} | "
                     f"{r[f'ms_per_image_b{batch}']:.3f} |")
    lines += ["", f"- AUC student − teacher: {report['auc_delta']:+.4f}",
              f"- Student speed-up: {speed['b1']:.1f}× at batch 1, {speed[f'b{batch}']:.1f}× at batch {batch}"]
    atomic_write_text(out / "distill_report.md", "\n".join(lines) + "\n")
    return report
