"""What training, evaluation, clinical validation, labelling and distillation ask of the segmentation task (the
``Task`` members of base.py's "training and evaluation" block), kept beside ``segmentation.py`` so that each module
stays small. ``Segmentation`` takes them first in its bases."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np


class SegmentationWorkflow:
    """The segmentation task's answers to the loop, evaluation, validation, labelling and distillation: cases padded,
    never resized; patches augmented with their masks; each case evaluated at its own size with its spacing; subgroups
    scored by each case's Dice; label maps as annotations; the teacher's soft masks on disk."""

    network_kind: ClassVar[tuple[str, str]] = ("image", "map")
    input_fit: ClassVar[str] = "pad"
    unit: ClassVar[str] = "case"
    annotation: ClassVar[str | None] = "mask"
    teacher_outputs: ClassVar[str] = "cases"

    def augment(self, x, y, options, generator):
        """The batch's masks moved with the images by the same geometric change (nearest neighbour)."""
        from lepton.data.transforms.preprocessing import augment_batch

        return augment_batch(x, options, generator, masks=y)

    def load_unlabelled(self, source, *, window, slices, steps):
        """Volumes read whole and 2-D images as they are, as the labelled cases were read (``slices`` set aside)."""
        from lepton.data.readers.unlabelled import load_unlabelled

        return load_unlabelled(source, window=window, slices="auto", steps=steps)

    def evaluation_outputs(self, run, data) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Each case segmented at its own size (sliding windows, the run's steps undone), with the names and voxel
        spacings (from the affines) that distances in mm and the report's plots need."""
        outputs = [run.segment(im, stepped=True) for im in data.images]
        spacings = [tuple(np.linalg.norm(a[:3, :3], axis=0)) if a is not None else (1.0,) * (np.ndim(im) - 1)
                    for im, a in zip(data.images, data.affines, strict=True)]
        return outputs, {"meta": {"names": data.names, "spacings": spacings, "images": data.images}}

    def unit_scores(self, body: Mapping[str, Any], labels: list[str]) -> tuple[str, np.ndarray]:
        """Each case's Dice averaged over the foreground classes, from the report's per-case rows."""
        return "dice", np.asarray([np.nanmean([np.nan if r.get(f"{c}/dice") is None else r[f"{c}/dice"]
                                               for c in labels[1:]]) for r in body["cases"]], dtype=np.float64)
