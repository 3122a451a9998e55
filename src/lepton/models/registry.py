"""A registry of classification networks: adding one is a single decorated function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lepton.errors import ModelError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    head: str  # attribute path of the classification layer, replaced for transfer learning
    builder: Callable[..., object]
    pretrained_layout: str | None = None  # which public weight layout `pretrained=` accepts
    cam_layer: str = ""  # last spatial feature layer, the default Grad-CAM target


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, description: str, head: str, pretrained_layout: str | None = None,
                   cam_layer: str = ""):
    """Decorator: register ``fn(in_channels, num_classes, image_size) -> nn.Module`` as ``name``."""

    def wrap(fn: Callable[..., object]) -> Callable[..., object]:
        _REGISTRY[name] = ModelInfo(name, description, head, fn, pretrained_layout, cam_layer)
        return fn

    return wrap


def list_models() -> list[ModelInfo]:
    """All registered networks, sorted by name."""
    from lepton.models import networks  # noqa: F401  (registers the built-in networks)

    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def model_info(name: str) -> ModelInfo:
    from lepton.models import networks  # noqa: F401

    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(
    name: str,
    in_channels: int = 1,
    num_classes: int = 2,
    pretrained: str | Path | None = None,
    image_size: int = 224,
):
    """Create a registered network by name.

    ResNets use a small-input stem (3×3 convolution, stride 1, no max-pool) when ``image_size``
    is 64 or less. ``pretrained`` is a local state-dict file (torchvision/timm ImageNet layout for
    the ResNets); RGB first-layer weights are summed for 1-channel input and the head is replaced.

    >>> model = create_model("resnet18", in_channels=1, num_classes=2, image_size=28)
    """
    if in_channels < 1 or num_classes < 2:
        raise ModelError(f"need in_channels >= 1 and num_classes >= 2 (got {in_channels}, {num_classes})")
    info = model_info(name)
    model = info.builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    if pretrained is not None:
        from lepton.models.pretrained import load_pretrained

        load_pretrained(model, info, Path(pretrained))
    return model


def head_parameters(model, name: str) -> tuple[list, list]:
    """Split parameters into (backbone, head) for freezing or a separate backbone learning rate."""
    prefix = model_info(name).head + "."
    head, backbone = [], []
    for pname, param in model.named_parameters():
        (head if pname.startswith(prefix) else backbone).append(param)
    return backbone, head
