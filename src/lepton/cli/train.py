"""``lepton train``: a run from a data source (torchrun for several processes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from lepton.cli.common import (
    RegistryOpt,
    TrackOpt,
    _parse_steps,
    _registry,
    _track,
    app,
    console,
    err,
)


def _registry_ref(value: str) -> bool:
    """Whether ``--pretrained`` names a registry version (``NAME``, ``NAME@3``, ``NAME@production``) rather than a
    weight file: no such file, no folder in it, no weight-file suffix."""
    path = Path(value).expanduser()
    return not path.exists() and "/" not in value and "\\" not in value and \
        path.suffix.lower() not in (".pt", ".pth", ".bin", ".safetensors")


def _task_options(values: list[str] | None, covariates: str | None) -> dict[str, object]:
    """``--task-option KEY=VALUE`` (numbers read as numbers) and ``--covariates`` as the run's task options."""
    out: dict[str, object] = {}
    for item in values or []:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--task-option expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = int(val) if val.strip().lstrip("-").isdigit() else float(val)
        except ValueError:
            out[key.strip()] = val.strip()
    if covariates:
        out["covariates"] = covariates
    return out


def _parse_aug(values: list[str] | None) -> dict[str, float]:
    out = {}
    for item in values or []:
        key, sep, val = item.partition("=")
        try:
            out[key.strip()] = float(val)
        except ValueError:
            raise typer.BadParameter(f"--aug expects KEY=NUMBER, got {item!r}") from None
        if not sep:
            raise typer.BadParameter(f"--aug expects KEY=NUMBER, got {item!r}")
    return out


