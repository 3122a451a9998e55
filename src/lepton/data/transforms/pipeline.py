"""Geometric preprocessing of volumes as MONAI dictionary transforms, kept as a serialisable list of steps.

A run saves its steps (``preprocessing.json``) and every later reader of that run — evaluate, predict, explain,
the server — applies the same list, built into the same MONAI ``Compose``. Steps run on reader output: volumes
already in network order (D, H, W) with their affine (voxel -> RAS mm) and values in [0, 1]; masks, when given,
go through the same geometry with nearest-neighbour interpolation.

A step is ``{"name": ..., <arguments>}``:

- ``spacing``: ``mm`` = [x, y, z] voxel size in mm (RAS order, as NIfTI headers give it); resampled with MONAI's
  ``Spacingd`` using the volume's affine.
- ``crop_foreground``: ``threshold`` (default 0.0: values above it are foreground), ``margin`` voxels (default 0);
  MONAI's ``CropForegroundd`` around the image's foreground.
- ``pad``: ``size`` = [D, H, W]; pad up to at least this size (``SpatialPadd``, zeros).
- ``crop_or_pad``: ``size`` = [D, H, W]; centre crop or pad to exactly this size (``ResizeWithPadOrCropd``).
- ``resize``: ``size`` = [D, H, W]; resample to this size (``Resized``: area when shrinking, trilinear otherwise).

Orientation is not a step: every volume reader already gives RAS, in network order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lepton.errors import ConfigError, DataError

#: Each step's arguments: name -> (required, optional with defaults).
STEPS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "spacing": (("mm",), {}),
    "crop_foreground": ((), {"threshold": 0.0, "margin": 0}),
    "pad": (("size",), {}),
    "crop_or_pad": (("size",), {}),
    "resize": (("size",), {}),
}
#: The argument a compact ``name=value`` form sets (``--preprocess spacing=1x1x3``).
MAIN_ARGUMENT = {"spacing": "mm", "crop_foreground": "margin", "pad": "size", "crop_or_pad": "size",
                 "resize": "size"}


def check_steps(steps: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Validate and normalise a list of steps (names, argument names, numbers); raise ConfigError naming the step."""
    out = []
    for i, step in enumerate(steps or []):
        if not isinstance(step, dict) or "name" not in step:
            raise ConfigError(f"preprocess[{i}]: a step is a mapping with a 'name' (one of {', '.join(STEPS)})")
        name = step["name"]
        if name not in STEPS:
            raise ConfigError(f"preprocess[{i}]: unknown step {name!r}; choose one of {', '.join(STEPS)}")
        required, optional = STEPS[name]
        unknown = set(step) - {"name", *required, *optional}
        if unknown:
            raise ConfigError(f"preprocess[{i}] ({name}): unknown argument(s) {', '.join(sorted(unknown))}; "
                              f"valid: {', '.join([*required, *optional]) or 'none'}")
        missing = [k for k in required if k not in step]
        if missing:
            raise ConfigError(f"preprocess[{i}] ({name}): missing {', '.join(missing)}")
        clean: dict[str, Any] = {"name": name}
        for key in (*required, *optional):
            value = step.get(key, optional.get(key))
            clean[key] = _number_list(value, f"preprocess[{i}] ({name}).{key}", key) \
                if key in ("mm", "size") else _number(value, f"preprocess[{i}] ({name}).{key}", key)
        out.append(clean)
    return out


def _number_list(value: Any, where: str, key: str) -> list[float] | list[int]:
    if isinstance(value, str):
        value = value.lower().replace(",", "x").split("x")
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise ConfigError(f"{where}: give three values (x, y, z in mm for spacing; D, H, W voxels for sizes)")
    try:
        nums = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} are not numbers") from None
    if not all(np.isfinite(nums)) or min(nums) <= 0:
        raise ConfigError(f"{where}: values must be positive")
    if key == "size":
        if any(v != int(v) or v > 1024 for v in nums):
            raise ConfigError(f"{where}: sizes are whole numbers of voxels, at most 1024")
        return [int(v) for v in nums]
    return nums


