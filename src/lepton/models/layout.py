"""Memory layout for speed on CPU and GPU: channels-last for images (N, C, H, W) and volumes (N, C, D, H, W)."""

from __future__ import annotations

import torch
from torch import nn


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last order for its rank (4-D images, 5-D volumes), contiguous otherwise."""
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.ndim == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.contiguous()


def model_layout(model: nn.Module) -> nn.Module:
    """The network's convolution weights in the channels-last order that matches its inputs (2-D or 3-D)."""
    rank = max((p.ndim for p in model.parameters()), default=0)
    if rank == 5:
        return model.to(memory_format=torch.channels_last_3d)
    if rank == 4:
        return model.to(memory_format=torch.channels_last)
    return model
