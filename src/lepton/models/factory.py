"""The factory: ``create_model(name)`` builds any registered network; importing it registers the built-ins."""

from __future__ import annotations

from pathlib import Path

from lepton.errors import ModelError
from lepton.models import detection, networks, sequence  # noqa: F401  (registers the built-in networks)
from lepton.models.pretrained import load_pretrained
from lepton.models.registry import ModelInfo, registered, registered_names


def list_models() -> list[ModelInfo]:
    """All registered networks, sorted by name."""
    return [model_info(k) for k in registered_names()]


def model_info(name: str) -> ModelInfo:
    info = registered(name)
    if info is None:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(registered_names())}")
    return info


def create_model(
    name: str,
    in_channels: int = 1,
    num_classes: int = 2,
    pretrained: str | Path | None = None,
    image_size: int = 224,
    spatial_dims: int = 2,
    slab_depth: int | None = None,
    members: int | None = None,
    **options,
):
    """Create a registered network by name.

    ResNets use a small-input stem (3×3 convolution, stride 1, no max-pool) when ``image_size``
    is 64 or less. ``pretrained`` is a local state-dict file (torchvision/timm ImageNet layout for
    the ResNets); RGB first-layer weights are summed for 1-channel input and the head is replaced.

    ``spatial_dims=3`` builds the volume version (inputs (N, C, D, H, W)) of networks that have one.
    ``slab_depth=D`` builds the 2.5-D version instead: the 2-D network over volumes of D slices, read as
    ``in_channels * D`` channels (``SliceChannels``). ``members=K`` (K > 1) builds an ``Ensemble`` of K such networks
    (answering their mean class probabilities, per voxel for segmentation networks). ``options`` go to networks that
    take more (the sequence networks: ``encoder``, ``covariates``, ``fusion``); the others refuse them.

    >>> model = create_model("resnet18", in_channels=1, num_classes=2, image_size=28)
    """
    if in_channels < 1 or num_classes < 1:
        raise ModelError(f"need in_channels >= 1 and num_classes >= 1 outputs (got {in_channels}, {num_classes})")
    info = model_info(name)
    if options.get("covariates") and info.kind == ("image", "vector"):  # a classifier fused with clinical covariates
        from lepton.models.fusion import FEATURES, ImageCovariateNet

        if members is not None and members > 1:
            raise ModelError("an ensemble (members > 1) takes images alone, not covariates")
        fused = {k: options.pop(k) for k in ("covariates", "fusion") if k in options}
        encoder = create_model(name, in_channels, FEATURES, pretrained, image_size, spatial_dims, slab_depth, **options)
        return ImageCovariateNet(encoder, num_classes, **fused)
    if members is not None and members > 1:
        from lepton.models.networks import Ensemble

        # the members' mean softmax over axis 1: class probabilities, or a segmentation network's per voxel
        if info.kind not in (("image", "vector"), ("image", "map")) or pretrained is not None:
            raise ModelError("members > 1 builds an ensemble of classifiers or segmentation networks trained from "
                             "scratch")
        return Ensemble([create_model(name, in_channels, num_classes, image_size=image_size, spatial_dims=spatial_dims,
                                      slab_depth=slab_depth) for _ in range(members)])
    if slab_depth is not None:
        if spatial_dims != 3 or not 1 <= slab_depth <= 512:
            raise ModelError(f"slab_depth={slab_depth}: a 2.5-D network takes volumes (spatial_dims=3) of 1-512 "
                             "slices")
        if pretrained is not None:
            raise ModelError("pretrained weights are 2-D ImageNet layouts with 1 or 3 input channels; a 2.5-D "
                             f"network reads {in_channels * slab_depth} channels: train it from scratch")
        from lepton.models.networks import SliceChannels

        return SliceChannels(create_model(name, in_channels * slab_depth, num_classes, image_size=image_size),
                             slab_depth)
    if spatial_dims not in info.spatial_dims:
        volume = [m.name for m in list_models() if spatial_dims in m.spatial_dims]
        raise ModelError(f"{name} has no {spatial_dims}-D version; networks for {spatial_dims}-D inputs: "
                         f"{', '.join(volume)}")
    try:
        model = info.builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                             spatial_dims=spatial_dims, **options)
    except TypeError as exc:
        if not options:
            raise
        raise ModelError(f"{name} takes no option(s) {', '.join(sorted(options))} ({exc})") from exc
    except ValueError as exc:
        raise ModelError(f"{name}: {exc}") from exc
    if pretrained is not None:
        load_pretrained(model, info, Path(pretrained), spatial_dims=spatial_dims, in_channels=in_channels)
    return model


def head_parameters(model, name: str) -> tuple[list, list]:
    """Split parameters into (backbone, head) for freezing or a separate backbone learning rate."""
    prefix = ("net." if hasattr(model, "depth") and hasattr(model, "net") else "") + model_info(name).head + "."
    prefixes = ("fusion.", "encoder." + prefix) if getattr(model, "wraps_classifier", False) else (prefix,)
    head, backbone = [], []
    for pname, param in model.named_parameters():
        (head if pname.startswith(prefixes) else backbone).append(param)
    return backbone, head
