"""What knowledge distillation needs from a task (``lepton.distill`` drives it): the teacher's outputs softened at a
temperature beside the labels as training targets, and the student's loss on them.

Classification: one row per image, ``[teacher probabilities at T …, label]`` (label -1: an unlabelled image), and
``alpha · T² · KL + (1 - alpha) · hard loss`` (Hinton et al., 2015). Segmentation: the teacher's soft masks, one
compressed file per case on disk (``SoftMasks`` reads a batch's cases when the loop asks for them, so a large set's
soft masks are never all in memory), stacked behind the label map as channels ``[label, p_0 … p_K-1]`` so that
patches and augmentation move them with the image; the loss is voxel-wise KL at T plus a soft Dice against the
teacher's probabilities, mixed with the task's own Dice + cross-entropy on the labels.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lepton.errors import RunError

if TYPE_CHECKING:
    import torch

    from lepton.tasks.base import Loss

#: A soft mask's probabilities are kept as uint8 (p · 255, rounded): 1/510 at most off, 4x smaller than float32
#: before compression.
QUANT = 255.0


def soft_targets(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probabilities (N, K, …) sharpened or softened at ``temperature``: softmax(log p / T) over axis 1, the
    teacher's logits being the log of its (ensemble-mean) probabilities."""
    import torch

    return torch.softmax(torch.log(probs.float().clamp_min(1e-8)) / temperature, dim=1)


def kd_loss(hard_loss: Loss, temperature: float, alpha: float) -> Loss:
    """The student's loss on a target row ``[teacher probabilities at T …, hard label]`` (label -1: unlabelled):
    ``alpha · T² · KL(teacher_T ‖ student_T) + (1 - alpha) · hard_loss`` over the labelled rows."""
    import torch.nn.functional as F

    def loss(logits, target):
        logits = logits.float()
        soft, hard = target[:, :-1].float(), target[:, -1].long()
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean") * temperature ** 2
        labelled = hard >= 0
        ce = hard_loss(logits[labelled], hard[labelled]) if bool(labelled.any()) else logits.sum() * 0.0
        return alpha * kd + (1.0 - alpha) * ce

    return loss


def class_targets(y_train: torch.Tensor, probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Rows ``[teacher probabilities at T …, label]`` for ``probs`` (N, K); rows past ``len(y_train)`` are
    unlabelled images (label -1)."""
    import torch

    hard = torch.cat([y_train.float(), torch.full((len(probs) - len(y_train),), -1.0)])
    return torch.cat([soft_targets(probs, temperature), hard[:, None]], dim=1)


def soft_mask_loss(hard_loss: Loss, temperature: float, alpha: float) -> Loss:
    """The student's loss on targets ``[label, teacher probabilities …]`` (N, 1 + K, …): ``alpha · (T² · KL +
    soft Dice) + (1 - alpha) · hard_loss(logits, label)``. The KL is voxel-wise between the teacher's and the
    student's probabilities at ``temperature``, averaged over voxels; the soft Dice (MONAI's ``DiceLoss`` with the
    teacher's probabilities as its target, foreground classes, batch-wise) compares the student's probabilities with
    the teacher's at T = 1. Voxels that augmentation moved in from outside the case carry no teacher output (all
    channels 0) and count as background."""
    import torch
    import torch.nn.functional as F
    from monai.losses import DiceLoss

    dice = DiceLoss(include_background=False, softmax=True, batch=True)

    def loss(logits, target):
        logits = logits.float()
        label, soft = target[:, :1].round().long(), target[:, 1:].float()
        outside = (soft.sum(1, keepdim=True) < 0.5).float()
        soft = torch.cat([soft[:, :1] + outside, soft[:, 1:]], 1)
        warm = soft_targets(soft, temperature)
        kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), warm, reduction="none").sum(1).mean()
        return alpha * (kl * temperature ** 2 + dice(logits, soft)) + (1.0 - alpha) * hard_loss(logits, label)

    return loss


def mask_file(folder: Path, index: int) -> Path:
    """Where the teacher's soft mask of training case ``index`` is kept."""
    return Path(folder) / f"case-{index:06d}.npz"


def write_soft_mask(folder: Path, index: int, probs: np.ndarray, key: str) -> None:
    """Case ``index``'s teacher probabilities (K, …) quantised to uint8 and compressed, with the ``key`` of what
    they were computed from; written atomically."""
    from lepton.utils import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, probs=np.round(np.clip(probs, 0.0, 1.0) * QUANT).astype(np.uint8), key=np.array(key))
    atomic_write_bytes(mask_file(folder, index), buf.getvalue())


def has_soft_mask(folder: Path, index: int, key: str, shape: tuple[int, ...]) -> bool:
    """Whether case ``index``'s soft mask is on disk, readable, computed from ``key``, of spatial ``shape``."""
    path = mask_file(folder, index)
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return str(z["key"]) == key and tuple(z["probs"].shape[1:]) == tuple(shape)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False  # a torn or foreign file: computed again


class SoftMasks:
    """Segmentation distillation targets: the label maps (N, 1, …) held in memory and the teacher's soft masks read
    from ``folder`` per case when indexed. ``masks[idx]`` is (len(idx), 1 + K, …): the label, then the teacher's
    probabilities (renormalised after quantisation), on the label maps' grid."""

    def __init__(self, labels: torch.Tensor, folder: Path) -> None:
        self.labels, self.folder = labels, Path(folder)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx) -> torch.Tensor:
        import torch

        rows = torch.as_tensor(idx).reshape(-1).tolist()
        probs = []
        for i in rows:
            with np.load(mask_file(self.folder, i)) as z:
                probs.append(z["probs"])
        soft = torch.from_numpy(np.stack(probs)).float() / QUANT
        soft = soft / soft.sum(1, keepdim=True).clamp_min(1e-6)
        if tuple(soft.shape[2:]) != tuple(self.labels.shape[2:]):
            raise RunError(f"{self.folder}: soft masks of size {tuple(soft.shape[2:])} for label maps of "
                             f"{tuple(self.labels.shape[2:])}")
        return torch.cat([self.labels[rows].float(), soft], 1)
