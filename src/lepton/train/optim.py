"""Optimisation parts: AdamW parameter groups, warm-up + cosine/step schedules, EMA, BatchNorm recalibration."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lepton.config import TrainConfig
from lepton.models import head_parameters
from lepton.models.layout import fast_layout


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and norms, an optional backbone LR, and a frozen backbone if asked."""
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


def lr_lambda(config: TrainConfig, steps_per_epoch: int):
    """The LR factor per optimiser step: linear warm-up, then cosine (to 1 %), step decay or constant.

    ``config.epochs`` is read at every step, so a time budget that shortens the run stretches the schedule."""
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        total = config.epochs * steps_per_epoch
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if config.schedule == "step":
            return config.gamma ** ((step // steps_per_epoch) // config.step_size)
        return 1.0

    return factor


def ema_update(decay: float):
    """EMA with warm-up: the decay ramps as (1 + n) / (10 + n) up to ``decay``, so short runs
    average recent weights instead of staying near the initialisation."""

    def update(ema_params, params, num_averaged) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for e, p in zip(ema_params, params, strict=True):
            e.lerp_(p.to(e.dtype), weight) if e.is_floating_point() else e.copy_(p)

    return update


def recalibrate_bn(model: nn.Module, batches: Callable[[], Iterable[torch.Tensor]], device: str) -> None:
    """Recompute BatchNorm statistics as a cumulative average over the inputs that ``batches()`` yields (averaged
    weights need their own); a model without BatchNorm reads nothing."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the slice
    model.train()
    with torch.no_grad():
        for batch in batches():
            model(fast_layout(batch.to(device)))
    for m, momentum in momenta.items():
        m.momentum = momentum
    model.eval()
