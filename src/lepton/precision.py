"""Serving precisions of a registered version — fp32, bf16 (PyTorch autocast) and int8 (ONNX Runtime, static
calibration) — each accepted only after it is checked on the version's stored val set: the task's precision metric
(``Task.precision_metric``: val AUC for classifiers, mean foreground Dice for segmentation) may fall at most the
task's ``precision_tolerance`` below fp32's, and a precision gets its own val-selected decision threshold where the
task has one, stored per version and precision.

The val set (and calibration inputs from the training set) is written by training as ``val_set.npz``
(``Task.precision_val_set`` through ``lepton.train.checkpoint.save_val_set``) and stored with the version at
registration; records live in the version's ``metrics["precisions"]``.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError, RegistryError

log = logging.getLogger("lepton.precision")

SERVE_PRECISIONS = ("auto", "fp32", "bf16", "int8")
#: How metrics are named in messages.
_METRIC_NAMES = {"val_auc": "val AUC", "val_dice": "val Dice"}


class PrecisionError(RegistryError):
    """A precision failed its check on the version's val set, or cannot be checked."""


def hardware_order() -> list[str]:
    """The precisions ``auto`` tries, fastest first on this CPU: bf16 where it has AMX or AVX512-BF16, then int8
    (VNNI/AMX-INT8 speed it up, AVX2 runs it too), then fp32."""
    from lepton.models.precision import cpu_has_bf16

    return ["bf16", "int8", "fp32"] if cpu_has_bf16() else ["int8", "fp32"]


def _val_set(registry, version) -> dict[str, np.ndarray]:
    sha = version.artifacts.get("val_set")
    if sha is None:
        raise PrecisionError(f"{version.ref} has no stored val set, so a lower precision cannot be checked; "
                             "register a run trained by this Lepton version (it writes val_set.npz)")
    with np.load(io.BytesIO(registry.store.get(sha, f"{version.ref} val set"))) as z:
        return {k: z[k] for k in z.files}


def int8_model(onnx_bytes: bytes, calibration: np.ndarray) -> bytes:
    """Static int8 quantization of an ONNX graph (QDQ, per-channel weights) calibrated on normalised images."""
    from lepton.export import quantize_onnx

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(onnx_bytes)
        return quantize_onnx(src, Path(tmp) / "model.int8.onnx", calibration).read_bytes()


def onnx_outputs(session, x: np.ndarray, tta: bool, chunk: int = 256) -> np.ndarray:
    """A Lepton-exported model's activated outputs from ONNX Runtime, flip TTA averaged as PyTorch does (a dense
    task's flipped outputs flipped back first)."""
    name = session.get_inputs()[0].name
    out = []
    for i in range(0, len(x), chunk):
        xb = np.ascontiguousarray(x[i:i + chunk], np.float32)
        p = session.run(None, {name: xb})[0]
        if tta:
            from lepton.runs import flip_mean

            p = flip_mean(p, session.run(None, {name: np.ascontiguousarray(xb[..., ::-1])})[0])
        out.append(p)
    return np.concatenate(out)


def torch_outputs(model, x: np.ndarray, activate, tta: bool, precision: str) -> np.ndarray:
    """The PyTorch model's outputs in ``precision`` (fp32 or bf16 autocast), as float32."""
    import torch

    from lepton.models.precision import autocast
    from lepton.runs import predict_outputs

    with autocast(precision):
        out = predict_outputs(model, torch.from_numpy(np.ascontiguousarray(x, np.float32)), activate, tta=tta)
    return np.asarray(out, np.float32)


