"""Segmentation's inference and serving members, a mixin of ``Segmentation`` (``lepton.tasks.segmentation``): how its
network meets an input (sliding windows over the input at its own size), its answer on the input's grid, and its
encodings — label-map files (NIfTI with the input's affine for volumes, PNG of class indices for images), DICOM SEG
referencing the input series, batch rows and the PACS node's line. ``lepton.runs``, the server, the batch engine and
the PACS node call these through the ``Task`` contract and never ask which task they hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lepton.errors import RunError


def label_map_bytes(labels: np.ndarray, affine: np.ndarray | None) -> tuple[bytes, str]:
    """A label map (uint8, on the input's grid) as a file: gzipped NIfTI with ``affine`` (millimetres) for volumes,
    an 8-bit PNG of class indices for images; returns ``(bytes, "nifti" | "png")``."""
    import gzip
    import io

    if labels.ndim == 3:
        import nibabel as nib

        img = nib.Nifti1Image(labels.astype(np.uint8), affine if affine is not None else np.eye(4))
        img.header.set_xyzt_units("mm")
        return gzip.compress(img.to_bytes(), mtime=0), "nifti"
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue(), "png"


def write_label_map(labels: np.ndarray, affine: np.ndarray | None, path: Path) -> Path:
    """``label_map_bytes`` written atomically to ``path``."""
    from lepton.utils import atomic_write_bytes

    atomic_write_bytes(path, label_map_bytes(labels, affine)[0])
    return path


class SegmentationServing:
    """The inference and serving half of ``Segmentation`` (see ``Task``'s block of the same name)."""

    inferer: ClassVar[str] = "sliding_window"
    encodings: ClassVar[frozenset[str]] = frozenset({"label_map", "dicom_seg"})
    capabilities: ClassVar[frozenset[str]] = frozenset({"batch"})

    def encode_grid(self, outputs: np.ndarray, labels: list[str], affine: np.ndarray | None) -> dict[str, Any]:
        from lepton.data.readers.volume import spacing_of

        return self.describe(outputs, labels, spacing_of(affine), affine)  # type: ignore[attr-defined]

    def label_map(self, outputs: np.ndarray, affine: np.ndarray | None) -> tuple[bytes, str]:
        return label_map_bytes(outputs.argmax(0).astype(np.uint8), affine)

    def dicom_seg(self, outputs: np.ndarray, affine: np.ndarray | None, series: str | Path, labels: list[str],
                  path: Path, *, algorithm: str, version: str = "1") -> Path:
        from lepton.data.readers.dicomseg import write_seg

        return write_seg(outputs.argmax(0).astype(np.uint8), affine, series, labels, path, algorithm=algorithm,
                         version=version)

    def answer_file(self, run, path: str | Path, output: str | Path | None = None,
                    dicom_seg: bool = False) -> list[dict[str, Any]]:
        """One file's answer on its own grid (sizes, lesions); with ``output`` its label map written there
        (``<stem>_seg.nii.gz`` or ``_seg.png``) and with ``dicom_seg`` a DICOM SEG for an input that is a DICOM series
        folder."""
        from lepton.data.readers.io import read_image
        from lepton.data.readers.masks import is_volume

        path = Path(path)
        frames = read_image(path, window=run.preprocessing.window, slices="volume" if is_volume(path) else "middle")
        if len(frames) != 1:
            raise RunError(f"{path}: holds {len(frames)} frames; a segmentation model takes one image or volume")
        frame = frames[0]
        probs = run.segment(frame.pixels, frame.affine)
        answer = {"path": str(path), **self.encode_grid(probs, run.label_names, frame.affine)}
        if output is not None:
            out = Path(output)
            out.mkdir(parents=True, exist_ok=True)
            stem = path.name.removesuffix(".gz").rsplit(".", 1)[0] if "." in path.name else path.name
            labels = probs.argmax(0).astype(np.uint8)
            answer["label_map"] = str(write_label_map(labels, frame.affine, out / (
                f"{stem}_seg.nii.gz" if labels.ndim == 3 else f"{stem}_seg.png")))
            if dicom_seg and path.is_dir():
                answer["dicom_seg"] = str(self.dicom_seg(probs, frame.affine, path, run.label_names,
                                                         out / f"{stem}_seg.dcm", algorithm=run.path.name[:64]))
        return [answer]

    def answer_line(self, answer: dict[str, Any]) -> str:
        return f"{len(answer.get('lesions', []))} lesion(s)"

    def batch_columns(self, labels: list[str]) -> list[tuple[str, str]]:
        classes = labels[1:]
        return [("mask", "string"), ("dicom_seg", "string"), ("shape", "string"),
                *[(f"voxels_{c}", "int64") for c in classes], *[(f"volume_ml_{c}", "float64") for c in classes],
                *[(f"area_mm2_{c}", "float64") for c in classes], ("lesions", "int32")]

    def batch_row(self, outputs: np.ndarray, answer: dict[str, Any], labels: list[str]) -> dict[str, Any]:
        label_map = outputs.argmax(0)
        row: dict[str, Any] = {"shape": "x".join(map(str, label_map.shape)), "lesions": len(answer["lesions"])}
        for k, name in enumerate(labels[1:], start=1):
            row[f"voxels_{name}"] = int((label_map == k).sum())
            if "volume_ml" in answer:
                row[f"volume_ml_{name}"] = answer["volume_ml"][name]
            if "area_mm2" in answer:
                row[f"area_mm2_{name}"] = answer["area_mm2"][name]
        return row
