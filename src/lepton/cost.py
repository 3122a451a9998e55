"""The cost of an answer: forward passes per image (ensemble members × TTA views) and milliseconds per image at
batch 1 and at the serving batch size, per precision, measured by timing a run's real predict path on its input
shape. Training writes the record into ``run.json`` (``cost``); the registry keeps it with the version, the model
card and the server's model metadata show it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: The batch the server's batcher fills by default (``ServeConfig.max_batch_size``; a test keeps them equal).
SERVING_BATCH = 32
#: A task whose inferer slides windows over each input (``Task.inferer``, ``runs.segment_probs``) is served window by
#: window: two at a time.
WINDOW_SERVING_BATCH = 2


def _units(model) -> list:
    """The modules one forward pass goes through: an ensemble's members, else the model itself."""
    members = getattr(model, "members", None)
    return list(members) if members is not None else [model]


def _time_call(fn: Callable[[], Any], min_seconds: float, max_seconds: float) -> float:
    """The median seconds of ``fn`` after one warm-up call: at least one timed call, more until ``min_seconds`` have
    passed (and up to three while under ``max_seconds``)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < min_seconds or (
            len(times) < 3 and time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def available_precisions(device: str = "cpu", windows: bool = False) -> list[str]:
    """The serving precisions the PyTorch path can run here: fp32, and bf16 on CPUs with AMX/AVX512-BF16 or on CUDA
    (classifiers only: lower serving precisions are checked for them, ``lepton.precision``)."""
    from lepton.models.precision import cpu_has_bf16

    if windows:
        return ["fp32"]
    bf16 = device.startswith("cuda") or (device == "cpu" and cpu_has_bf16())
    return ["fp32", "bf16"] if bf16 else ["fp32"]


def measure_cost(model, input_shape: tuple[int, ...], activate: Callable, *, tta: bool, device: str = "cpu",
                 windows: bool = False, precisions: list[str] | None = None, min_seconds: float = 0.1,
                 max_seconds: float = 1.0) -> dict[str, Any]:
    """Time ``model``'s predict path (``runs.predict_outputs``: the task's activation, flip TTA as the run applies
    it) on random inputs of ``input_shape`` (C, …) at batch 1 and at the serving batch, per precision, and count the
    forward passes each image takes through the network's members; ``windows``: the network is served window by
    window (sliding-window inference), so the figures are per window at the window batch. Returns the cost record."""
    import torch

    from lepton.models.precision import autocast, cpu_model
    from lepton.runs import predict_outputs

    serving = WINDOW_SERVING_BATCH if windows else SERVING_BATCH
    precisions = precisions or available_precisions(device, windows)
    seen = [0]

    def count(_module, inputs, _output) -> None:
        seen[0] += int(inputs[0].shape[0])

    units = _units(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(serving, *input_shape, generator=gen)
    handles = [u.register_forward_hook(count) for u in units]
    try:
        predict_outputs(model, x[:1], activate, tta=tta, device=device, batch_size=1)
        passes = seen[0]
    finally:
        for h in handles:
            h.remove()
    figures: dict[str, dict[str, float]] = {}
    for precision in precisions:
        row: dict[str, float] = {}
        for batch in (1, serving):
            xb = x[:batch]

            def call(xb=xb, precision=precision) -> None:
                with autocast(precision, device):
                    predict_outputs(model, xb, activate, tta=tta, device=device, batch_size=len(xb))
                if device.startswith("cuda"):
                    torch.cuda.synchronize()

            seconds = _time_call(call, min_seconds, max_seconds)
            row[f"ms_per_image_b{batch}"] = round(1000 * seconds / batch, 4)
            row[f"images_per_s_b{batch}"] = round(batch / seconds, 1)
        figures[precision] = row
    members = len(units)
    return {"members": members, "tta_views": 2 if tta else 1, "forward_passes_per_image": passes,
            "unit": "window" if windows else "image", "input_shape": list(input_shape),
            "parameters": int(sum(p.numel() for p in model.parameters())), "serving_batch": serving,
            "precisions": figures, "device": device, "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "torch": torch.__version__}


def run_cost(run, *, precisions: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """The cost record of a loaded run (``lepton.runs.Run``) on its own input shape and TTA setting."""
    spec = run.preprocessing
    return measure_cost(run.model, (spec.channels, *spec.size), run.task.activate, tta=run.config.tta,
                        device=run.device, windows=run.task.on_grid, precisions=precisions,
                        **kwargs)


def cost_lines(cost: dict[str, Any] | None) -> list[str]:
    """The record as Markdown list items (for the model card and the CLI)."""
    if not cost:
        return ["- Not measured (a version registered before Lepton measured inference cost, or from an external "
                "file)."]
    unit = cost.get("unit", "image")
    lines = [f"- Forward passes per {unit}: {cost['forward_passes_per_image']} ({cost['members']} member(s) × "
             f"{cost['tta_views']} TTA view(s)); {cost['parameters']:,} parameters; input "
             f"{'×'.join(map(str, cost['input_shape']))}"]
    for precision, row in cost.get("precisions", {}).items():
        b = cost["serving_batch"]
        lines.append(f"- {precision}: {row['ms_per_image_b1']:.3f} ms/{unit} at batch 1 "
                     f"({row['images_per_s_b1']:.3g}/s), {row[f'ms_per_image_b{b}']:.3f} ms/{unit} at batch {b} "
                     f"({row[f'images_per_s_b{b}']:.3g}/s)")
    lines.append(f"- Measured on {cost.get('cpu', 'unknown')} ({cost.get('device')}, {cost.get('threads')} threads, "
                 f"torch {cost.get('torch')})")
    return lines