def _number(value: Any, where: str, key: str) -> float | int:
    try:
        num = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a number") from None
    if not np.isfinite(num) or (key == "margin" and (num < 0 or num != int(num))):
        raise ConfigError(f"{where}: {value!r} is not valid here")
    return int(num) if key == "margin" else num


def parse_step(text: str) -> dict[str, Any]:
    """``name`` or ``name=value`` (the step's main argument; lists as ``1x1x3``) as a step mapping."""
    name, _, value = text.strip().partition("=")
    if name not in STEPS:
        raise ConfigError(f"--preprocess {text!r}: unknown step {name!r}; choose one of {', '.join(STEPS)}")
    step: dict[str, Any] = {"name": name}
    if value:
        step[MAIN_ARGUMENT[name]] = value
    return check_steps([step])[0]


def build(steps: Sequence[dict[str, Any]], with_mask: bool = False):
    """The MONAI ``Compose`` of dictionary transforms for ``steps`` on keys ``image`` (and ``label``)."""
    from monai.transforms import Compose, CropForegroundd, Resized, ResizeWithPadOrCropd, Spacingd, SpatialPadd

    keys = ["image", "label"] if with_mask else ["image"]
    modes = ("bilinear", "nearest") if with_mask else "bilinear"
    out = []
    for step in check_steps(steps):
        name = step["name"]
        if name == "spacing":
            x, y, z = step["mm"]
            # network order (d, h, w) runs along (z, y, x)
            out.append(Spacingd(keys, pixdim=(z, y, x), mode=modes, padding_mode="zeros"))
        elif name == "crop_foreground":
            threshold = float(step["threshold"])
            out.append(CropForegroundd(keys, source_key="image", select_fn=lambda v, t=threshold: v > t,
                                       margin=int(step["margin"]), allow_smaller=True))
        elif name == "pad":
            out.append(SpatialPadd(keys, spatial_size=step["size"]))
        elif name == "crop_or_pad":
            out.append(ResizeWithPadOrCropd(keys, spatial_size=step["size"]))
        elif name == "resize":
            out.append(Resized(keys, spatial_size=step["size"],
                               mode=("trilinear", "nearest") if with_mask else "trilinear"))
    return Compose(out)


def apply_steps(pixels: np.ndarray, affine: np.ndarray | None, steps: Sequence[dict[str, Any]], label: str,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Run ``steps`` on a (C, D, H, W) volume in [0, 1] (and its (1, D, H, W) mask): the new pixels, affine, mask.

    Volumes without geometry (e.g. MedMNIST-3D) take 1 mm voxels; ``spacing`` then refuses them.
    """
    if not steps:
        return pixels, affine, mask
    import torch
    from monai.data import MetaTensor

    if pixels.ndim != 4:
        raise DataError(f"{label}: preprocessing steps apply to volumes (C, D, H, W), not an array of shape "
                        f"{tuple(pixels.shape)}; leave `preprocess` empty for 2-D images")
    if affine is None and any(s["name"] == "spacing" for s in steps):
        raise DataError(f"{label}: has no voxel geometry, so `spacing` cannot resample it; remove that step")
    aff = torch.as_tensor(affine if affine is not None else np.eye(4), dtype=torch.float64)
    item = {"image": MetaTensor(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)), affine=aff)}
    if mask is not None:
        if mask.shape[-3:] != pixels.shape[-3:]:
            raise DataError(f"{label}: mask shape {tuple(mask.shape[-3:])} differs from the image's "
                            f"{tuple(pixels.shape[-3:])}")
        item["label"] = MetaTensor(torch.from_numpy(np.ascontiguousarray(mask.reshape(1, *mask.shape[-3:]),
                                                                         dtype=np.float32)), affine=aff.clone())
    out = build(steps, with_mask=mask is not None)(item)
    image = out["image"]
    if min(image.shape[1:]) < 1:
        raise DataError(f"{label}: preprocessing left an empty volume (shape {tuple(image.shape)}); check "
                        "crop_foreground's threshold")
    new_affine = image.affine.numpy() if affine is not None else None
    new_mask = np.rint(out["label"].numpy()).astype(mask.dtype) if mask is not None else None
    return np.clip(image.numpy(), 0.0, 1.0).astype(np.float32), new_affine, new_mask
