"""What both engines share: decoding an input (in a worker process or a Ray task), the output's schema, and the rows
a run's answers become. The forward pass is the run's own (``lepton.runs.predict_outputs``, or ``Run.segment`` for a
task whose inferer slides over each input, ``Task.inferer``); nothing here repeats it. The answer's columns and values
are the task's (``Task.batch_columns``, ``Task.batch_row``); only tasks that declare "batch" have them.

A row: ``path``, ``frame`` (the frame's index in a multi-frame input), ``truth`` (a manifest's label), the task's
columns, ``model``, ``precision``, ``error``. A classifier's columns: ``label``, ``prob_<class>`` per class,
``threshold``. A segmentation's: ``mask`` (the label map written: NIfTI for volumes, PNG for images), ``dicom_seg``
(with ``dicom_seg``, a DICOM SEG referencing an input that is a DICOM series), ``shape``, ``voxels_<class>``,
``volume_ml_<class>`` (volumes with geometry), ``area_mm2_<class>`` (images with a pixel spacing), ``lesions``. An input
that cannot be read or predicted is one row with its ``error`` and no answer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lepton.batch.sources import Input

#: Decode a file into at most this many frames (a multi-frame input beyond it is an error row, not a memory spike).
MAX_FRAMES = 4096


@dataclass
class Decoded:
    """An input decoded: normalised frames ``x`` (F, C, …) float32 at the network's size, or (``on_grid``) its
    ``pixels`` (C, …) in [0, 1] as read, with its ``affine``; or the ``error`` that stopped it."""

    item: Input
    x: np.ndarray | None = None
    pixels: np.ndarray | None = None
    affine: np.ndarray | None = None
    error: str | None = None


_SPECS: dict[str, Any] = {}


def _spec(spec: dict[str, Any]):
    """The Preprocessing of a spec dict, built once per process."""
    import json

    from lepton.data.transforms.preprocessing import Preprocessing

    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in _SPECS:
        _SPECS[key] = Preprocessing.from_dict(spec)
    return _SPECS[key]


def decode(item: Input, spec: dict[str, Any], on_grid: bool) -> Decoded:
    """Read and preprocess one input as ``Run.predict`` does (the run's window, slices and steps; the exact
    inference-time tensor at the network's size), or with ``on_grid`` (a task sliding over each input at its own size)
    one image or volume as read, with its geometry; any failure becomes the row's error."""
    from lepton.data.readers.io import read_image

    try:
        pre = _spec(spec)
        path = Path(item.path)
        if on_grid:
            from lepton.data.readers.masks import is_volume

            frames = read_image(path, window=pre.window, slices="volume" if is_volume(path) else "middle")
            if len(frames) != 1:
                raise ValueError(f"holds {len(frames)} frames; a segmentation model takes one image or volume")
            return Decoded(item, pixels=np.ascontiguousarray(frames[0].pixels, np.float32), affine=frames[0].affine)
        frames = read_image(path, window=pre.window, slices=pre.slices, steps=pre.steps)
        if not frames:
            raise ValueError("no image in it")
        if len(frames) > MAX_FRAMES:
            raise ValueError(f"{len(frames)} frames, more than {MAX_FRAMES}")
        x = pre([f.pixels for f in frames]).numpy().astype(np.float32, copy=False)
        return Decoded(item, x=x)
    except Exception as exc:  # a bad input is a row with its reason; the job goes on
        return Decoded(item, error=error_text(exc))


def decode_chunk(items: list[Input], spec: dict[str, Any], on_grid: bool) -> list[Decoded]:
    """``decode`` over a chunk (what a worker process is handed at a time)."""
    return [decode(item, spec, on_grid) for item in items]


def worker_init(predictor: Predictor | None = None) -> None:
    """A worker process: one thread for PyTorch and its libraries (the processes are the parallelism); with a
    ``predictor``, the model this process answers its chunks with (``answer_chunk``)."""
    import os
    import sys

    global _PREDICTOR
    if sys.platform.startswith("linux"):  # end with the job: a SIGKILLed job leaves no worker holding its model
        import contextlib
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):  # a libc without prctl: workers outlive a killed job
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    _PREDICTOR = predictor


_PREDICTOR: Predictor | None = None


def answer_chunk(items: list[Input]) -> list[dict[str, Any]]:
    """Rows for a chunk of classifier inputs, decoded and answered in this worker process by the model it was started
    with (one forward pass over the chunk's frames): what each of Ray's fused actors does, without Ray."""
    if _PREDICTOR is None:  # pragma: no cover - a pool started without its model
        raise RuntimeError("answer_chunk needs a worker started by worker_init(predictor)")
    return _PREDICTOR.classify([decode(item, _PREDICTOR.spec, False) for item in items])


def error_text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if type(exc).__name__ in ("DataError", "RunError") else f"{type(exc).__name__}: {text}"


def schema(run):
    """The output's Arrow schema for a run (the same for every part and both engines): the task's columns
    (``Task.batch_columns``) between the input's and the job's."""
    import pyarrow as pa

    head = [pa.field("path", pa.string(), nullable=False), pa.field("frame", pa.int32()),
            pa.field("truth", pa.string())]
    tail = [pa.field("model", pa.string()), pa.field("precision", pa.string()), pa.field("error", pa.string())]
    body = [pa.field(name, getattr(pa, kind)()) for name, kind in run.task.batch_columns(run.label_names)]
    return pa.schema(head + body + tail)


