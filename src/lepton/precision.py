"""Serving precisions of a registered version — fp32, bf16 (PyTorch autocast) and int8 (ONNX Runtime, static
calibration) — each accepted only after it is checked on the version's stored val set: its val AUC may fall at most
``MAX_AUC_DROP`` below fp32's, and it gets its own val-selected decision threshold, stored per version and precision.

The val set (and a calibration slice of the training set) is written by training as ``val_set.npz``
(``lepton.train.checkpoint.save_val_set``) and stored with the version at registration; records live in the
version's ``metrics["precisions"]``.
"""

from __future__ import annotations

import io
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError, RegistryError

log = logging.getLogger("lepton.precision")

SERVE_PRECISIONS = ("auto", "fp32", "bf16", "int8")
#: A lower precision is refused when its val AUC is more than this below fp32's on the same images.
MAX_AUC_DROP = 0.005


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
    """A Lepton-exported classifier's probabilities from ONNX Runtime, flip TTA averaged as PyTorch does."""
    name = session.get_inputs()[0].name
    out = []
    for i in range(0, len(x), chunk):
        xb = np.ascontiguousarray(x[i:i + chunk], np.float32)
        p = session.run(None, {name: xb})[0]
        if tta:
            p = (p + session.run(None, {name: np.ascontiguousarray(xb[..., ::-1])})[0]) / 2
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


def check_precision(registry, ref: str, precision: str) -> dict[str, Any]:
    """Check ``precision`` of a version on its stored val set against fp32 and record the result (its val AUC,
    fp32's, the delta, its own threshold, whether it is accepted); int8 stores its quantized ONNX graph too.
    Returns the record; raises ``PrecisionError`` when the version cannot be checked."""
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
    if task.dense or task.name != "classification":
        raise PrecisionError(f"{version.ref} is a {task.name} model: lower precisions are checked for classifiers "
                             "(on val AUC); serve it in fp32")
    val = _val_set(registry, version)
    spec = run.preprocessing
    x = spec.normalize(torch.from_numpy(val["x_val"].astype(np.float32))).numpy()
    y = val["y_val"]
    tta = run.config.tta
    reference = torch_outputs(run.model, x, task.activate, tta, "fp32")
    fp32_auc = task.val_metrics(y, reference)["val_auc"]
    artifacts: dict[str, str] = {}
    if precision in ("fp32", "bf16"):
        def predict(xb: np.ndarray) -> np.ndarray:
            return torch_outputs(run.model, xb, task.activate, tta, precision)

        outputs = reference if precision == "fp32" else predict(x)
    else:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(run.model, (spec.channels, *spec.size), Path(tmp) / "model.onnx",
                               activate=task.activate, output_name=task.oip_outputs(run.label_names)[0]["name"])
            calib = spec.normalize(torch.from_numpy(val["x_calib"].astype(np.float32))).numpy()
            data = int8_model(path.read_bytes(), calib)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

        def predict(xb: np.ndarray) -> np.ndarray:
            return onnx_outputs(session, xb, tta)

        outputs = predict(x)
        artifacts["onnx_int8"] = registry.store.put(data)
    auc = task.val_metrics(y, outputs)["val_auc"]
    decision = task.fit_decision(y, outputs)
    threshold = version.threshold if precision == "fp32" else decision["threshold"]
    record = {"val_auc": round(float(auc), 6), "fp32_val_auc": round(float(fp32_auc), 6),
              "auc_delta": round(float(auc - fp32_auc), 6), "max_prob_diff": float(np.abs(outputs - reference).max()),
              "threshold": threshold, "val_images": len(y), "images_per_s": round(_throughput(predict, x), 1),
              "accepted": bool(fp32_auc - auc <= MAX_AUC_DROP), "max_auc_drop": MAX_AUC_DROP,
              "cpu": {"model": cpu_model(), "flags": matrix_flags()},
              "checked": datetime.now(UTC).isoformat(timespec="seconds")}
    registry.set_precision(version.ref, precision, record, artifacts)
    log.info("%s in %s: val AUC %.4f against fp32 %.4f (%s)", version.ref, precision, auc, fp32_auc,
             "accepted" if record["accepted"] else "refused")
    return record


def _throughput(predict, x: np.ndarray, batch: int = 64, seconds: float = 0.3) -> float:
    """Images per second of ``predict`` at ``batch`` on this machine (after a warm-up call)."""
    import time

    xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
    predict(xb)
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        predict(xb)
        n += 1
    return n * batch / (time.perf_counter() - start)


def _this_machine(record: dict[str, Any] | None) -> bool:
    from lepton.models.precision import cpu_model, matrix_flags

    return (record is not None and "images_per_s" in record
            and record.get("cpu") == {"model": cpu_model(), "flags": matrix_flags()})


def refusal(ref: str, precision: str, record: dict[str, Any]) -> str:
    return (f"{ref} in {precision}: val AUC {record['val_auc']:.4f} against fp32 {record['fp32_val_auc']:.4f} "
            f"(a drop of {record['fp32_val_auc'] - record['val_auc']:.4f}, over the {MAX_AUC_DROP} allowed) on "
            f"{record['val_images']} val images; serve it in fp32")


def choose_precision(registry, ref: str, requested: str, backend: str = "auto") -> tuple[str, dict[str, Any] | None]:
    """The precision a server runs a version in, and its record (None for fp32 without one). An explicit precision
    that fails its check raises ``PrecisionError`` with both AUCs. ``auto`` takes the accepted precision with the
    highest throughput measured on this machine (checks made elsewhere are redone here), fp32 when none is faster
    or the version cannot be checked (logged)."""
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
