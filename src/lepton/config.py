"""Typed training configuration with named presets, read from and written to YAML."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from lepton.errors import ConfigError
from lepton.presets import PRESETS

#: The concerns a field belongs to (its ``group``), in the order ``lepton train --help`` shows them, with titles.
GROUPS: dict[str, str] = {
    "run": "Run", "data": "Data and preprocessing", "model": "Model", "optimisation": "Optimisation",
    "augmentation": "Augmentation, TTA and adversarial training", "budget": "Precision, time budget and ensembles",
    "semi": "Semi-supervised", "hardware": "Hardware, data engine and reproducibility", "task": "Task options",
}


class Bounds(NamedTuple):
    """A number's range, inclusive unless an end is open; ``whole``: an integer (3.0 is taken as 3)."""

    low: float
    high: float
    whole: bool = False
    open_low: bool = False
    open_high: bool = False


def setting(default: Any, help: str, group: str, *, bounds: Bounds | None = None,
            choices: tuple[Any, ...] | None = None, cli: str | bool | None = None, user: bool = True) -> Any:
    """A ``TrainConfig`` field declared once: its default, help, group, bounds or choices, and its ``lepton train``
    option (``cli``: the option's flags, e.g. ``"--tta/--no-tta"``; None: ``--field-name``; False: set by an option
    of its own syntax or not from the command line). ``user=False``: kept for old configs, not for users to set."""
    meta = {"help": help, "group": group, "bounds": bounds, "choices": choices, "cli": cli, "user": user}
    if isinstance(default, dict | list):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that determines a training run; saved as ``config.yaml`` in the run directory. Each field is
    declared once with its help, group, bounds and choices: ``lepton train``'s options, the federation's settings
    and ``validate`` are derived from these declarations."""

    data: str = setting("", "Training data source (see `lepton data inspect`).", "run", cli=False)
    name: str = setting("", "Run name (default: data-model-time).", "run")
    output_dir: str = setting("runs", "Parent folder of run directories.", "run")
    task: str = setting("classification", (
        "What the model learns: classification, segmentation, detection or sequence (or a task registered in "
        "lepton.tasks). Default: the data's layout picks it (a Decathlon folder, images/ + masks/ or a CSV with a "
        "mask column → segmentation; COCO JSON, Pascal VOC or a box CSV → detection; class folders, a label CSV or "
        ".npz → classification); a contradicting --task is refused."), "run")
    task_options: dict[str, Any] = setting({}, (  # noqa: RUF009 (a field() with a default factory)
        "Options the task reads (Task.options), e.g. the sequence task's {fps: 15, frames: 16, target: value, "
        "covariates: 'age:numeric:years,sex:categorical', fusion: film}; checked by the task when it reads the "
        "data. From the command line: --task-option KEY=VALUE and --covariates."), "task", cli=False)
    model: str = setting("lepton_cnn", "Network name (`lepton models available`).", "model")
    pretrained: str | None = setting(None, (
        "Local weights: an ImageNet state dict (ResNets) or a backbone.pt from `lepton pretrain` for the same "
        "network; or a backbone registered in the registry: NAME, NAME@VERSION or NAME@STAGE."), "model")
    freeze_backbone: bool = setting(False, "Train the head only.", "model", cli="--freeze-backbone")
    backbone_lr: float | None = setting(None, "Learning rate of the backbone.", "model",
                                        bounds=Bounds(0, 10, open_low=True))
    image_size: int | None = setting(None, "Square input size (default: data's native).", "data",
                                     bounds=Bounds(8, 1024, whole=True))
    channels: int | None = setting(None, "Input channels, 1 or 3.", "data", choices=(1, 3))
    normalize: str = setting("dataset", "dataset (the training split's mean/std) or half (mean 0.5, std 0.5).",
                             "data", choices=("dataset", "half"))
    window: str | None = setting(None, "CT window for DICOM/NIfTI: lung, mediastinum, bone, brain, soft-tissue or "
                                       "C,W.", "data")
    slices: str = setting("middle", "Volumes and multi-frame files: the middle slice, all slices, or volume (whole "
                                    "volumes for 3-D networks).", "data", choices=("middle", "all", "volume"))
    preprocess: list[dict[str, Any]] = setting([], (  # noqa: RUF009 (likewise)
        "Volume preprocessing steps (MONAI dictionary transforms, lepton.data.transforms.pipeline), in order, e.g. "
        "[{name: spacing, mm: [1.5, 1.5, 3.0]}, {name: crop_foreground, margin: 4}]. Saved with the run; predict "
        "and serve apply them."), "data", cli=False)
    slab: bool = setting(False, "2.5-D: a 2-D network reads a volume's slices as channels (cheaper than 3-D).",
                         "data", cli="--slab")
    augment: str = setting("light", "Augmentation preset: none, light, xray, corrupt, strong.", "augmentation")
    augment_options: dict[str, float] = setting(  # noqa: RUF009 (likewise)
        {}, "Augmentation options over the preset's (--aug KEY=VALUE).", "augmentation", cli=False)
    val_fraction: float = setting(0.15, "Val share when the data has no val split.", "data",
                                  bounds=Bounds(0, 0.5, open_high=True))
    test_fraction: float = setting(0.15, "Test share when the data has no splits.", "data",
                                   bounds=Bounds(0, 0.5, open_high=True))
    skip_bad: bool = setting(False, "Skip unreadable files.", "data", cli="--skip-bad")
    data_engine: str = setting("auto", (
        "Where decoded cases live while training (segmentation): memory (all cases as tensors), cache (patches "
        "read from memory-mapped cases in the on-disk case cache; memory does not grow with the data) or auto "
        "(memory while it fits --memory-limit)."), "hardware", choices=("auto", "memory", "cache"))
    memory_limit_gb: float = setting(2.0, "GB the in-memory path may take before auto switches to the cache.",
                                     "hardware", bounds=Bounds(0, 4096, open_low=True), cli="--memory-limit")
    cache_dir: str | None = setting(None, "The case cache's folder (default $LEPTON_CACHE, else ~/.cache/lepton).",
                                    "hardware")
    workers: int = setting(0, "Processes that decode cases into the cache (0 = one per core).", "hardware",
                           bounds=Bounds(0, 256, whole=True))
    loader_workers: int = setting(0, "With the cache: DataLoader processes reading patches ahead of each step (0 = "
                                     "in the loop).", "hardware", bounds=Bounds(0, 64, whole=True))
    epochs: int = setting(20, "Epochs.", "optimisation", bounds=Bounds(1, 100_000, whole=True))
    batch_size: int = setting(64, "Batch size, per process (several processes step on batch size x processes).",
                              "optimisation", bounds=Bounds(1, 65_536, whole=True))
    lr: float = setting(1e-3, "Peak learning rate (AdamW).", "optimisation", bounds=Bounds(0, 10, open_low=True))
    lr_scaling: str = setting("none", (
        "With several processes: none (--lr as given), linear (x processes, Goyal et al. 2017) or sqrt (for "
        "adaptive optimisers)."), "optimisation", choices=("none", "linear", "sqrt"))
    sync_batchnorm: bool = setting(True, (
        "With several processes: BatchNorm over the global batch (what one process would compute) or over each "
        "process's share (faster on CPUs)."), "hardware", cli="--sync-bn/--no-sync-bn")
    weight_decay: float = setting(1e-4, "AdamW weight decay.", "optimisation", bounds=Bounds(0, 10))
    schedule: str = setting("cosine", "Learning-rate schedule: cosine, step or none.", "optimisation",
                            choices=("cosine", "step", "none"))
    warmup_epochs: float = setting(1.0, "Linear warm-up epochs.", "optimisation", bounds=Bounds(0, 100_000))
    step_size: int = setting(10, "schedule step: epochs between learning-rate drops.", "optimisation",
                             bounds=Bounds(1, 100_000, whole=True))
    gamma: float = setting(0.1, "schedule step: the factor of each drop.", "optimisation",
                           bounds=Bounds(0, 1, open_low=True))
    label_smoothing: float = setting(0.0, "Label smoothing.", "optimisation", bounds=Bounds(0, 1, open_high=True))
    imbalance: str = setting("weighted", "Class imbalance: none, weighted (loss) or balanced (sampling).",
                             "optimisation", choices=("none", "weighted", "balanced"))
    ema_decay: float = setting(0.0, "EMA of weights (0 = off).", "optimisation", bounds=Bounds(0, 1, open_high=True))
    early_stopping: int = setting(0, "Patience in epochs (0 = off).", "optimisation",
                                  bounds=Bounds(0, 100_000, whole=True))
    time_budget_s: float = setting(0.0, (
        "Seconds the training loop may take (0 = none): after epoch 2 the run is re-planned to the epochs that fit "
        "(the schedule rescaled), and no epoch starts that would end late."), "budget",
        bounds=Bounds(0, 366 * 86_400), cli="--time-budget")
    ensemble: int = setting(1, (
        "Up to N members (other seeds) while the time budget has room for whole ones; their mean is kept unless "
        "it scores below a typical member on val."), "budget", bounds=Bounds(1, 16, whole=True))
    tta: bool = setting(False, "Flip test-time augmentation.", "augmentation", cli="--tta/--no-tta")
    adversarial: str | None = setting(None, "Adversarial training on clean plus adversarial copies of each batch: "
                                            "fgsm or pgd.", "augmentation", choices=("fgsm", "pgd"))
    adv_epsilon: float = setting(2 / 255, "Attack budget on the 0-1 pixel scale.", "augmentation",
                                 bounds=Bounds(0, 0.5, open_low=True))
    adv_steps: int = setting(3, "PGD: attack steps.", "augmentation", bounds=Bounds(1, 1_000, whole=True))
    unlabelled: str | None = setting(None, (
        "Semi-supervised: unlabelled images (a folder, a CSV with a path column, or a .npz's train images), "
        "refused if any is a val/test image or patient of DATA; with --semi."), "semi")
    semi: str | None = setting(None, "Semi-supervised method: fixmatch (confident pseudo-labels on strong views) or "
                                     "mean-teacher (EMA teacher consistency).", "semi",
                               choices=("mean-teacher", "fixmatch"))
    semi_threshold: float = setting(0.95, "FixMatch: the confidence a pseudo-label needs.", "semi",
                                    bounds=Bounds(0, 1, open_low=True, open_high=True))
    semi_weight: float = setting(1.0, "Weight of the unlabelled loss.", "semi", bounds=Bounds(0, 100))
    semi_ratio: int = setting(2, "Unlabelled images per labelled image in a step.", "semi",
                              bounds=Bounds(1, 64, whole=True))
    seed: int = setting(0, "Random seed.", "hardware", bounds=Bounds(0, 2**32 - 1, whole=True))
    deterministic: bool = setting(False, "Deterministic kernels.", "hardware", cli="--deterministic")
    device: str = setting("auto", "auto, cpu or cuda.", "hardware")
    amp: bool = setting(True, "False: train in fp32 whatever precision says (configs written before precision).",
                        "budget", cli=False, user=False)
    precision: str = setting("auto", (
        "Training precision: auto (bf16 on CPUs with AMX/AVX512-BF16 and bf16 GPUs, fp16 on older CUDA GPUs, else "
        "fp32), fp32, bf16, fp16 (CUDA, with loss scaling)."), "budget", choices=("auto", "fp32", "bf16", "fp16"))
    threads: int | None = setting(None, "CPU threads.", "hardware", bounds=Bounds(1, 4_096, whole=True))
    preset: str = setting("default", "The named recipe the defaults came from (lepton.presets).", "run", cli=False)

    def validate(self) -> TrainConfig:
        """Check every field against its declaration (finite numbers within bounds, choices) and the fields
        against each other; ConfigError naming the field and the fix."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_field(f.name, getattr(self, f.name)))
        if bool(self.semi) != bool(self.unlabelled):
            raise ConfigError("semi-supervised training needs both unlabelled (a source of unlabelled images) and "
                              "semi (mean-teacher or fixmatch)")
        if self.slab and self.slices != "volume" and not str(self.data).lower().endswith(".npz"):
            raise ConfigError("slab (2.5-D) reads volumes: set slices='volume' (or use a .npz of volumes)")
        if not isinstance(self.preprocess, list):
            raise ConfigError("preprocess must be a list of steps, e.g. [{name: spacing, mm: [1.5, 1.5, 3.0]}]")
        if not self.data:
            raise ConfigError("data is empty: pass a dataset path, e.g. `lepton train DATA`")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values. ``task`` is left out when it is the default, classification, so that runs
        and registry versions of classifiers stay readable by Lepton versions older than tasks (a registry shared
        by servers of two versions during a rolling upgrade); ``preprocess``, ``slab``, ``ensemble``, ``precision``,
        ``lr_scaling``, ``sync_batchnorm`` and the data engine's settings too when unused or at their defaults."""
        values = dataclasses.asdict(self)
        if values["task"] == FIELDS["task"].default:
            del values["task"]
        for key in ("preprocess", "slab", "task_options"):  # likewise, left out unless used
            if not values[key]:
                del values[key]
        for key in ("ensemble", "precision", "lr_scaling", "sync_batchnorm", "data_engine", "memory_limit_gb",
                    "cache_dir", "workers", "loader_workers", "unlabelled", "semi", "semi_threshold", "semi_weight",
                    "semi_ratio"):  # fields newer than the first runs: at their defaults, as those runs read
            if values[key] == FIELDS[key].default:
                del values[key]
        return values

    def to_yaml(self, path: Path) -> None:
        """``config.yaml``, flat (one key per field): readable by every Lepton version, including those older than
        groups that share a registry with this one."""
        import yaml

        from lepton.utils import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from flat fields or fields grouped by concern (``{optimisation: {lr: 0.01}, ...}``)."""
        values = flatten_config(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config field(s): {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}"
            )
        for key, value in values.items():
            _check_finite(value, key)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: Path) -> TrainConfig:
        return cls.from_dict(read_yaml(path))


#: Every field's declaration by name.
FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping; ConfigError naming the file otherwise."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config fields")
    return values


def flatten_config(values: dict[str, Any]) -> dict[str, Any]:
    """Config fields from a mapping that may group them by concern (a group's name, one of ``GROUPS``, holding a
    mapping; ``data`` and ``task`` are groups only when they hold one), as one flat mapping."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        grouped = key in GROUPS and isinstance(value, dict)  # no group is named after a mapping field
        for name, item in (value.items() if grouped else [(key, value)]):
            if name in out:
                raise ConfigError(f"config field {name} is given twice (flat and in a group, or in two groups)")
            out[name] = item
    return out