@app.command()
def train(
    data: Annotated[str | None, typer.Argument(help="Training data source (see `lepton data inspect`).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run directory.")] = None,
    config: Annotated[Path | None, typer.Option(help="A config.yaml to start from.")] = None,
    preset: Annotated[str, typer.Option(help="Named recipe: auto (follows the task and data: segmentation, "
                                             "medmnist3d or medmnist for .npz data, else default), default, demo, "
                                             "medmnist, medmnist3d, segmentation.")] = "auto",
    name: Annotated[str | None, typer.Option(help="Run name (default: data-model-time).")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Parent folder of run directories.")] = None,
    task: Annotated[str | None, typer.Option(help=(
        "What the model learns: classification, segmentation, detection or sequence (or a task registered in "
        "lepton.tasks). Default: the data's layout picks it (a Decathlon folder, images/ + masks/ or a CSV with a "
        "mask column → segmentation; COCO JSON, Pascal VOC or a box CSV → detection; class folders, a label CSV or "
        ".npz → classification); a contradicting --task is refused."))] = None,
    model: Annotated[str | None, typer.Option(help="Network name (`lepton models available`).")] = None,
    pretrained: Annotated[str | None, typer.Option(
        help="Local weights: an ImageNet state dict (ResNets) or a backbone.pt from `lepton pretrain` for the same "
             "network; or a backbone registered in the registry: NAME, NAME@VERSION or NAME@STAGE.")] = None,
    registry: RegistryOpt = None,
    freeze_backbone: Annotated[bool | None, typer.Option("--freeze-backbone", help="Train the head only.")] = None,
    backbone_lr: Annotated[float | None, typer.Option(help="Learning rate of the backbone.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine, step or none.")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Linear warm-up epochs.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing.")] = None,
    imbalance: Annotated[str | None, typer.Option(help="none, weighted (loss) or balanced (sampling).")] = None,
    augment: Annotated[str | None, typer.Option(help="Preset: none, light, xray, corrupt, strong.")] = None,
    aug: Annotated[list[str] | None, typer.Option(help="Override one augmentation option, KEY=VALUE.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size (default: data's native).")] = None,
    channels: Annotated[int | None, typer.Option(help="Input channels, 1 or 3.")] = None,
    window: Annotated[str | None, typer.Option(help="CT window for DICOM/NIfTI: lung, mediastinum, "
                                                    "bone, brain, soft-tissue or C,W.")] = None,
    slices: Annotated[str | None, typer.Option(help="Volumes: the middle slice, all slices, or volume "
                                                    "(whole volumes for 3-D networks).")] = None,
    preprocess: Annotated[list[str] | None, typer.Option(
        help="A volume preprocessing step, in order (repeat): spacing=X,Y,Z (mm), crop_foreground[=MARGIN], "
             "pad=D,H,W, crop_or_pad=D,H,W, resize=D,H,W. Saved with the run; predict and serve apply it.")] = None,
    slab: Annotated[bool | None, typer.Option("--slab", help="2.5-D: a 2-D network reads a volume's slices as "
                                                             "channels (cheaper than 3-D).")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="EMA of weights (0 = off).")] = None,
    early_stopping: Annotated[int | None, typer.Option(help="Patience in epochs (0 = off).")] = None,
    time_budget: Annotated[float | None, typer.Option(help="Seconds the training loop may take; the epochs "
                                                           "are fitted to it after epoch 1 (0 = none).")] = None,
    ensemble: Annotated[int | None, typer.Option(
        help="Up to N members (other seeds) while the time budget has room for whole ones; their mean is kept "
             "unless it scores below a typical member on val.")] = None,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Flip test-time augmentation.")] = None,
    adversarial: Annotated[str | None, typer.Option(help="Adversarial training: fgsm or pgd.")] = None,
    adv_epsilon: Annotated[float | None, typer.Option(help="Attack budget on the 0-1 pixel scale.")] = None,
    unlabelled: Annotated[str | None, typer.Option(
        help="Semi-supervised: unlabelled images (a folder, a CSV with a path column, or a .npz's train images), "
             "refused if any is a val/test image or patient of DATA; with --semi.")] = None,
    semi: Annotated[str | None, typer.Option(help="Semi-supervised method: fixmatch (confident pseudo-labels on "
                                                  "strong views) or mean-teacher (EMA teacher consistency).")] = None,
    semi_threshold: Annotated[float | None, typer.Option(help="FixMatch: the confidence a pseudo-label needs.",
                                                         min=0.01, max=0.999)] = None,
    semi_weight: Annotated[float | None, typer.Option(help="Weight of the unlabelled loss.", min=0, max=100)] = None,
    semi_ratio: Annotated[int | None, typer.Option(help="Unlabelled images per labelled image in a step.", min=1,
                                                   max=64)] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    deterministic: Annotated[bool | None, typer.Option("--deterministic", help="Deterministic kernels.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    precision: Annotated[str | None, typer.Option(
        help="auto (bf16 on CPUs with AMX/AVX512-BF16 and bf16 GPUs, else fp32), fp32, bf16, fp16 (CUDA).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    skip_bad: Annotated[bool | None, typer.Option("--skip-bad", help="Skip unreadable files.")] = None,
    data_engine: Annotated[str | None, typer.Option(
        help="Segmentation: memory (all cases as tensors), cache (patches read from memory-mapped cases in the "
             "on-disk case cache; memory does not grow with the data) or auto (memory while it fits "
             "--memory-limit).")] = None,
    memory_limit: Annotated[float | None, typer.Option(
        help="GB the in-memory path may take before auto switches to the cache.", min=0.001, max=4096)] = None,
    cache_dir: Annotated[str | None, typer.Option(
        help="The case cache's folder (default $LEPTON_CACHE, else ~/.cache/lepton).")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Processes that decode cases into the cache (0 = one per core).", min=0, max=256)] = None,
    loader_workers: Annotated[int | None, typer.Option(
        help="With the cache: DataLoader processes reading patches ahead of each step (0 = in the loop).", min=0,
        max=64)] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Val share when the data has no val split.")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Test share when the data has no splits.")] = None,
    lr_scaling: Annotated[str | None, typer.Option(
        help="With several processes: none (--lr as given), linear (x processes) or sqrt.")] = None,
    sync_bn: Annotated[bool | None, typer.Option(
        "--sync-bn/--no-sync-bn", help="With several processes: BatchNorm over the global batch (default) or over "
                                       "each process's share (faster on CPUs).")] = None,
    nproc: Annotated[int, typer.Option(
        help="Train data-parallel in N local processes under torchrun (gloo on CPU, NCCL on CUDA); "
             "--batch-size is per process.")] = 1,
    max_restarts: Annotated[int, typer.Option(
        help="With --nproc: torchrun restarts a failed job up to N times; it resumes from last.pt.")] = 0,
    task_option: Annotated[list[str] | None, typer.Option(
        help="A task option, KEY=VALUE (the sequence task: fps, frames, size, target=class|value, encoder; with "
             "covariates, both tasks: fusion=late|film, covariate_missing=error|impute).")] = None,
    covariates: Annotated[str | None, typer.Option(
        help="Manifest columns fused with the image: NAME:numeric[:UNIT] or NAME:categorical, comma-separated "
             "(e.g. age:numeric:years,sex:categorical; classification and sequence tasks).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    track: TrackOpt = None,
) -> None:
    """Train a model for the task the data's layout picks (classification, segmentation, detection, sequence;
    --task to say it); writes a run directory with checkpoints, history and curves."""
    import os

    from lepton.config import TrainConfig, make_config
    from lepton.errors import ModelError
    from lepton.train import run_name, summary
    from lepton.train import train as train_fn

    launching = nproc != 1 and "LOCAL_RANK" not in os.environ
    ref = None
    if pretrained and _registry_ref(pretrained):  # a registered backbone's name, resolved to its verified file
        ref, pretrained = pretrained, str(_registry(registry).backbone_file(pretrained))
    _track(track)
    if not launching and max_restarts:
        raise typer.BadParameter("--max-restarts needs --nproc N (or torchrun's own --max-restarts)")
    if resume is not None:
        if launching:
            raise typer.Exit(_launch(nproc, max_restarts, None))
        run = train_fn(resume=resume, quiet=quiet, track=_track(track))
    else:
        overrides = dict(
            name=name, output_dir=output_dir, task=task, model=model, pretrained=pretrained,
            freeze_backbone=freeze_backbone, backbone_lr=backbone_lr, epochs=epochs, batch_size=batch_size,
            lr=lr, weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
            label_smoothing=label_smoothing, imbalance=imbalance, augment=augment,
            augment_options=_parse_aug(aug) or None, image_size=image_size, channels=channels,
            window=window, slices=slices, preprocess=_parse_steps(preprocess), slab=slab,
            ema_decay=ema_decay, early_stopping=early_stopping, tta=tta, ensemble=ensemble,
            time_budget_s=time_budget, lr_scaling=lr_scaling, sync_batchnorm=sync_bn,
            adversarial=adversarial, adv_epsilon=adv_epsilon, unlabelled=unlabelled, semi=semi,
            semi_threshold=semi_threshold, semi_weight=semi_weight, semi_ratio=semi_ratio,
            seed=seed, deterministic=deterministic, device=device, precision=precision, threads=threads,
            skip_bad=skip_bad, val_fraction=val_fraction, test_fraction=test_fraction, data_engine=data_engine,
            memory_limit_gb=memory_limit, cache_dir=cache_dir, workers=workers, loader_workers=loader_workers,
            task_options=_task_options(task_option, covariates) or None,
        )
        if config is not None:
            base = TrainConfig.from_yaml(config).to_dict()
            base.update({k: v for k, v in overrides.items() if v is not None})
            if data:
                base["data"] = data
            base["name"] = name or ""
            cfg = TrainConfig.from_dict(base).validate()
        else:
            if not data:
                raise typer.BadParameter("give a DATA source, --config, or --resume RUN")
            from lepton.tasks import choose_task

            overrides["task"], layout = choose_task(data, task)
            if os.environ.get("RANK", "0") == "0":
                err.print(layout.describe(), highlight=False)
            cfg = make_config(preset, data=data, **overrides)
        if launching:  # every worker and every restart must agree on the run directory: name it now
            raise typer.Exit(_launch(nproc, max_restarts, None if name else run_name(cfg)))
        try:
            run = train_fn(config=cfg, quiet=quiet, track=track)
        except ModelError as exc:
            if ref is None:
                raise
            raise ModelError(str(exc).replace(pretrained, f"the registered backbone {ref}")) from None
    if os.environ.get("RANK", "0") == "0":
        console.print_json(json.dumps(summary(run)))


def _launch(nproc: int, max_restarts: int, name: str | None) -> int:
    """This very command under torchrun, less --nproc/--max-restarts (plus --name): torchrun's exit status."""
    from lepton.train.distributed import launch

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--nproc", "--max-restarts"):
            skip = True
        elif not arg.startswith(("--nproc=", "--max-restarts=")):
            argv.append(arg)
    return launch(argv + (["--name", name] if name else []), nproc, max_restarts)


