"""Classification: one label per image from two or more classes; the first task and the default."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError
from lepton.tasks.base import Loss, Task, register_task
from lepton.tasks.covariates import COVARIATE_OPTIONS, check_options, declared
from lepton.tasks.covariates import fit as fit_covariates
from lepton.tasks.covariates import inputs as covariate_inputs
from lepton.tasks.covariates import model_options as covariate_model_options
from lepton.tasks.metrics import (
    auc_score,
    bootstrap_ci,
    calibration,
    classification_metrics,
    fmt,
    youden_threshold,
)

#: The stored val set holds at most this many image values (float16): a seeded subset of larger val splits.
MAX_VAL_VALUES = 16 << 20
#: Training images kept beside it to calibrate int8 quantization.
CALIBRATION_IMAGES = 256


def classification_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The classification task's options — clinical covariates from a manifest's columns (``covariates``,
    ``covariate_missing``, ``fusion``: ``lepton.tasks.covariates``) — with defaults filled; an unknown key or a bad
    value is a ConfigError."""
    unknown = sorted(set(options) - set(COVARIATE_OPTIONS))
    if unknown:
        raise ConfigError(f"task_options: unknown key(s) {', '.join(unknown)} for the classification task; known: "
                          f"{', '.join(COVARIATE_OPTIONS)}")
    out = {**COVARIATE_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    check_options(out)
    return out


@register_task
class Classification(Task):
    """Softmax over classes with cross-entropy (class-weighted, label smoothing); model selection on val AUC;
    for two classes a decision threshold on P(class 1) chosen on val by Youden's J. A manifest's columns declared as
    covariates (task options) are fused with the image embedding by the network (late fusion or FiLM)."""

    name = "classification"
    selection_metric = "val_auc"
    higher_is_better = True
    layouts = ("class-folders", "label-manifest", "manifest", "medmnist", "partition", "files", "file")
    annotation = "class"
    prediction_table = True
    capabilities = frozenset({"explain", "batch", "stream_eval"})

    # -- data -----------------------------------------------------------------------------------------------
    def load(self, source, *, window, slices, steps, skip_bad, validate=True):
        from lepton.data import load_dataset

        schema = declared(classification_options(self.options))
        return load_dataset(source, window=window, slices=slices, steps=steps, skip_bad=skip_bad,
                            validate=validate, **({"covariates": schema} if schema is not None else {}))

    def load_cases(self, source, *, window, steps, skip_bad, cache_dir=None, workers=0, quiet=False,
                   slices="middle", image_size=None):
        """An image folder or CSV manifest decoded into the on-disk case cache (parallel, reused across runs) as an
        ``ImageStore``; None for sources held in memory as they are (MedMNIST, partitions) and for covariates."""
        from lepton.data.index.cache import CaseCache
        from lepton.data.index.imagecache import cache_images

        if declared(classification_options(self.options)) is not None:
            return None
        return cache_images(source, window=window, slices=slices, steps=steps, image_size=image_size,
                            skip_bad=skip_bad, cache=CaseCache(cache_dir), workers=workers or None, quiet=quiet)

    def memory_estimate(self, source, *, window, slices, steps, image_size):
        """From a few files decoded now (``lepton.data.index.imagecache.estimate_memory_gb``); None for covariates and
        sources held in memory as they are."""
        from lepton.data.index.imagecache import estimate_memory_gb

        if declared(classification_options(self.options)) is not None:
            return None
        found = estimate_memory_gb(source, window=window, slices=slices, steps=steps, image_size=image_size)
        return None if found is None else found[0]

    def tensors(self, data, spec):
        """Images at the network's size and class indices; images in the cache stay there (``CachedImages``, read
        per batch)."""
        import torch

        from lepton.data.index.imagecache import ImageStore

        if isinstance(data, ImageStore):
            return data.pixels(tuple(spec.size), spec.channels), torch.from_numpy(self.targets(data))
        return super().tensors(data, spec)

    def fit_inputs(self, train, spec) -> None:
        fit_covariates(classification_options(self.options), train, spec)

    def evaluation_outputs(self, run, data):
        """Class probabilities; images in the cache (an ``ImageStore``) are read and predicted a chunk at a time."""
        from lepton.data.index.imagecache import ImageStore

        if not isinstance(data, ImageStore):
            return super().evaluation_outputs(run, data)
        spec = run.preprocessing
        parts = [run.predict_proba(chunk.numpy()) for chunk in data.pixels(tuple(spec.size), spec.channels).chunks()]
        return (np.concatenate(parts) if parts else np.zeros((0, len(run.label_names)), np.float32)), {}

    def side_inputs(self, data, spec):
        return covariate_inputs(data, spec)

    def model_options(self, spec) -> dict[str, Any]:
        return covariate_model_options(spec)
    semi_supervised = True
    #: bf16/int8 serving is refused when its val AUC is more than this below fp32's on the same images.
    precision_metric = "val_auc"
    precision_tolerance = 0.005

    # -- training -----------------------------------------------------------------------------------------
    def num_outputs(self, label_names: list[str]) -> int:
        return len(label_names)

    def targets(self, data) -> np.ndarray:
        return np.asarray(data.labels, dtype=np.int64)

    def criterion(self, y_train, config) -> Loss:
        import torch
        import torch.nn.functional as F

        weight = None
        if config.imbalance == "weighted":
            k = int(y_train.max()) + 1 if len(y_train) else 1
            counts = torch.bincount(y_train, minlength=k).float()
            weight = counts.sum() / (k * counts.clamp_min(1))
        smoothing = config.label_smoothing
        on_device: dict[Any, Any] = {}

        def loss(logits, y):
            w = None if weight is None else on_device.setdefault(logits.device, weight.to(logits.device))
            return F.cross_entropy(logits.float(), y, weight=w, label_smoothing=smoothing)

        return loss

    def loss(self, logits, y):
        import torch.nn.functional as F

        return F.cross_entropy(logits, y)

    def sample_weights(self, y_train, config):
        if config.imbalance != "balanced":
            return None
        import torch

        counts = torch.bincount(y_train).float()
        return (1.0 / counts.clamp_min(1))[y_train]

    #: A local recalibration of P(class 1) (``lepton.tasks.calibration``), applied after the softmax; None: none.
    calibration: dict[str, Any] | None = None

    def binary_test(self, labels: list[str]) -> bool:
        return len(labels) == 2

    def with_calibration(self, record):
        """A copy whose ``activate`` recalibrates P(class 1) of two-class outputs (``lepton.tasks.calibration``)."""
        import copy

        from lepton.tasks.calibration import check_record

        task = copy.copy(self)  # the same task and options, its own calibration
        task.calibration = dict(check_record(dict(record)))
        return task

    def activate(self, logits):
        import torch

        probs = torch.softmax(logits.float(), 1)
        if self.calibration is not None and probs.shape[1] == 2:
            from lepton.tasks.calibration import calibrate_probs

            return calibrate_probs(probs, self.calibration)
        return probs

    def val_metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        p = np.clip(outputs[np.arange(len(y)), y], 1e-7, 1.0)
        return {"val_loss": float(-np.log(p).mean()), "val_acc": float((outputs.argmax(1) == y).mean()),
                "val_auc": auc_score(y, outputs)}

    def fit_decision(self, y_val: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
        threshold = youden_threshold(y_val, outputs[:, 1]) if outputs.shape[1] == 2 else None
        return {"threshold": threshold, "threshold_rule": "Youden J on val" if threshold is not None else None}

    # -- serving precisions -----------------------------------------------------------------------------------
    def precision_val_set(self, x_val, y_val, x_train, spec, seed: int = 0) -> dict[str, np.ndarray] | None:
        """The val images and labels (a seeded subset of at most ``MAX_VAL_VALUES`` float16 values) and up to
        ``CALIBRATION_IMAGES`` training images, all in [0, 1]."""
        y_val = np.asarray(y_val)
        if y_val.ndim != 1 or len(y_val) == 0:
            return None
        rng = np.random.default_rng(seed)
        keep = max(1, MAX_VAL_VALUES // max(int(np.prod(x_val.shape[1:])), 1))
        pick = np.sort(rng.permutation(len(y_val))[:keep]) if len(y_val) > keep else np.arange(len(y_val))
        calib = np.sort(rng.permutation(len(x_train))[:CALIBRATION_IMAGES])
        # only the picked images are read: ``x_val``/``x_train`` may be images in the cache (``CachedImages``)
        return {"x_val": _rows(x_val, pick).astype(np.float16), "y_val": y_val[pick].astype(np.int64),
                "x_calib": _rows(x_train, calib).astype(np.float16)}

    def precision_outputs(self, val, predictor, spec):
        import torch

        x = spec.normalize(torch.from_numpy(val["x_val"].astype(np.float32))).numpy()
        return val["y_val"], predictor.batch(x)

    # -- predictions ----------------------------------------------------------------------------------------
    def decide(self, outputs: np.ndarray, info: Mapping[str, Any]) -> np.ndarray:
        """Class index per row: the stored threshold on P(class 1) for two classes, arg-max otherwise."""
        threshold = info.get("threshold")
        if outputs.shape[1] == 2 and threshold is not None:
            return (outputs[:, 1] >= threshold).astype(np.int64)
        return outputs.argmax(1)

    def _index(self, row: np.ndarray, info: Mapping[str, Any]) -> int:
        """``decide`` for one row, with scalars (called per request on the serving hot path)."""
        threshold = info.get("threshold")
        if len(row) == 2 and threshold is not None:
            return int(row[1] >= threshold)
        return int(row.argmax())

    def label(self, row: np.ndarray, labels: list[str], info: Mapping[str, Any]) -> str:
        return labels[self._index(row, info)]

    def encode(self, row: np.ndarray, labels: list[str], info: Mapping[str, Any]) -> dict[str, Any]:
        return {"label": self.label(row, labels, info),
                "probabilities": {n: round(float(p), 6) for n, p in zip(labels, row, strict=True)},
                "threshold": info.get("threshold")}

    def explain_index(self, row: np.ndarray, info: Mapping[str, Any]) -> int:
        return self._index(row, info)

    # -- evaluation -----------------------------------------------------------------------------------------
    def scores(self, y: np.ndarray, outputs: np.ndarray, info: Mapping[str, Any]) -> dict[str, float]:
        return {"acc": float((self.decide(outputs, info) == y).mean()), "auc": auc_score(y, outputs)}

    def headline(self, report):
        m = report["metrics"][report["primary_threshold"]]
        return "auc", m["auc"], (m.get("ci95") or {}).get("auc")

    # -- distillation -----------------------------------------------------------------------------------------
    def distill_targets(self, y_train, teacher, temperature):
        """Rows ``[teacher probabilities at T …, label]``; rows of ``teacher`` past the labels are unlabelled
        images (label -1)."""
        from lepton.tasks.distillation import class_targets

        return class_targets(y_train, teacher, temperature)

    def distill_loss(self, hard_loss, temperature, alpha):
        from lepton.tasks.distillation import kd_loss

        return kd_loss(hard_loss, temperature, alpha)

    def distill_batch(self, targets, teacher, temperature):
        import torch

        from lepton.tasks.distillation import soft_targets

        return torch.cat([soft_targets(teacher, temperature), targets[:, -1:]], dim=1)

    def report(self, y, outputs, labels, info, *, n_bootstrap, plots):
        thresholds: dict[str, float | None] = {"argmax": None} if len(labels) != 2 else {"0.5": 0.5}
        if len(labels) == 2 and info.get("threshold") is not None:
            thresholds["val_youden"] = info["threshold"]
        results = {}
        for key, thr in thresholds.items():
            metrics = classification_metrics(y, outputs, labels, thr)
            pred = metrics.pop("_pred")
            metrics["ci95"] = bootstrap_ci(y, outputs, pred, n=n_bootstrap) if n_bootstrap else None
            results[key] = metrics
        primary = "val_youden" if "val_youden" in results else next(iter(results))
        body: dict[str, Any] = {"class_counts": {n: int((y == i).sum()) for i, n in enumerate(labels)},
                                "primary_threshold": primary, "metrics": results,
                                "calibration": calibration(y, outputs)}
        body["ece"] = body["calibration"]["ece"]
        body["summary"] = [*(_summary_line(key, m) for key, m in results.items()), f"ECE {body['ece']:.4f}"]
        if plots is not None:
            from lepton.plots import plot_confusion, plot_reliability, plot_roc

            plot_roc(y, outputs, labels, plots / "roc.png")
            plot_confusion(np.array(results[primary]["confusion_matrix"]), labels, plots / "confusion.png")
            plot_reliability(body["calibration"], plots / "reliability.png")
            body["plots"] = [str(plots / f) for f in ("roc.png", "confusion.png", "reliability.png")]
        return body, self._markdown(body)

    def _markdown(self, body: dict[str, Any]) -> list[str]:
        lines = [f"- Classes: {', '.join(f'{k}: {v}' for k, v in body['class_counts'].items())}",
                 f"- Expected calibration error (15 bins): {fmt(body['ece'])}", ""]
        for key, m in body["metrics"].items():
            ci = m.get("ci95") or {}
            thr = "arg-max" if m["threshold"] is None else f"threshold {m['threshold']:.4f} ({key})"
            lines += [f"## Decision rule: {thr}", "", "| metric | value | 95 % CI |", "|---|---|---|",
                      f"| accuracy | {fmt(m['acc'])} | {' – '.join(fmt(v) for v in ci.get('acc', [])) or '-'} |",
                      f"| AUC | {fmt(m['auc'])} | {' – '.join(fmt(v) for v in ci.get('auc', [])) or '-'} |",
                      f"| balanced accuracy | {fmt(m['balanced_acc'])} | |", "",
                      "| class | sensitivity | specificity | precision | F1 | support |", "|---|---|---|---|---|---|"]
            for name, c in m["per_class"].items():
                lines.append(f"| {name} | {fmt(c['sensitivity'])} | {fmt(c['specificity'])} | "
                             f"{fmt(c['precision'])} | {fmt(c['f1'])} | {c['support']} |")
            lines += ["", "Confusion matrix (rows: true, columns: predicted):", "", "```"]
            lines += ["  ".join(f"{v:6d}" for v in row) for row in m["confusion_matrix"]]
            lines += ["```", ""]
        if body.get("plots"):
            lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in body["plots"]]
        return lines

    # -- protocols and the registry --------------------------------------------------------------------------
    def batch_columns(self, labels: list[str]) -> list[tuple[str, str]]:
        return [("label", "string"), *[(f"prob_{c}", "float64") for c in labels], ("threshold", "float64")]

    def batch_row(self, outputs, answer, labels) -> dict[str, Any]:
        return {"label": answer["label"], "threshold": answer["threshold"],
                **{f"prob_{c}": p for c, p in answer["probabilities"].items()}}

    def oip_outputs(self, labels: list[str], size: list[int] | None = None) -> list[dict[str, Any]]:
        return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(labels)]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]}]

    def oip_tensors(self, outputs, labels, info) -> dict[str, Any]:
        names = np.array([labels[int(k)] for k in self.decide(outputs, info)], dtype=object)
        return {"probabilities": ("FP32", outputs.astype(np.float32)), "label": ("BYTES", names)}

    def card_metrics(self, info, reports):
        metrics: dict[str, Any] = {"val_auc": info.get("val_auc"), "val_acc": info.get("val_acc"),
                                   "best_epoch": info.get("best_epoch")}
        if info.get("calibration"):
            c = info["calibration"]
            metrics["calibration"] = {k: c.get(k) for k in ("method", "n", "fitted_on", "slope_before",
                                                             "slope_after", "citl_before", "citl_after")}
        for folder, rep in reports.items():
            metrics[f"eval/{folder}"] = {
                "split": rep["split"], "images": rep["images"], "ece": rep.get("ece"),
                **{k: {"acc": m["acc"], "auc": m["auc"], "ci95": m.get("ci95")} for k, m in rep["metrics"].items()}}
        return metrics

    def card_text(self, labels, channels, threshold, metrics):
        use = [f"Classifies {channels}-channel medical images into {', '.join(labels)}. Decision support for "
               "trained readers only: not a diagnosis, and not validated for populations, devices or protocols "
               "unlike the training data."]
        decision = [f"- Decision threshold on P({labels[-1]}): {_num(threshold)}" if threshold is not None
                    else "- Decision rule: arg-max over classes"]
        lines = []
        calib = metrics.get("calibration")
        if calib:
            decision.append(f"- Probabilities recalibrated ({calib.get('method')}) on {calib.get('n')} local images "
                            f"of `{calib.get('fitted_on')}`: the served P({labels[-1]}) is the recalibrated one; "
                            f"calibration slope {_num(calib.get('slope_before'))} before, "
                            f"{_num(calib.get('slope_after'))} after (on the fitting data); the threshold is the "
                            "original one carried through the map")
        if metrics.get("val_auc") is not None:
            lines.append(f"- Validation (model selection): AUC {_num(metrics.get('val_auc'))}, "
                         f"ACC {_num(metrics.get('val_acc'))}")
        for key, rep in metrics.items():
            if not key.startswith("eval/") or not isinstance(rep, dict) or "split" not in rep:
                continue
            lines.append(f"- {rep['split']} split, {rep['images']} images, ECE {_num(rep.get('ece'))}:")
            for rule, r in rep.items():
                if isinstance(r, dict) and "acc" in r:
                    ci = r.get("ci95") or {}
                    acc_ci = " [{:.4f}, {:.4f}]".format(*ci["acc"]) if ci.get("acc") else ""
                    auc_ci = " [{:.4f}, {:.4f}]".format(*ci["auc"]) if ci.get("auc") else ""
                    lines.append(f"  - threshold {rule}: ACC {_num(r['acc'])}{acc_ci}, AUC {_num(r['auc'])}{auc_ci}")
        return {"use": use, "decision": decision, "metrics": lines}


def _summary_line(key: str, m: dict[str, Any]) -> str:
    ci = m.get("ci95") or {}
    thr = "argmax" if m["threshold"] is None else f"{key} threshold {m['threshold']:.3f}"
    acc_ci = " [{:.3f}, {:.3f}]".format(*ci["acc"]) if ci else ""
    auc_ci = " [{:.3f}, {:.3f}]".format(*ci["auc"]) if ci else ""
    return f"{thr}: ACC {m['acc']:.4f}{acc_ci}  AUC {m['auc']:.4f}{auc_ci}  balanced ACC {m['balanced_acc']:.4f}"


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("n/a" if x is None else str(x))


def _rows(x, idx: np.ndarray) -> np.ndarray:
    """``x[idx]`` as an array, for an array, a tensor or images in the cache."""
    if isinstance(x, np.ndarray):
        return x[idx]
    import torch

    return np.asarray(x[torch.from_numpy(np.asarray(idx, np.int64))])
