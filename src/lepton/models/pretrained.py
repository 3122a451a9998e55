"""Transfer learning from local weight files (nothing is downloaded)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lepton.errors import ModelError

log = logging.getLogger("lepton.models")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.pt``/``.pth``/``.bin``/``.safetensors``, unwrapping common containers."""
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


def load_pretrained(model: torch.nn.Module, info, path: Path) -> None:
    """Copy matching weights into ``model``: adapt the first conv, drop the head, refuse mismatches."""
    if info.pretrained_layout is None:
        raise ModelError(f"{info.name} does not support pretrained weights; use a resnet")
    state = read_state_dict(path)
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
