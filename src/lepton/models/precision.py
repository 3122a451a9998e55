"""Numeric precision: which one this hardware runs fast (the CPU's matrix-unit flags, the GPU's bf16 support), and
the autocast context that runs a network in it. Accuracy is never assumed: training validates in fp32 and serving
accepts a lower precision only after it is checked on the version's val set (``lepton.precision``)."""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

from lepton.errors import ConfigError

log = logging.getLogger("lepton.models")

#: Precisions a run trains in (``auto`` resolves per device).
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Flags that decide the CPU's fast paths, in the order they are reported.
MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return "unknown"


def matrix_flags() -> list[str]:
    """The vector and matrix-unit flags this CPU has, of those that decide precision."""
    return [f for f in MATRIX_FLAGS if f in cpu_flags()]


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 natively: AMX tiles or AVX512-BF16 dot products (oneDNN uses either).
    Without them bf16 is emulated and slower than fp32."""
    import torch

    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags()) and torch.backends.mkldnn.is_available()


def resolve_precision(requested: str, device: str, spatial_dims: int = 2) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device``: ``auto`` is bf16 on CPUs with AMX/AVX512-BF16 and on CUDA GPUs
    with bf16, fp16 on older CUDA GPUs, fp32 elsewhere. fp16 is refused on CPUs (no fast path, overflow risk).

    On a CPU, ``auto`` keeps volume networks (``spatial_dims=3``) in fp32: oneDNN's bf16 3-D convolution backward
    gave non-finite weight gradients for MONAI's 3-D U-Net on its first step (torch 2.13, AVX512-BF16), and 3-D
    classifiers' losses went NaN in the first epoch; ``--precision bf16`` still asks for it."""
    import torch

    if requested not in TRAIN_PRECISIONS:
        raise ConfigError(f"precision={requested!r} is not one of {', '.join(TRAIN_PRECISIONS)}")
    kind = device.split(":")[0]
    if requested == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if kind == "cpu" and spatial_dims == 2 and cpu_has_bf16() else "fp32"
    if requested == "fp16" and kind != "cuda":
        raise ConfigError("precision=fp16 needs a CUDA GPU; on a CPU use bf16 (fast with AMX or AVX512-BF16) or fp32")
    if requested == "bf16" and kind == "cpu" and not cpu_has_bf16():
        log.warning("precision=bf16 on a CPU without AMX or AVX512-BF16 (flags: %s): correct, but slower than fp32",
                    " ".join(matrix_flags()) or "none")
    return requested


def torch_dtype(precision: str):
    """The autocast dtype of a precision (None for fp32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def in_precision(model, precision: str):
    """``model`` as a callable that runs in ``precision`` under ``autocast`` with float32 outputs (the server's
    sliding windows); the module itself for fp32."""
    if torch_dtype(precision) is None:
        return model
    model.eval()

    def forward(x):
        with autocast(precision):
            return model(x).float()

    return forward


def autocast(precision: str, device: str = "cpu") -> contextlib.AbstractContextManager:
    """The context that runs matrix products and convolutions in ``precision`` (a no-op for fp32); normalisation,
    softmax and losses stay fp32 under PyTorch's autocast rules."""
    import torch

    dtype = torch_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=dtype)
