"""Answers given whole rather than through the batchers: a volume answered on its own grid (the task's
"frame_answer": detection's sliding windows at the scale of training, exactly as ``lepton predict`` answers the file),
by the PyTorch backend or by ONNX Runtime under the run's own decoding (``export.run_around``), and a map per box (the
task's "explain_boxes", PyTorch only), in worker threads."""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any

import numpy as np

from lepton.serve.errors import ApiError


def explain_boxes(adapter, pixels: np.ndarray, answer: dict[str, Any], lock: threading.Lock) -> None:
    """Adds to each box of ``answer`` (``adapter``'s answer for the decoded input ``pixels``) its HiResCAM map
    (``Task.finding_maps``) as a PNG overlay, ``explanation.overlay_png_base64`` — for a volume a montage of the
    slices the box spans; under ``lock``: the maps hook the shared model."""
    from lepton.explain import box_png

    with lock:
        found, maps = adapter.task.finding_maps(adapter.run, pixels)

    def corners(boxes):
        return np.array([[b["box"][k] for k in sorted(b["box"])] for b in boxes], np.float64)

    a, b = corners(found["boxes"]), corners(answer["boxes"])
    if a.shape != b.shape or not np.allclose(a, b, atol=1e-3):  # the same network and input: batching aside
        raise RuntimeError(f"{adapter.name}@{adapter.version}: the explained boxes differ from the answer's")
    shown = pixels.mean(0)
    for box, heat in zip(answer["boxes"], maps, strict=True):
        box["explanation"] = {"method": "hirescam",
                              "overlay_png_base64": base64.b64encode(box_png(shown, heat, box)).decode()}


async def answer(server, dep, frame, client: str | None, explain: bool,
                 version: int | None = None) -> tuple[int, np.ndarray | None, dict]:
    """A volume answered whole by ``version`` or the routed one (``ModelAdapter.whole_frames``; with a map per box
    when ``explain``): (version, its outputs to record, or None when already recorded, response body). A version that
    does not answer volumes whole (an ONNX graph without the run's decoding: a foreign model, or an export answering
    the task's outputs itself) answers through its fixed-size batcher, and its answer says so: ``resized_to``, the
    network's input size the volume was resized to."""
    chosen = version if version is not None else dep.choose(client)
    handle = dep.handles.get(chosen)
    if handle is None:
        raise ApiError(404, "version_not_served", f"{dep.name} version {chosen} is not being served")
    adapter = handle.adapter
    if explain and not adapter.explains:
        raise ApiError(422, "invalid_request", f"{dep.name}@{chosen} is served with ONNX Runtime; "
                                               "explanations need the PyTorch backend")
    if not adapter.whole_frames:
        version, outputs = await server.infer(dep, frame.pixels, client, chosen)
        return version, None, {**adapter.encode_response(outputs), "resized_to": list(adapter.preprocessing.size)}

    def work() -> tuple[np.ndarray, dict]:
        outputs, body = adapter.task.answer_frame(adapter.run, frame)
        if explain:
            server.explain_findings(adapter, frame.pixels, body)
        return outputs, body

    outputs, body = await asyncio.to_thread(work)
    return chosen, outputs, body
