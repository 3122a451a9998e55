"""What every benchmark prints beside its figures: the CPU model and its vector and matrix-unit flags, since
figures differ between AVX2-only machines and those with AVX-512 and AMX."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_summary() -> str:
    """The CPU model and its vector/matrix-unit flags (figures differ between AVX2-only and AMX machines)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return f"{model}, {os.cpu_count()} logical cores, flags: {' '.join(shown) or 'none of avx2/avx512/amx'}"