class Predictor:
    """A loaded run answering decoded inputs as rows: held by the local engine and by each Ray actor."""

    def __init__(self, run, *, model_id: str, precision: str = "fp32", masks: str | Path | None = None,
                 batch_size: int | None = None, dicom_seg: bool = False) -> None:
        self.run = run
        self.dicom_seg = dicom_seg
        self.model_id = model_id
        self.precision = precision
        self.masks = Path(masks) if masks is not None else None
        self.batch_size = int(batch_size or run.config.batch_size or 64)
        #: The task slides over each input at its own size (``Task.inferer``): inputs are decoded with their geometry
        #: and answered one at a time (``grid``) rather than batched at the network's size (``classify``).
        self.on_grid = run.task.on_grid
        self.spec = run.preprocessing.to_dict()

    def _base(self, item: Input, frame: int = 0) -> dict[str, Any]:
        return {"path": item.path, "frame": frame, "truth": item.truth, "model": self.model_id,
                "precision": self.precision}

    def error_row(self, item: Input, error: str) -> dict[str, Any]:
        return {**self._base(item), "error": error}

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """The run's outputs for normalised frames: ``predict_outputs`` at the run's batch size, in the precision."""
        import torch

        from lepton.models.precision import autocast
        from lepton.runs import predict_outputs

        with autocast(self.precision, self.run.device):
            return predict_outputs(self.run.model, torch.from_numpy(x), self.run.task.activate,
                                   batch_size=self.batch_size, tta=self.run.config.tta, device=self.run.device)

    def classify(self, decoded: list[Decoded]) -> list[dict[str, Any]]:
        """Rows for decoded inputs at the network's size, in their order: one forward pass over all their frames."""
        good = [d for d in decoded if d.error is None]
        outputs = None
        if good:
            try:
                outputs = self.outputs(np.concatenate([d.x for d in good]))
            except Exception as exc:  # a batch the model refuses (shapes): each input on its own, to find the bad one
                if len(good) == 1:
                    good[0].error = error_text(exc)
                    good = []
                else:
                    return [row for d in decoded for row in self.classify([d])]
        rows, at = [], 0
        labels, info, task = self.run.label_names, self.run.info, self.run.task
        for d in decoded:
            if d.error is not None:
                rows.append(self.error_row(d.item, d.error))
                continue
            for f in range(len(d.x)):
                answer = task.encode(outputs[at], labels, info)
                rows.append({**self._base(d.item, f), **task.batch_row(outputs[at], answer, labels)})
                at += 1
        return rows

    def grid(self, d: Decoded) -> dict[str, Any]:
        """The row for one input decoded with its geometry (``on_grid``), answered on its own grid; its label map
        written under ``masks`` and, with ``dicom_seg``, a DICOM SEG for a DICOM series (the task's encodings)."""
        if d.error is not None:
            return self.error_row(d.item, d.error)
        try:
            from lepton.models.precision import autocast
            from lepton.utils import atomic_write_bytes

            task, labels = self.run.task, self.run.label_names
            with autocast(self.precision, self.run.device):
                probs = np.asarray(self.run.segment(d.pixels, d.affine), np.float32)
            answer = task.encode_grid(probs, labels, d.affine)
            row = {**self._base(d.item), **task.batch_row(probs, answer, labels)}
            if self.masks is not None and "label_map" in task.encodings:
                target = mask_path(self.masks, d.item, volume=probs.ndim == 4)
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(target, task.label_map(probs, d.affine)[0])  # atomic: a rerun rewrites it whole
                row["mask"] = str(target)
                if self.dicom_seg and Path(d.item.path).is_dir():  # a DICOM series: a SEG that references it
                    row["dicom_seg"] = str(task.dicom_seg(probs, d.affine, d.item.path, labels,
                                                          target.with_name(target.name.replace(".nii.gz", ".dcm")),
                                                          algorithm=Path(self.model_id).name[:64]))
            return row
        except Exception as exc:
            return self.error_row(d.item, error_text(exc))

    def rows(self, decoded: list[Decoded]) -> list[dict[str, Any]]:
        if self.on_grid:
            return [self.grid(d) for d in decoded]
        return self.classify(decoded)


def mask_path(masks: Path, item: Input, *, volume: bool) -> Path:
    """Where an input's label map goes: its path below the source's folder mirrored under ``masks`` (else its name
    with a short hash of its path), ``_seg.nii.gz`` for volumes and ``_seg.png`` for images."""
    from lepton.data.readers.masks import stem

    path = Path(item.path)
    suffix = "_seg.nii.gz" if volume else "_seg.png"
    if item.root is not None and path.is_relative_to(item.root) and path != Path(item.root):
        rel = path.relative_to(item.root)
        return masks / rel.parent / f"{stem(rel)}{suffix}"
    digest = hashlib.blake2b(item.path.encode(), digest_size=4).hexdigest()
    return masks / f"{stem(path)}-{digest}{suffix}"
