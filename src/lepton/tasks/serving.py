"""The inference and serving half of the task contract, a base of ``Task`` (``lepton.tasks.base``): how a task's
network meets an input, and what its answers can be encoded as and used for — declared, so that ``lepton.runs``, the
server, the batch engine, the PACS node and exports never ask which task they hold. A task overrides these beside its
other hooks (segmentation in ``lepton.tasks.seg_serving``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lepton.errors import ConfigError


class TaskServing:
    """— inference and serving — what runs, the server, the batch engine, the PACS node and exports ask of a task."""

    name: ClassVar[str] = ""

    #: How the network meets an input, named after the MONAI inferer that runs it: "simple" — inputs resized to the
    #: network's size and run in batches (``runs.predict_outputs``; the server's fixed-size batcher); "sliding_window"
    #: — each input kept at its own size with its geometry, the run's steps applied and undone around windows of the
    #: network's size slid over it (``runs.segment_image``; the server's window batcher), its outputs (K, …) on the
    #: input's grid answered by ``encode_grid``; its ONNX graph takes any spatial size, its cost is timed per window.
    inferer: ClassVar[str] = "simple"
    #: Encodings of an answer beyond JSON and OIP tensors: "dicom_sr" (the PACS node stores a DICOM SR per answer),
    #: "label_map" (a label-map file per input, ``label_map``: ``lepton predict --output``, the server's answer, batch
    #: ``mask`` files), "dicom_seg" (a DICOM SEG referencing an input DICOM series, ``dicom_seg``: predict, the
    #: server's ``?dicom_seg``, batch, and the PACS node in place of an SR).
    encodings: ClassVar[frozenset[str]] = frozenset({"dicom_sr"})
    #: What else the task supports, declared rather than probed: "explain" (saliency maps of ``explain_index``'s
    #: output: the server's ``?explain``), "batch" (``lepton predict --batch`` rows: ``batch_columns``, ``batch_row``),
    #: "stream_eval" (``lepton evaluate --stream``: the batch rows' class probabilities scored by ``report``); a task
    #: may declare more with members of its own (detection: "frame_answer", "explain_boxes").
    capabilities: ClassVar[frozenset[str]] = frozenset()

    @property
    def on_grid(self) -> bool:
        """Whether each input is answered at its own size (the "sliding_window" inferer) rather than resized."""
        return self.inferer == "sliding_window"

    def encode_grid(self, outputs: np.ndarray, labels: list[str], affine: np.ndarray | None) -> dict[str, Any]:
        """The JSON answer for one input's outputs (K, …) on its own grid ("sliding_window" tasks), in world units
        where ``affine`` (the input's voxel-to-world matrix, or None) gives them."""
        raise NotImplementedError

    def label_map(self, outputs: np.ndarray, affine: np.ndarray | None) -> tuple[bytes, str]:
        """("label_map") One input's answer as a label-map file: its bytes and format ("nifti", "png")."""
        raise ConfigError(f"the {self.name} task writes no label maps")

    def dicom_seg(self, outputs: np.ndarray, affine: np.ndarray | None, series: str | Path, labels: list[str],
                  path: Path, *, algorithm: str, version: str = "1") -> Path:
        """("dicom_seg") One input's answer written to ``path`` as a DICOM SEG referencing the series in folder
        ``series``."""
        raise ConfigError(f"the {self.name} task writes no DICOM SEG")

    def answer_line(self, answer: Mapping[str, Any]) -> str:
        """A short line for one encoded answer (the PACS node's report of what it stored)."""
        return str(answer.get("label", ""))

    def batch_columns(self, labels: list[str]) -> list[tuple[str, str]]:
        """("batch") The answer's columns in a batch job's output, between ``path, frame, truth`` and ``model,
        precision, error``: (name, Arrow type: string, int32, int64 or float64)."""
        raise ConfigError(f"a {self.name} run has no batch rows (its task declares none): predict it with "
                          "`lepton predict` without --batch")

    def batch_row(self, outputs: np.ndarray, answer: Mapping[str, Any], labels: list[str]) -> dict[str, Any]:
        """("batch") The values of ``batch_columns`` for one frame's (or, "sliding_window", one input's) outputs and
        their encoded answer."""
        raise NotImplementedError
