"""Transfer learning from local weight files (nothing is downloaded): public ImageNet state dicts for the ResNets,
and backbones pretrained by ``lepton pretrain`` (any registered network, 2-D or 3-D) for the network they fit."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lepton.errors import ModelError

log = logging.getLogger("lepton.models")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.")
#: The key of a ``lepton pretrain`` backbone file's description: the network, its input and how it was pretrained.
BACKBONE_KEY = "lepton_backbone"


def _read(path: Path):
    """What a ``.pt``/``.pth``/``.bin``/``.safetensors`` file holds (``_unwrap`` finds the state dict in it)."""
    if not path.is_file():
        raise ModelError(f"{path}: pretrained weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ModuleNotFoundError as exc:
        raise ModelError(f"{path}: reading .safetensors needs `pip install safetensors`") from exc
    except Exception as exc:
        raise ModelError(f"{path}: not a readable weight file ({exc})") from exc
    return state


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: does not hold a state dict of tensors")
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_pretrained(model: torch.nn.Module, info, path: Path, *, spatial_dims: int = 2,
                    in_channels: int | None = None) -> None:
    """Copy matching weights into ``model``: a ``lepton pretrain`` backbone into the network it was pretrained as
    (head left fresh), or an ImageNet state dict (first conv adapted, head dropped); refuse mismatches."""
    raw = _read(path)
    if isinstance(raw, dict) and isinstance(raw.get(BACKBONE_KEY), dict):
        _load_backbone(model, info, path, raw, spatial_dims, in_channels)
        return
    if spatial_dims != 2:
        raise ModelError(f"{path}: pretrained weights are 2-D ImageNet layouts; a {spatial_dims}-D {info.name} takes "
                         f"a backbone from `lepton pretrain SOURCE --model {info.name}` on volumes, or trains from "
                         "scratch")
    if info.pretrained_layout is None:
        raise ModelError(f"{info.name} does not support pretrained ImageNet weights (use a resnet), only backbones "
                         f"from `lepton pretrain SOURCE --model {info.name}`")
    state = _unwrap(raw, path)
    target = model.state_dict()
    head = info.head + "."
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    stem = "conv1.weight"
    if stem in state and stem in target:
        src, dst = state[stem], target[stem]
        if src.shape[1] != dst.shape[1]:
            if dst.shape[1] == 1:
                src = src.sum(dim=1, keepdim=True)  # RGB filters summed for grayscale input
            else:
                src = src.mean(dim=1, keepdim=True).repeat(1, dst.shape[1], 1, 1)
        if src.shape[-2:] != dst.shape[-2:]:
            log.info("%s: stem kernel %s differs from the small-input stem %s; stem re-initialised",
                     path.name, tuple(src.shape[-2:]), tuple(dst.shape[-2:]))
            state.pop(stem)
        else:
            state[stem] = src
    missing = [k for k in target if k not in state and not k.startswith(head) and k != stem]
    unexpected = [k for k in state if k not in target]
    wrong = [k for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {show(unexpected)}")
        if wrong:
            parts.append(f"shape mismatch {len(wrong)}: " + show(
                [f"{k} {tuple(state[k].shape)}≠{tuple(target[k].shape)}" for k in wrong]))
        raise ModelError(
            f"{path}: weights do not fit {info.name} ({'; '.join(parts)}). "
            f"Expected a {info.pretrained_layout} ImageNet state dict"
        )
    model.load_state_dict(state, strict=False)


def _load_backbone(model: torch.nn.Module, info, path: Path, raw: dict, spatial_dims: int,
                   in_channels: int | None) -> None:
    """A ``lepton pretrain`` backbone: refused unless it was pretrained as this very network (architecture, input
    dimensions and channels, stem), then every weight but the head's copied."""
    meta = raw[BACKBONE_KEY]
    arch, dims, chans = meta.get("model"), meta.get("spatial_dims"), meta.get("in_channels")
    what = f"a {dims}-D {arch} backbone with {chans} input channel(s), pretrained by {meta.get('method')}"
    if arch != info.name:
        raise ModelError(f"{path}: {what}; this run builds {info.name}: train with --model {arch}, or pretrain "
                         f"a backbone for {info.name} (lepton pretrain SOURCE --model {info.name})")
    if dims != spatial_dims:
        raise ModelError(f"{path}: {what}; this run's inputs are {spatial_dims}-D: pretrain on "
                         f"{'volumes (--slices volume)' if spatial_dims == 3 else '2-D images'} for it")
    if in_channels is not None and chans != in_channels:
        raise ModelError(f"{path}: {what}; this run's images have {in_channels} channel(s): set --channels {chans} "
                         f"or pretrain with --channels {in_channels}")
    head = info.head + "."
    state = {k: v for k, v in raw["model"].items() if not k.startswith(head)}  # keys as saved (a U-Net's start model.)
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    missing = [k for k in target if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)}≠{tuple(target[k].shape)}" for k in target
             if k in state and state[k].shape != target[k].shape]
    unexpected = [k for k in state if k not in target]
    if missing or wrong or unexpected:
        detail = "; ".join(f"{label} {len(keys)}: {', '.join(keys[:3])}" for label, keys in
                           (("missing", missing), ("shape mismatch", wrong), ("unexpected", unexpected)) if keys)
        raise ModelError(f"{path}: {what} at {meta.get('image_size')} px does not fit this {info.name} ({detail}); "
                         f"train at --image-size {meta.get('image_size')}, or pretrain at this run's size")
    model.load_state_dict(state, strict=False)
    log.info("%s: %s loaded (head %s fresh)", path.name, what, info.head)