def check_field(name: str, value: Any, label: str | None = None) -> Any:
    """``value`` checked against field ``name``'s declaration — a finite number within its bounds (a whole number
    given as 3.0 taken as 3), one of its choices — or ConfigError naming ``label`` (default: the field)."""
    f, label = FIELDS[name], label or name
    _check_finite(value, label)
    if value is None and f.default is None:
        return value
    meta = f.metadata
    if meta["bounds"] is not None:
        value = check_number(label, value, *meta["bounds"])
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{label}={value!r} is not one of {', '.join(map(str, meta['choices']))}")
    return value


def _check_finite(value: Any, where: str) -> None:
    """ConfigError naming the field (``preprocess[0].mm[2]``) when a number in ``value`` is NaN or infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number (got {value})")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def check_number(name: str, value: Any, low: float, high: float, whole: bool = False,
                 open_low: bool = False, open_high: bool = False) -> int | float:
    """``value`` if it is a finite number from ``low`` (above it with ``open_low``) to ``high`` (below it with
    ``open_high``), and a whole number with ``whole`` (3.0 is taken as 3, as JSON Schema has it); ConfigError naming
    ``name`` and the bounds otherwise. The one check behind every bounded number a user sets: config files,
    federation settings, server settings."""
    if whole and isinstance(value, float) and value.is_integer():
        value = int(value)
    number = not isinstance(value, bool) and isinstance(value, int if whole else int | float)
    if not (number and math.isfinite(value) and (value > low if open_low else value >= low)
            and (value < high if open_high else value <= high)):
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{name} must be {kind} {'above' if open_low else 'from'} {low:g} "
                          f"{'and below' if open_high else 'and at most' if open_low else 'to'} {high:g} "
                          f"(got {value!r})")
    return value


def _npz_holds_volumes(path: str) -> bool:
    """Whether a MedMNIST-format file's ``train_images`` are volumes (N, D, H, W), read from the array header
    alone (nothing is loaded)."""
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as zf, zf.open("train_images.npy") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = read(fh)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    return len(shape) == 5 or (len(shape) == 4 and shape[-1] not in (1, 3))


def auto_preset(data: str | None, task: str | None = None) -> str:
    """The preset ``auto`` resolves to: the task's own preset (one of its name made for it: ``segmentation``,
    ``detection``), ``medmnist3d`` for MedMNIST-format volumes, ``medmnist`` for MedMNIST-format images, else
    ``default``."""
    if task and PRESETS.get(task, {}).get("task") == task:
        return task
    text = str(data or "")
    if text.lower().endswith(".npz") and _npz_holds_volumes(text):
        return "medmnist3d"
    return "medmnist" if text.startswith("medmnist:") or text.lower().endswith(".npz") else "default"


def make_config(preset: str = "auto", **overrides: Any) -> TrainConfig:
    """Build a validated config from a named preset plus explicit overrides (None = keep preset).

    ``auto`` picks ``medmnist3d`` for ``.npz`` files of volumes, ``medmnist`` for other ``.npz``/``medmnist:``
    sources and ``default`` otherwise. An explicit ``epochs`` without ``ensemble`` trains one network even under a
    preset that fills its time budget with ensemble members (logged).
    """
    if preset == "auto":
        preset = auto_preset(overrides.get("data"), overrides.get("task"))
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose auto or one of {', '.join(PRESETS)}")
    values: dict[str, Any] = {"preset": preset, **PRESETS[preset]}
    given = {k: v for k, v in overrides.items() if v is not None}
    if "epochs" in given and "ensemble" not in given and values.get("ensemble", 1) > 1:
        # Explicit epochs are the length of one network's schedule, not of each of several members: one member
        # unless the ensemble is asked for too (a budget-filling preset would otherwise repeat them quietly).
        import logging

        logging.getLogger("lepton.config").warning(
            "epochs=%s given: training one network, not the %s preset's up to %s budget-filling ensemble members "
            "(pass ensemble=%s, --ensemble %s, to train them)", given["epochs"], preset, values["ensemble"],
            values["ensemble"], values["ensemble"])
        values["ensemble"] = 1
    values.update(given)
    return TrainConfig.from_dict(values).validate()
