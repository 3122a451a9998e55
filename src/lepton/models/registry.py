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
    divisor: int = 1  # the input's spatial size must be a multiple of this (encoder-decoder networks)
    inputs: str = "image"  # what it takes: "image" (2-D images or 3-D volumes) or "clip" (frames over time, signals)
    output: str = "vector"  # what it answers: "vector" (N, K), "map" (N, K, …) on the input's grid, "boxes" (detector)

    @property
    def kind(self) -> tuple[str, str]:
        """``(inputs, output)``: what a task asks of the networks it trains (``Task.network_kind``)."""
        return self.inputs, self.output


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, description: str, head: str, pretrained_layout: str | None = None,
                   cam_layer: str = "", spatial_dims: tuple[int, ...] = (2,), divisor: int = 1,
                   inputs: str = "image", output: str = "vector"):
    """Decorator: register ``fn(in_channels, num_classes, image_size, spatial_dims) -> nn.Module`` as ``name``; a
    network that takes clips or answers a map or boxes says so (``inputs``, ``output``: see ``ModelInfo``)."""

    def wrap(fn: Callable[..., object]) -> Callable[..., object]:
        _REGISTRY[name] = ModelInfo(name, description, head, fn, pretrained_layout, cam_layer, spatial_dims, divisor,
                                    inputs, output)
        return fn

    return wrap


def registered(name: str) -> ModelInfo | None:
    """The entry for ``name`` if one was registered (built-ins are registered by ``lepton.models.factory``)."""
    return _REGISTRY.get(name)


def registered_names() -> list[str]:
    return sorted(_REGISTRY)