@dataclass
class Predictor:
    """The network in the precision under check, as a task's ``precision_outputs`` runs it: ``forward`` maps a
    normalised batch at the network's size to activated outputs (flip TTA included)."""

    forward: Callable[[np.ndarray], np.ndarray]
    spec: Any

    def batch(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def image(self, pixels: np.ndarray) -> np.ndarray:
        """Outputs (K, …) for one image (C, …) in [0, 1] at its own size: sliding windows of the network's size,
        as a dense task is served (``lepton.runs.segment_probs``)."""
        import torch

        from lepton.runs import segment_probs

        def windows(xb):
            return torch.from_numpy(self.forward(xb.numpy()))

        return segment_probs(windows, self.spec, pixels, _identity)


def _identity(outputs):
    return outputs


def _max_diff(outputs, reference) -> float:
    if isinstance(outputs, np.ndarray) and isinstance(reference, np.ndarray):
        return float(np.abs(outputs - reference).max()) if outputs.size else 0.0
    return max((float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(outputs, reference, strict=True)),
               default=0.0)


def check_precision(registry, ref: str, precision: str) -> dict[str, Any]:
    """Check ``precision`` of a version on its stored val set against fp32 on the task's precision metric and record
    the result (its value, fp32's, the delta, the tolerance, its own threshold where the task has one, whether it is
    accepted); int8 stores its quantized ONNX graph too. Returns the record; raises ``PrecisionError`` when the
    version cannot be checked."""
    import torch

    from lepton.export import export_onnx
    from lepton.models.precision import cpu_model, matrix_flags

    if precision not in ("fp32", "bf16", "int8"):
        raise ConfigError(f"precision={precision!r} is not one of fp32, bf16, int8")
    version = registry.get(ref)
    if version.format != "pytorch":
        raise PrecisionError(f"{version.ref} is an {version.format} model: only Lepton-trained versions are served "
                             "in a lower precision")
    run = registry.load_run(version.ref)
    task = run.task
    metric, tolerance = task.precision_metric, float(task.precision_tolerance)
    if metric is None:
        raise PrecisionError(f"{version.ref} is a {task.name} model: its task declares no metric to check lower "
                             "precisions on; serve it in fp32")
    val = _val_set(registry, version)
    spec = run.preprocessing
    tta = run.config.tta
    calib = spec.normalize(torch.from_numpy(val["x_calib"].astype(np.float32))).numpy()

    def in_torch(p: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda xb: torch_outputs(run.model, xb, task.activate, tta, p)

    y, reference = task.precision_outputs(val, Predictor(in_torch("fp32"), spec), spec)
    fp32_value = task.val_metrics(y, reference)[metric]
    artifacts: dict[str, str] = {}
    if precision in ("fp32", "bf16"):
        forward = in_torch(precision)
        outputs = reference if precision == "fp32" else task.precision_outputs(val, Predictor(forward, spec), spec)[1]
    else:
        import onnxruntime as ort

        # Fixed spatial axes: the graph takes inputs of the network's size (a dense task's sliding windows), and ONNX
        # Runtime's quantization pre-processing cannot infer shapes through symbolic spatial axes.
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(run.model, (spec.channels, *spec.size), Path(tmp) / "model.onnx",
                               activate=task.activate, output_name=task.oip_outputs(run.label_names)[0]["name"])
            try:
                data = int8_model(path.read_bytes(), calib)
            except Exception as exc:  # ONNX Runtime raises bare Exceptions for graphs it cannot quantize
                raise PrecisionError(f"{version.ref} cannot be quantized to int8 by ONNX Runtime "
                                     f"({type(exc).__name__}: {exc}); serve it in fp32 or bf16") from exc
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

        def forward(xb: np.ndarray) -> np.ndarray:
            return onnx_outputs(session, xb, tta)

        outputs = task.precision_outputs(val, Predictor(forward, spec), spec)[1]
        artifacts["onnx_int8"] = registry.store.put(data)
    value = task.val_metrics(y, outputs)[metric]
    threshold = version.threshold if precision == "fp32" else task.fit_decision(y, outputs).get("threshold")
    short = metric.removeprefix("val_")
    record = {"metric": metric, metric: round(float(value), 6), f"fp32_{metric}": round(float(fp32_value), 6),
              f"{short}_delta": round(float(value - fp32_value), 6), f"max_{short}_drop": tolerance,
              "max_prob_diff": _max_diff(outputs, reference), "threshold": threshold, "val_images": len(y),
              "images_per_s": round(_throughput(forward, calib), 1),
              "accepted": bool(fp32_value - value <= tolerance),
              "cpu": {"model": cpu_model(), "flags": matrix_flags()},
              "checked": datetime.now(UTC).isoformat(timespec="seconds")}
    registry.set_precision(version.ref, precision, record, artifacts)
    log.info("%s in %s: %s %.4f against fp32 %.4f (%s)", version.ref, precision, _METRIC_NAMES.get(metric, metric),
             value, fp32_value, "accepted" if record["accepted"] else "refused")
    return record


def _throughput(predict, x: np.ndarray, seconds: float = 0.3) -> float:
    """Inputs per second of ``predict`` on this machine (after a warm-up call), at batch 64 — fewer for inputs of
    over 64 K values (about 4 M values a batch: a large 3-D window or two); timed over ``seconds``, or one call when a
    call takes longer."""
    import time

    batch = max(1, min(64, (1 << 22) // max(1, int(np.prod(x.shape[1:])))))
    xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
    predict(xb)
    n, start = 0, time.perf_counter()
    while n < 1 or time.perf_counter() - start < seconds:
        predict(xb)
        n += 1
    return n * batch / (time.perf_counter() - start)


def _this_machine(record: dict[str, Any] | None) -> bool:
    from lepton.models.precision import cpu_model, matrix_flags

    return (record is not None and "images_per_s" in record
            and record.get("cpu") == {"model": cpu_model(), "flags": matrix_flags()})


def describe(record: dict[str, Any]) -> tuple[str, float, float, float]:
    """A record's metric as (name in words, value, fp32's value, the drop allowed); records made before tasks
    declared their metric are on val AUC."""
    metric = record.get("metric", "val_auc")
    short = metric.removeprefix("val_")
    return (_METRIC_NAMES.get(metric, metric), record[metric], record[f"fp32_{metric}"],
            record.get(f"max_{short}_drop", 0.005))


def refusal(ref: str, precision: str, record: dict[str, Any]) -> str:
    name, value, fp32, allowed = describe(record)
    return (f"{ref} in {precision}: {name} {value:.4f} against fp32 {fp32:.4f} (a drop of {fp32 - value:.4f}, over "
            f"the {allowed} allowed) on {record['val_images']} stored val samples; serve it in fp32")


def choose_precision(registry, ref: str, requested: str, backend: str = "auto") -> tuple[str, dict[str, Any] | None]:
    """The precision a server runs a version in, and its record (None for fp32 without one). An explicit precision
    that fails its check raises ``PrecisionError`` with both values of the task's metric. ``auto`` takes the accepted
    precision with the highest throughput measured on this machine (checks made elsewhere are redone here), fp32
    when none is faster or the version cannot be checked (logged)."""
    if requested not in SERVE_PRECISIONS:
        raise ConfigError(f"precision={requested!r} is not one of {', '.join(SERVE_PRECISIONS)}")
    if requested == "bf16" and backend == "onnx":
        raise ConfigError("precision=bf16 runs on PyTorch; serve with --backend auto, or use int8 with ONNX Runtime")
    version = registry.get(ref)
    records = dict(version.metrics.get("precisions", {}))
    if requested == "fp32":
        return "fp32", records.get("fp32")
    if requested != "auto":
        record = records.get(requested)
        if record is None or (requested == "int8" and "onnx_int8" not in version.artifacts):
            record = check_precision(registry, ref, requested)
        if not record["accepted"]:
            raise PrecisionError(refusal(version.ref, requested, record))
        return requested, record
    candidates = ["fp32", *(p for p in hardware_order() if p != "fp32" and not (p == "bf16" and backend == "onnx"))]
    for precision in candidates:
        if not _this_machine(records.get(precision)) or (precision == "int8" and "onnx_int8" not in version.artifacts):
            try:
                records[precision] = check_precision(registry, ref, precision)
            except PrecisionError as exc:
                log.warning("%s: %s; serving fp32", version.ref, exc)
                return "fp32", None
    for precision in candidates[1:]:
        if not records[precision]["accepted"]:
            log.warning("%s", refusal(version.ref, precision, records[precision]))
    best = max((p for p in candidates if records[p]["accepted"]), key=lambda p: records[p]["images_per_s"])
    log.info("%s: auto precision %s (%s)", version.ref, best,
             ", ".join(f"{p} {records[p]['images_per_s']:.0f} images/s" for p in candidates))
    return best, records[best]
