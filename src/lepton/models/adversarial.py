"""Adversarial examples (FGSM, PGD) against a network: used by adversarial training and the robustness report."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lepton.errors import ConfigError
from lepton.models.layout import fast_layout

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def attack(model, normalize, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = "pgd",
           steps: int = 10, seed: int = 0, loss_fn: Loss | None = None) -> torch.Tensor:
    """FGSM or PGD (L∞, random start, step eps/4) adversarial images in [0, 1] for targets ``y``.

    ``loss_fn(outputs, y)`` is the loss the attack ascends: the task's own (cross-entropy by default).
    """
    if method not in ("fgsm", "pgd"):
        raise ConfigError(f"unknown attack {method!r}; use fgsm or pgd")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x0 = x.detach()
    if method == "fgsm":
        x_adv, steps, step = x0.clone(), 1, eps
    else:
        x_adv = (x0 + (torch.rand(x0.shape, generator=g).to(x0.device) * 2 - 1) * eps).clamp(0, 1)
        step = eps / 4
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = (loss_fn or F.cross_entropy)(model(fast_layout(normalize(x_adv))), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = (x_adv.detach() + step * grad.sign()).clamp(x0 - eps, x0 + eps).clamp(0, 1)
    model.train(was_training)
    return x_adv.detach()
