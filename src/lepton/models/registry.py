"""The table of networks: adding one is a single decorated function (``@register_model``) in its own module.

This module holds only the table; ``lepton.models.factory`` fills it with the built-in networks and builds them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    head: str  # attribute path of the classification layer, replaced for transfer learning
    builder: Callable[..., object]
    pretrained_layout: str | None = None  # which public weight layout `pretrained=` accepts
    cam_layer: str = ""  # last spatial feature layer, the default Grad-CAM target
    spatial_dims: tuple[int, ...] = (2,)  # 2: images (N, C, H, W); 3: volumes (N, C, D, H, W)
    task: str = "classification"  # what the outputs are: "classification" (N, K) or "segmentation" (N, K, …)
    divisor: int = 1  # the input's spatial size must be a multiple of this (encoder-decoder networks)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, description: str, head: str, pretrained_layout: str | None = None,
                   cam_layer: str = "", spatial_dims: tuple[int, ...] = (2,), task: str = "classification",
                   divisor: int = 1):
    """Decorator: register ``fn(in_channels, num_classes, image_size, spatial_dims) -> nn.Module`` as ``name``."""

    def wrap(fn: Callable[..., object]) -> Callable[..., object]:
        _REGISTRY[name] = ModelInfo(name, description, head, fn, pretrained_layout, cam_layer, spatial_dims, task,
                                    divisor)
        return fn

    return wrap


def registered(name: str) -> ModelInfo | None:
    """The entry for ``name`` if one was registered (built-ins are registered by ``lepton.models.factory``)."""
    return _REGISTRY.get(name)


def registered_names() -> list[str]:
    return sorted(_REGISTRY)
