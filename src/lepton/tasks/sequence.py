"""Sequences: one answer per clip — a class, or a value such as an ejection-fraction-like score — from cine loops,
multi-frame series or still images (one-frame clips), optionally fused with clinical covariates.

Options (``TrainConfig.task_options``): ``fps`` and ``frames`` (the clip every input is sampled to), ``size`` (each
frame's side in pixels), ``target`` (``class`` or ``value``), ``covariates`` (``name:kind[:unit],…``, see
``lepton.data.readers.covariates``) with ``covariate_missing`` (``error`` or ``impute``) and ``fusion`` (``late`` or
``film``), and ``encoder`` (the per-frame 2-D network of the ``seq_*`` networks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError
from lepton.tasks.base import Loss, Task, register_task
from lepton.tasks.classification import Classification
from lepton.tasks.covariates import COVARIATE_OPTIONS, check_options, declared
from lepton.tasks.covariates import fit as fit_covariates
from lepton.tasks.covariates import inputs as covariate_inputs
from lepton.tasks.covariates import model_options as covariate_model_options
from lepton.tasks.metrics import bootstrap_regression_ci, fmt, regression_metrics

DEFAULTS: dict[str, Any] = {"fps": 15.0, "frames": 16, "size": 64, "target": "class", **COVARIATE_OPTIONS,
                            "encoder": "frame_cnn"}


def sequence_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The task's options with defaults filled, checked: an unknown key or a bad value is a ConfigError."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"task_options: unknown key(s) {', '.join(unknown)} for the sequence task; known: "
                          f"{', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    try:
        out["fps"], out["frames"], out["size"] = float(out["fps"]), int(out["frames"]), int(out["size"])
    except (TypeError, ValueError):
        raise ConfigError("task_options: fps must be a number, frames and size whole numbers") from None
    if not (math.isfinite(out["fps"]) and 0.1 <= out["fps"] <= 1000):
        raise ConfigError(f"task_options.fps must be from 0.1 to 1000 frames per second (got {out['fps']})")
    if not 1 <= out["frames"] <= 512:
        raise ConfigError(f"task_options.frames must be from 1 to 512 (got {out['frames']})")
    if not 8 <= out["size"] <= 512:
        raise ConfigError(f"task_options.size must be from 8 to 512 pixels (got {out['size']})")
    if out["target"] not in ("class", "value"):
        raise ConfigError(f"task_options.target={out['target']!r} is not one of class, value")
    check_options(out)
    return out


def annotation_summary(names: list[str]) -> dict[str, Any]:
    """What the DICOM clips' headers say about burned-in annotations (``lepton.data.readers.annotations``): how many
    declare BurnedInAnnotation YES (listed: text may remain inside the scan region, where no header locates it), and how
    many have several scan regions or overlay planes, which reading masks."""
    import pydicom

    from lepton.data.readers.annotations import annotation_report
    from lepton.data.readers.io import sniff_format

    yes, regions, overlays = [], 0, 0
    for name in names:
        path = Path(name)
        if not path.is_file() or sniff_format(path) != "dicom":
            continue
        try:
            report = annotation_report(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception:  # unreadable headers are reported by the reader itself
            continue
        yes += [name] if report["burned_in"] else []
        regions += report["planar_regions"] > 1
        overlays += bool(report["overlays"])
    out: dict[str, Any] = {"burned_in_yes": len(yes), "several_regions_masked": regions,
                           "overlays_masked": overlays}
    if yes:
        out["burned_in_files"] = yes[:20]
        out["warning"] = (f"{len(yes)} clip(s) declare BurnedInAnnotation YES: text outside the scan regions is "
                          "cropped or masked, text inside them is not located by the header and stays")
    return out


@register_task
class Sequence(Task):
    """Clips (N, C, T, H, W) to a class (cross-entropy, as classification) or a value (Huber loss on the standardised
    value; MAE, RMSE, R² with bootstrap CIs); covariates fused in the network (``lepton.models.sequence``)."""

    name = "sequence"
    #: Manifests of videos or signal records and class folders of videos pick this task; a manifest of other files
    #: (multi-frame DICOM, frame folders) is read as clips when ``--task sequence`` says so.
    layouts = ("clip-manifest", "video-folders", "label-manifest", "manifest")
    #: The networks this task trains: the ``seq_*`` frame networks and ``r2plus1d`` (clips or signals in).
    network_kind = ("clip", "vector")
    capabilities = frozenset({"explain"})

    def __init__(self) -> None:
        super().__init__()
        self._classes = Classification()

    @property
    def regression(self) -> bool:
        return sequence_options(self.options)["target"] == "value"

    @property
    def selection_metric(self) -> str:  # type: ignore[override]
        return "val_mae" if self.regression else "val_auc"

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        return not self.regression

    # -- data -----------------------------------------------------------------------------------------------
    def schema(self):
        return declared(sequence_options(self.options))

    def load(self, source, *, window, slices, steps, skip_bad, validate=True):
        from lepton.data.readers.clips import load_clips

        opts = sequence_options(self.options)
        return load_clips(source, fps=opts["fps"], length=opts["frames"], size=opts["size"],
                          target="value" if self.regression else "class", covariates=self.schema(),
                          skip_bad=skip_bad)

    def inspect(self, source, *, window, slices):
        data = self.load(source, window=window, slices=slices, steps=None, skip_bad=True)
        out: dict[str, Any] = {"clips": len(data), "shape": list(data.images[0].shape),
                               "bad_files": [f"{p}: {r}" for p, r in data.bad_files]}
        if data.values is not None:
            out["target"] = {"min": float(data.values.min()), "mean": float(data.values.mean()),
                             "max": float(data.values.max())}
        else:
            out["classes"] = {n: int((data.labels == i).sum()) for i, n in enumerate(data.label_names)}
        out["annotations"] = annotation_summary(data.names)
        return out

    def input_size(self, train, config) -> tuple[int, ...]:
        opts = sequence_options(self.options)
        if train.spatial_dims == 1:  # signals (C, T): frames samples at fps
            return (opts["frames"],)
        if config.image_size and config.image_size != opts["size"]:
            raise ConfigError(f"the sequence task reads frames at task_options.size={opts['size']}; set that "
                              f"instead of image_size={config.image_size}")
        return opts["frames"], opts["size"], opts["size"]

    def tensors(self, data, spec):
        import torch

        x = spec.resize(data.images)
        if self.regression:
            return x, torch.from_numpy(np.asarray(data.values, np.float32)[:, None])
        return x, torch.from_numpy(np.asarray(data.labels, np.int64))

    def fit_inputs(self, train, spec) -> None:
        opts = sequence_options(self.options)
        spec.options = {k: opts[k] for k in ("fps", "frames", "size", "target")}
        if train.spatial_dims == 1:  # signals in physical units: every lead kept, standardised by the training split
            samples = np.concatenate(train.images, axis=1).astype(np.float64)
            spec.channels = int(samples.shape[0])
            spec.mean = samples.mean(1).tolist()
            spec.std = np.maximum(samples.std(1), 1e-6).tolist()
        fit_covariates(opts, train, spec)
        if self.regression:
            values = np.asarray(train.values, np.float64)
            spec.options["target_mean"] = float(values.mean())
            spec.options["target_std"] = float(max(values.std(), 1e-6))
        if opts["encoder"] != DEFAULTS["encoder"]:
            spec.options["encoder"] = opts["encoder"]

    def side_inputs(self, data, spec):
        return covariate_inputs(data, spec)

    def model_options(self, spec) -> dict[str, Any]:
        out: dict[str, Any] = covariate_model_options(spec)
        if spec.options.get("encoder"):
            out["encoder"] = spec.options["encoder"]
        if spec.options.get("target") == "value":
            out["target_mean"], out["target_std"] = spec.options["target_mean"], spec.options["target_std"]
        return out

    def read(self, path, spec) -> list[tuple[str, np.ndarray]]:
        from lepton.data.readers.clips import read_clip

        opts = spec.options or sequence_options(self.options)
        clip, _, _ = read_clip(Path(path), fps=float(opts["fps"]), length=int(opts["frames"]),
                               size=int(opts["size"]))
        return [(str(path), clip)]

    def read_bytes(self, data: bytes, name: str, spec) -> np.ndarray:
        """An uploaded clip (a multi-frame or single-frame DICOM file, or a still image) as ``read`` reads a path:
        written to a private temporary file first, since the DICOM reader decodes only the frames it samples."""
        import tempfile

        from lepton.data.readers.io import sniff_bytes

        kind = sniff_bytes(data[:4096], name)
        suffix = ".dcm" if kind == "dicom" else Path(name).suffix or ".bin"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(data)
            return self.read(path, spec)[0][1]

    def augment(self, x, y, options, generator):
        """Clips are augmented as volumes (in-plane rotation and scaling, flips); signals (N, C, T) are not."""
        return (x, y) if x.ndim == 3 else super().augment(x, y, options, generator)

    # -- training -----------------------------------------------------------------------------------------
    def num_outputs(self, label_names: list[str]) -> int:
        return 1 if self.regression else len(label_names)

    def targets(self, data) -> np.ndarray:
        return np.asarray(data.values, np.float32)[:, None] if self.regression else np.asarray(data.labels, np.int64)

    def criterion(self, y_train, config) -> Loss:
        if not self.regression:
            return self._classes.criterion(y_train, config)
        import torch.nn.functional as F

        scale = float(y_train.float().std().clamp_min(1e-6)) if len(y_train) > 1 else 1.0

        def loss(out, y):  # Huber on the standardised error: one scale of learning rate whatever the units
            return F.smooth_l1_loss(out.float() / scale, y.float() / scale)

        return loss

    def loss(self, logits, y):
        if not self.regression:
            return self._classes.loss(logits, y)
        import torch.nn.functional as F

        return F.smooth_l1_loss(logits.float(), y.float())

    def sample_weights(self, y_train, config):
        return None if self.regression else self._classes.sample_weights(y_train, config)

    def activate(self, logits):
        return logits.float() if self.regression else self._classes.activate(logits)

    def val_metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        if not self.regression:
            return self._classes.val_metrics(y, outputs)
        m = regression_metrics(y, outputs[:, 0])
        std = float(np.std(y)) or 1.0
        return {"val_loss": float(np.mean(((outputs[:, 0] - y.ravel()) / std) ** 2)), "val_mae": m["mae"],
                "val_r2": m["r2"]}

    def fit_decision(self, y_val, outputs):
        return {} if self.regression else self._classes.fit_decision(y_val, outputs)

    # -- predictions ----------------------------------------------------------------------------------------
    def decide(self, outputs, info):
        return outputs[:, 0] if self.regression else self._classes.decide(outputs, info)

    def encode(self, row, labels, info) -> dict[str, Any]:
        return {"value": round(float(row[0]), 6)} if self.regression else self._classes.encode(row, labels, info)

    def label(self, row, labels, info):
        return None if self.regression else self._classes.label(row, labels, info)

    def explain_index(self, row, info) -> int:
        return 0 if self.regression else self._classes.explain_index(row, info)

    # -- evaluation -----------------------------------------------------------------------------------------
    def scores(self, y, outputs, info) -> dict[str, float]:
        if not self.regression:
            return self._classes.scores(y, outputs, info)
        m = regression_metrics(y, outputs[:, 0])
        return {"mae": m["mae"], "r2": m["r2"]}

    def report(self, y, outputs, labels, info, *, n_bootstrap, plots):
        if not self.regression:
            return self._classes.report(y, outputs, labels, info, n_bootstrap=n_bootstrap, plots=plots)
        y = np.asarray(y, np.float64).ravel()
        m = regression_metrics(y, outputs[:, 0])
        ci = bootstrap_regression_ci(y, outputs[:, 0], n=n_bootstrap) if n_bootstrap else {}
        body: dict[str, Any] = {"metrics": m, "ci95": ci, "target": {"mean": float(y.mean()), "std": float(y.std())},
                                "baseline_mae": float(np.abs(y - y.mean()).mean())}

        def span(key: str) -> str:
            return " [{:.3f}, {:.3f}]".format(*ci[key]) if ci.get(key) else ""

        body["summary"] = [f"MAE {m['mae']:.3f}{span('mae')}  RMSE {m['rmse']:.3f}{span('rmse')}  "
                           f"R² {m['r2']:.3f}{span('r2')}  (predicting the mean: MAE {body['baseline_mae']:.3f})"]
        lines = ["| metric | value | 95 % CI |", "|---|---|---|"]
        for key, name in (("mae", "MAE"), ("rmse", "RMSE"), ("r2", "R²")):
            lines.append(f"| {name} | {fmt(m[key])} | {' – '.join(fmt(v) for v in ci.get(key, [])) or '-'} |")
        lines += ["", f"- Pearson r {fmt(m['pearson_r'])}; MAE of predicting the mean {fmt(body['baseline_mae'])}"]
        return body, lines

    # -- protocols and the registry --------------------------------------------------------------------------
    def oip_outputs(self, labels, size=None):
        return [{"name": "value", "datatype": "FP32", "shape": [-1, 1]}] if self.regression \
            else self._classes.oip_outputs(labels)

    def oip_tensors(self, outputs, labels, info):
        return {"value": ("FP32", outputs.astype(np.float32))} if self.regression \
            else self._classes.oip_tensors(outputs, labels, info)

    def card_metrics(self, info, reports):
        if not self.regression:
            return self._classes.card_metrics(info, reports)
        out: dict[str, Any] = {"val_mae": info.get("val_mae"), "val_r2": info.get("val_r2"),
                               "best_epoch": info.get("best_epoch")}
        for folder, rep in reports.items():
            out[f"eval/{folder}"] = {"split": rep.get("split"), "images": rep.get("images"),
                                     **rep.get("metrics", {}), "ci95": rep.get("ci95")}
        return out

    def card_text(self, labels, channels, threshold, metrics):
        if not self.regression:
            text = self._classes.card_text(labels, channels, threshold, metrics)
            text["use"] = [f"Classifies {channels}-channel clips (cine loops, multi-frame series) into "
                           f"{', '.join(labels)}. Decision support for trained readers only."]
            return text
        lines = [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items()
                 if not isinstance(v, dict)]
        return {"use": [f"Estimates a value from {channels}-channel clips. Decision support for trained readers "
                        "only: not validated beyond data like the training data."],
                "decision": ["- The estimated value itself (no threshold)."], "metrics": lines}
