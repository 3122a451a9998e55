"""Typed training configuration with named presets, read from and written to YAML."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lepton.errors import ConfigError


@dataclass
class TrainConfig:
    """Everything that determines a training run; saved as ``config.yaml`` in the run directory."""

    data: str = ""
    name: str = ""
    output_dir: str = "runs"
    task: str = "classification"  # a name registered in lepton.tasks
    # Options the task reads (``Task.options``), e.g. the sequence task's {fps: 15, frames: 16, target: value,
    # covariates: "age:numeric:years,sex:categorical", fusion: film}; checked by the task when it reads the data.
    task_options: dict[str, Any] = field(default_factory=dict)
    # model
    model: str = "lepton_cnn"
    pretrained: str | None = None
    freeze_backbone: bool = False
    backbone_lr: float | None = None
    # preprocessing
    image_size: int | None = None
    channels: int | None = None
    normalize: str = "dataset"  # "dataset" (train mean/std) or "half" (mean 0.5, std 0.5)
    window: str | None = None
    slices: str = "middle"  # volumes and multi-frame files: the middle slice, all slices, or "volume" (3-D)
    # Volume preprocessing steps (MONAI dictionary transforms, see lepton.data.pipeline), e.g.
    # [{"name": "spacing", "mm": [1.5, 1.5, 3.0]}, {"name": "crop_foreground", "margin": 4}].
    preprocess: list[dict[str, Any]] = field(default_factory=list)
    slab: bool = False  # 2.5-D: a 2-D network reads a volume's slices as input channels
    augment: str = "light"
    augment_options: dict[str, float] = field(default_factory=dict)
    # splits
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    skip_bad: bool = False
    # Where decoded cases live while training (tasks that read through the case cache, such as segmentation):
    # "memory" holds them all as tensors, "cache" reads patches from memory-mapped cases in the on-disk cache (memory
    # does not grow with the data set), "auto" picks memory while the padded tensors fit in ``memory_limit_gb``.
    data_engine: str = "auto"
    memory_limit_gb: float = 2.0
    cache_dir: str | None = None  # default: $LEPTON_CACHE, else ~/.cache/lepton
    workers: int = 0  # processes that decode cases into the cache; 0 = one per core
    loader_workers: int = 0  # DataLoader processes reading cached patches ahead of the step; 0 = in the loop
    # optimisation
    epochs: int = 20
    batch_size: int = 64  # per process: several processes (torchrun) step on batch_size x processes together
    lr: float = 1e-3
    # The learning rate for that effective batch under several processes: none (lr as given), linear (lr x
    # processes, Goyal et al. 2017) or sqrt (lr x sqrt(processes), for adaptive optimisers). One process: lr.
    lr_scaling: str = "none"
    # Several processes: BatchNorm statistics over the global batch (what one process would compute; costs one
    # all-reduce per BatchNorm layer each way), or over each process's share (DDP's default, faster on CPUs).
    sync_batchnorm: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | none
    warmup_epochs: float = 1.0
    step_size: int = 10
    gamma: float = 0.1
    label_smoothing: float = 0.0
    imbalance: str = "weighted"  # none | weighted | balanced
    ema_decay: float = 0.0
    early_stopping: int = 0  # patience in epochs; 0 disables
    # Wall-clock budget of the training loop in seconds (0 = none): after the second epoch the run is
    # re-planned to the epochs that fit (the LR schedule is rescaled), and no epoch starts that would end late.
    time_budget_s: float = 0.0
    # Up to this many members (the same network from other seeds) trained one after another while the time budget
    # has room for whole ones; the run keeps their mean probabilities unless they score below a typical member on
    # val (then the best member).
    ensemble: int = 1
    tta: bool = False
    adversarial: str | None = None  # fgsm | pgd: train on clean plus adversarial copies of each batch
    adv_epsilon: float = 2 / 255
    adv_steps: int = 3
    # Semi-supervised training (lepton.train.semi): unlabelled images (a folder, a CSV of paths or a .npz; never
    # val/test images or patients) learnt from by mean-teacher (consistency with an EMA teacher) or fixmatch
    # (pseudo-labels above a confidence threshold); semi_ratio unlabelled images per labelled one in each step.
    unlabelled: str | None = None
    semi: str | None = None
    semi_threshold: float = 0.95
    semi_weight: float = 1.0
    semi_ratio: int = 2
    # reproducibility and hardware
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: bool = True  # False: train in fp32 whatever ``precision`` says (configs written before precision)
    # Training precision: auto (bf16 autocast on CPUs with AMX/AVX512-BF16 and on bf16 GPUs, fp16 on older
    # CUDA GPUs, fp32 elsewhere), fp32, bf16 or fp16 (CUDA only, with loss scaling).
    precision: str = "auto"
    threads: int | None = None
    preset: str = "default"

    def validate(self) -> TrainConfig:
        """Check value ranges and choices; raise ConfigError naming the field and the fix."""
        _check_numbers(self)
        choices = {
            "schedule": ("cosine", "step", "none"),
            "imbalance": ("none", "weighted", "balanced"),
            "normalize": ("dataset", "half"),
            "slices": ("middle", "all", "volume"),
            "precision": ("auto", "fp32", "bf16", "fp16"),
            "lr_scaling": ("none", "linear", "sqrt"),
            "data_engine": ("auto", "memory", "cache"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.adversarial not in (None, "fgsm", "pgd"):
            raise ConfigError(f"adversarial={self.adversarial!r} is not one of fgsm, pgd")
        if not 0.0 < self.adv_epsilon <= 0.5:
            raise ConfigError(f"adv_epsilon must be in (0, 0.5] on the 0-1 pixel scale (got {self.adv_epsilon})")
        if self.semi not in (None, "mean-teacher", "fixmatch"):
            raise ConfigError(f"semi={self.semi!r} is not one of mean-teacher, fixmatch")
        if bool(self.semi) != bool(self.unlabelled):
            raise ConfigError("semi-supervised training needs both unlabelled (a source of unlabelled images) and "
                              "semi (mean-teacher or fixmatch)")
        if not 0.0 < self.semi_threshold < 1.0:
            raise ConfigError(f"semi_threshold must be in (0, 1) (got {self.semi_threshold})")
        if not 1 <= self.ensemble <= 16:
            raise ConfigError(f"ensemble must be between 1 and 16 members (got {self.ensemble})")
        positive = ("epochs", "batch_size", "lr")
        for key in positive:
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0 (got {getattr(self, key)})")
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, key) < 0.5:
                raise ConfigError(f"{key} must be in [0, 0.5) (got {getattr(self, key)})")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        if not self.time_budget_s >= 0:
            raise ConfigError(f"time_budget_s must be >= 0 seconds, 0 for none (got {self.time_budget_s})")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) (got {self.ema_decay})")
        if self.image_size is not None and not 8 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be between 8 and 1024 (got {self.image_size})")
        if not 0.0 < self.memory_limit_gb <= 4096:
            raise ConfigError(f"memory_limit_gb must be in (0, 4096] (got {self.memory_limit_gb})")
        if not 0 <= self.workers <= 256:
            raise ConfigError(f"workers must be between 0 (one per core) and 256 (got {self.workers})")
        if not 0 <= self.loader_workers <= 64:
            raise ConfigError(f"loader_workers must be between 0 and 64 (got {self.loader_workers})")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1 or 3 (got {self.channels})")
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
        if values["task"] == "classification":
            del values["task"]
        for key in ("preprocess", "slab", "task_options"):  # likewise, left out unless used
            if not values[key]:
                del values[key]
        for key, default in (("ensemble", 1), ("precision", "auto"), ("lr_scaling", "none"),
                             ("sync_batchnorm", True), ("data_engine", "auto"), ("memory_limit_gb", 2.0),
                             ("cache_dir", None), ("workers", 0), ("loader_workers", 0), ("unlabelled", None),
                             ("semi", None), ("semi_threshold", 0.95), ("semi_weight", 1.0), ("semi_ratio", 2)):
            if values[key] == default:
                del values[key]
        return values

    def to_yaml(self, path: Path) -> None:
        from lepton.utils import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
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
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of config fields")
        return cls.from_dict(values)


#: Bounds of the numeric fields, inclusive unless the low end is open: (low, high, whole number, low end open).
#: Fields checked elsewhere in ``validate`` (fractions, ema_decay, image_size, ensemble, adv_epsilon) are not here.
NUMBER_BOUNDS: dict[str, tuple[float, float, bool, bool]] = {
    "epochs": (1, 100_000, True, False),
    "batch_size": (1, 65_536, True, False),
    "lr": (0, 10, False, True),
    "backbone_lr": (0, 10, False, True),
    "weight_decay": (0, 10, False, False),
    "warmup_epochs": (0, 100_000, False, False),
    "step_size": (1, 100_000, True, False),
    "gamma": (0, 1, False, True),
    "early_stopping": (0, 100_000, True, False),
    "time_budget_s": (0, 366 * 86_400, False, False),
    "adv_steps": (1, 1_000, True, False),
    "semi_weight": (0, 100, False, False),
    "semi_ratio": (1, 64, True, False),
    "seed": (0, 2**32 - 1, True, False),
    "threads": (1, 4_096, True, False),
}


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
                 open_low: bool = False) -> int | float:
    """``value`` if it is a finite number from ``low`` (above it with ``open_low``) to ``high``, and a whole number
    with ``whole`` (3.0 is taken as 3, as JSON Schema has it); ConfigError naming ``name`` and the bounds otherwise.
    The one check behind every bounded number a user sets: config files, federation settings, server settings."""
    if whole and isinstance(value, float) and value.is_integer():
        value = int(value)
    number = not isinstance(value, bool) and isinstance(value, int if whole else int | float)
    if not (number and math.isfinite(value) and (value > low if open_low else value >= low) and value <= high):
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{name} must be {kind} {'above' if open_low else 'from'} {low:g} "
                          f"{'and at most' if open_low else 'to'} {high:g} (got {value!r})")
    return value


def _check_numbers(config: TrainConfig) -> None:
    """Every number finite and within NUMBER_BOUNDS; a whole number given as 3.0 (YAML, JSON) is taken as 3."""
    for f in dataclasses.fields(config):
        _check_finite(getattr(config, f.name), f.name)
    for key, (low, high, whole, open_low) in NUMBER_BOUNDS.items():
        value = getattr(config, key)
        if value is None and key in ("backbone_lr", "threads"):
            continue
        setattr(config, key, check_number(key, value, low, high, whole, open_low))


# Named recipes. A preset sets defaults; explicit arguments override them.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Small synthetic demo: fast on 2 CPU cores.
    "demo": {
        "model": "lepton_cnn",
        "epochs": 8,
        "batch_size": 64,
        "lr": 1e-3,
        "augment": "light",
        "imbalance": "weighted",
    },
    # MedMNIST-format data (28-px gray or RGB): the default for .npz and medmnist: sources. Tuned on
    # PneumoniaMNIST train/val only, to train within 10 minutes on 2 CPU cores (see benchmarks/).
    "medmnist": {
        "model": "lepton_cnn",
        "epochs": 40,
        "batch_size": 128,
        "lr": 2e-3,
        "weight_decay": 5e-4,
        "warmup_epochs": 1.0,
        "augment": "xray",
        "label_smoothing": 0.05,
        "normalize": "half",
        "ema_decay": 0.995,
        "tta": True,
        "imbalance": "weighted",
        # The 10-minute budget of `lepton train`, less start-up, data loading and the final evaluation
        # (about 10 s on PneumoniaMNIST) and a margin.
        "time_budget_s": 580.0,
        # Small sets finish the 40 epochs in a fraction of the budget (546 images: ~20 s), and longer schedules
        # only overfit them (benchmarks/preset_adapt.py): the spare budget trains up to 4 more members from other
        # seeds, kept as an ensemble unless it scores below a typical member on val.
        "ensemble": 5,
    },
    # MedMNIST-3D volumes (28^3 grey, e.g. AdrenalMNIST3D, VesselMNIST3D): the default for .npz files holding
    # volumes. The 3-D lepton_cnn on whole volumes with flips, small rotations and shifts; chosen on the shared
    # AdrenalMNIST3D train/val split only, to train within 10 minutes on 2 CPU cores (benchmarks/volumes.py).
    "medmnist3d": {
        "model": "lepton_cnn",
        "epochs": 40,
        "batch_size": 64,
        "lr": 2e-3,
        "weight_decay": 5e-4,
        "warmup_epochs": 1.0,
        "augment": "light",
        "label_smoothing": 0.05,
        "normalize": "half",
        "ema_decay": 0.99,
        "tta": True,
        "imbalance": "weighted",
        # 3-D evaluation and start-up take longer than 2-D: a wider margin under the 10 minutes.
        "time_budget_s": 540.0,
    },
    # Segmentation (2-D or 3-D): MONAI's residual U-Net with Dice + cross-entropy on whole cases (padded to the
    # largest), flips, small rotations and intensity changes, EMA and flip TTA; chosen on the shared hippocampus
    # train cases only (a seeded case split), to train within 15 minutes on 2 CPU cores
    # (benchmarks/segmentation.py).
    "segmentation": {
        "task": "segmentation",
        "model": "unet",
        "epochs": 200,
        "batch_size": 8,
        "lr": 3e-3,
        "weight_decay": 1e-4,
        "warmup_epochs": 2.0,
        "augment": "light",
        "normalize": "dataset",
        "ema_decay": 0.99,
        "tta": True,
        "imbalance": "weighted",
        # 15 minutes less start-up, loading and the final evaluation
        "time_budget_s": 840.0,
    },
    # Detection (2-D or 3-D boxes): MONAI's RetinaNet on a small ResNet + FPN with anchors fitted to the training
    # boxes, box-aware flips, scaling and intensity changes, flip TTA merged by weighted box fusion; model selection on
    # val mAP (benchmarks/detection.py).
    "detection": {
        "task": "detection",
        "model": "retinanet",
        "epochs": 60,
        "batch_size": 8,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_epochs": 2.0,
        "augment": "light",
        "augment_options": {"rotate": 0.0, "vflip": 0.5},
        "normalize": "dataset",
        "tta": True,
        "time_budget_s": 840.0,
    },
}


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
    """The preset ``auto`` resolves to: ``segmentation`` for the segmentation task, ``medmnist3d`` for MedMNIST-format
    volumes, ``medmnist`` for MedMNIST-format images, else ``default``."""
    if task in ("segmentation", "detection"):
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
