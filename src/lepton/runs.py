"""Run directories: loading a trained run and predicting with its saved preprocessing. The directory's format
(its files, read and written) is ``lepton.rundir``'s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lepton.config import TrainConfig
from lepton.data.transforms.preprocessing import Preprocessing
from lepton.errors import RunError
from lepton.models.layout import fast_layout
from lepton.rundir import COMPLETE, RunDir
from lepton.tasks import Task, get_task

if TYPE_CHECKING:
    import torch

RUN_FILES = COMPLETE  # what load_run needs (lepton.rundir)


def predict_outputs(model, x, activate: Callable, *, batch_size: int = 256, tta: bool = False,
                    device: str = "cpu", extras=None) -> np.ndarray:
    """The task's outputs (``activate`` of the logits: probabilities, values) of ``model`` for a normalised
    tensor batch, in chunks of ``batch_size``; with ``tta`` averaged with the horizontally flipped input (a dense
    task's outputs, on the input's grid, flipped back first). ``extras``: per-sample inputs beside the images
    (``Task.side_inputs``), the network's second argument."""
    import torch

    model.eval()
    # a network whose outputs are not on the input's grid (boxes) merges its own flip TTA
    merge = getattr(model, "merge_flipped", None)
    out = []
    # about 4 M pixels a chunk: large volumes go a few at a time (224 px images still 83 at a time)
    batch_size = max(1, min(batch_size, (1 << 22) // max(1, int(np.prod(x.shape[2:])))))
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = fast_layout(x[start:start + batch_size].to(device))
            side = () if extras is None else (extras[start:start + batch_size].to(device),)
            probs = activate(model(xb, *side))
            if tta:
                flipped = activate(model(torch.flip(xb, dims=[-1]), *side))
                probs = merge(probs, flipped) if merge is not None else flip_mean(probs, flipped)
            out.append(probs.float().cpu())  # fp32 whatever precision the forward pass ran in
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).numpy()


def flip_mean(outputs, flipped):
    """Flip TTA's answer: the mean of the outputs for an input and for its horizontal mirror, a dense task's mirrored
    outputs (on the input's grid: more than two axes) flipped back first. PyTorch tensors or NumPy arrays."""
    if flipped.ndim > 2:
        flipped = flipped[..., ::-1] if isinstance(flipped, np.ndarray) else flipped.flip(-1)
    return (outputs + flipped) / 2


def network_input(spec: Preprocessing, pixels: np.ndarray, slab_voxels: int = 1 << 22,
                  scale: float = 1.0) -> torch.Tensor:
    """A decoded image (C, …) in [0, 1] (an array or a memory map; its values times ``scale``) as the network takes
    it, (1, C, …) float32: channels converted and normalised slab by slab along the first spatial axis, so a CT case
    costs one copy, not the three that whole-array arithmetic makes."""
    import torch

    from lepton.data.index.cases import stored_values

    def read(part: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(stored_values(part, scale))[None]

    first = spec.convert_channels(read(pixels[:, :1]))
    out = torch.empty((1, first.shape[1], *pixels.shape[1:]), dtype=torch.float32)
    step = max(1, slab_voxels // max(int(np.prod(pixels.shape[2:])), 1))
    for lo in range(0, pixels.shape[1], step):
        out[:, :, lo:lo + step] = spec.normalize(spec.convert_channels(read(pixels[:, lo:lo + step])))
    return out


def segment_probs(model, spec: Preprocessing, pixels: np.ndarray | torch.Tensor, activate: Callable, *,
                  tta: bool = False, device: str = "cpu", overlap: float = 0.25, sw_batch_size: int = 2) -> np.ndarray:
    """A dense task's outputs (K, …) for one decoded image (C, …) in [0, 1] at its own size — or for a tensor that
    ``network_input`` already made of it: MONAI's sliding-window inference with windows of the network's input
    size (Gaussian-weighted, ``overlap``; ``sw_batch_size`` windows per call of ``model``), smaller inputs padded
    as in training, flip TTA flipped back."""
    import torch
    from monai.inferers import sliding_window_inference

    x = pixels if isinstance(pixels, torch.Tensor) else network_input(spec, pixels)
    pad_value = float(-spec.mean[0] / spec.std[0])  # zero intensity, as training padded

    def predictor(xb):
        xb = fast_layout(xb)
        p = activate(model(xb))
        if tta:
            p = flip_mean(p, activate(model(torch.flip(xb, dims=[-1]))))
        return p

    if hasattr(model, "eval"):
        model.eval()
    with torch.inference_mode():
        probs = sliding_window_inference(x.to(device), roi_size=spec.size, sw_batch_size=sw_batch_size,
                                         predictor=predictor,
                                         overlap=overlap, mode="gaussian", cval=pad_value)
    return probs[0].float().cpu().numpy()


def resample_probs(probs: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                   dst_shape: tuple[int, ...]) -> np.ndarray:
    """Probabilities (K, …) on one voxel grid resampled (trilinear, through world coordinates) onto another: a
    segmentation made after spacing/crop steps, returned on the input's own grid."""
    import torch
    import torch.nn.functional as F

    to_src = np.linalg.inv(src_affine) @ dst_affine  # dst index -> src index
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in dst_shape], indexing="ij"), axis=-1).reshape(-1, 3)
    src = idx @ to_src[:3, :3].T + to_src[:3, 3]
    size = np.array(probs.shape[1:], dtype=np.float64)
    norm = 2.0 * src / np.maximum(size - 1, 1) - 1.0  # align_corners=True coordinates, (d, h, w)
    grid = torch.from_numpy(norm[:, ::-1].copy()).float().view(1, *dst_shape, 3)  # grid_sample wants (w, h, d)
    out = F.grid_sample(torch.from_numpy(probs)[None].float(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=True)[0]
    outside = out.sum(0) < 1e-6  # beyond the processed region: background
    out[0][outside] = 1.0
    return out.numpy()


def segment_image(model, spec: Preprocessing, pixels: np.ndarray, affine: np.ndarray | None, activate: Callable, *,
                  tta: bool = False, device: str = "cpu", stepped: bool = False, sw_batch_size: int = 2) -> np.ndarray:
    """A dense task's outputs (K, …) for one decoded image (C, …) as read, on the image's own grid: the run's steps
    are applied, the network slides over the result (``segment_probs``), and the probabilities are resampled back
    when the steps moved the grid. ``stepped``: the image went through the steps already; outputs stay on its grid.
    ``model`` is a module or any callable from a batch tensor to outputs."""
    from lepton.data.transforms.pipeline import apply_steps

    if spec.steps and pixels.ndim == 4 and not stepped:
        moved, moved_affine, _ = apply_steps(pixels, affine, spec.steps, "input")
        probs = segment_probs(model, spec, moved, activate, tta=tta, device=device, sw_batch_size=sw_batch_size)
        if affine is None or moved_affine is None:
            raise RunError("a volume without geometry cannot be put back on its grid after spacing steps")
        return resample_probs(probs, moved_affine, affine, tuple(pixels.shape[1:]))
    return segment_probs(model, spec, pixels, activate, tta=tta, device=device, sw_batch_size=sw_batch_size)


@dataclass
class Run:
    """A trained run loaded from disk, ready to predict."""

    path: Path
    config: TrainConfig
    preprocessing: Preprocessing
    label_names: list[str]
    info: dict[str, Any]
    model: Any = field(repr=False, default=None)
    device: str = "cpu"
    task: Task = field(default=None)  # type: ignore[assignment]  # filled from the config when not given

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = get_task(self.config.task, self.config.task_options)
        if self.info.get("calibration"):  # a local recalibration: every path's probabilities go through activate
            self.task = self.task.with_calibration(self.info["calibration"])

    @property
    def threshold(self) -> float | None:
        """The val-selected decision threshold on P(positive class) for binary tasks."""
        return self.info.get("threshold")

    def predict_proba(self, images: list[np.ndarray] | np.ndarray, extras=None) -> np.ndarray:
        """The task's outputs (N, K) for decoded images (C, H, W) in [0, 1]: class probabilities for classification.
        ``extras``: per-sample inputs beside the images (N, F), for a network that takes them (covariates)."""
        return predict_outputs(self.model, self.preprocessing(images), self.task.activate, tta=self.config.tta,
                               device=self.device, extras=extras)

    def decide(self, outputs: np.ndarray) -> np.ndarray:
        """The task's decision per row (for classification: the stored threshold for two classes, else arg-max)."""
        return self.task.decide(outputs, self.info)

    def segment(self, pixels: np.ndarray, affine: np.ndarray | None = None, *, stepped: bool = False) -> np.ndarray:
        """A dense task's outputs (K, …) for one decoded image (C, …) as read (before the run's steps), on the
        image's own grid: the steps are applied, the network slides over the result, and the probabilities are
        resampled back when the steps moved the grid. ``stepped``: the image went through the steps already (data
        sets loaded for the run), and the outputs stay on that grid."""
        return segment_image(self.model, self.preprocessing, pixels, affine, self.task.activate, tta=self.config.tta,
                             device=self.device, stepped=stepped)

    def predict(self, paths: list[str | Path], output: str | Path | None = None,
                dicom_seg: bool = False, covariates: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Predict image files (any readable format); one dict per frame: ``path`` and the task's answer.

        A task may answer a file itself (``Task.answer_file``): segmentation answers per file with sizes and lesions
        on the input's grid, and with ``output`` also writes the label map there — NIfTI for volumes (the input's grid
        and affine), PNG for images — and with ``dicom_seg`` a DICOM SEG for inputs that are DICOM series folders.
        ``covariates``: one mapping per path (by covariate name) for a model that fuses clinical covariates with the
        image."""
        frames, names, rows = [], [], []
        if covariates is not None and len(covariates) != len(paths):
            raise RunError(f"{len(covariates)} covariate rows for {len(paths)} files: give one per file")
        parts: list[list[dict[str, Any]] | tuple[int, int]] = []  # a file's own answers, or its frames' span
        for i, p in enumerate(paths):
            own = self.task.answer_file(self, p, output, dicom_seg) if covariates is None else None
            if own is not None:
                parts.append(own)
                continue
            start = len(frames)
            for name, pixels in self.task.read(p, self.preprocessing):
                frames.append(pixels)
                names.append(name)
                rows.append(covariates[i] if covariates is not None else None)
            parts.append((start, len(frames)))
        answers: list[dict[str, Any]] = []
        if frames:
            extras = self.task.side_inputs(rows, self.preprocessing)
            if extras is None and covariates is not None:
                raise RunError(f"{self.path}: this model takes no covariates")
            outputs = self.predict_proba(frames, extras)
            answers = [{"path": name, **self.task.encode(row, self.label_names, self.info)}
                       for name, row in zip(names, outputs, strict=True)]
        return [a for part in parts for a in (part if isinstance(part, list) else answers[part[0]:part[1]])]


def load_run(path: str | Path, *, device: str = "cpu") -> Run:
    """Load a finished run directory (weights from ``best.pt``) for prediction or evaluation."""
    path = Path(path)
    run_dir = RunDir(path)
    run_dir.check_complete()
    try:
        config = run_dir.read_config()
        spec = run_dir.read_preprocessing()
        labels = run_dir.read_labels()
        info = run_dir.read_info()
        model = run_dir.load_model(device=device)
    except RunError:
        raise
    except Exception as exc:
        raise RunError(f"{path}: cannot load run ({type(exc).__name__}: {exc})") from exc
    return Run(path, config, spec, labels, info, model, device, get_task(config.task, config.task_options))
