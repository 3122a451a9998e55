"""Semi-supervised training: a few labelled cases and a pool of unlabelled ones in every step, for any task that
declares ``semi_supervised`` (classification, segmentation).

``fixmatch`` (Sohn et al., 2020): the network's prediction on a weakly augmented unlabelled case becomes its
pseudo-label where the top probability reaches ``semi_threshold`` (per image, or per voxel for a dense task), and the
network learns that label on a strongly augmented copy. ``mean-teacher`` (Tarvainen & Valpola, 2017): an
exponential moving average of the network (the teacher, decay 0.99) predicts on a weak view, and the network is
pulled towards it on a strong view (mean squared difference of the class probabilities, ramped up over the first
30 % of the steps). The task makes the two views (``Task.unlabelled_views``: a dense task keeps them on one grid)
and the loss between them (``Task.consistency``).

An epoch is one pass over the unlabelled pool, ``semi_ratio`` unlabelled cases per labelled one in each step; the
labelled cases cycle in their own seeded order. The pool never holds val or test images or patients
(``lepton.data.readers.unlabelled.check_pool`` refused it before training), and pseudo-labels live only inside the step:
validation and the stored val set see labelled cases alone.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from lepton.config import TrainConfig
from lepton.data.index.cases import CaseStore
from lepton.data.transforms.preprocessing import AUGMENT_PRESETS
from lepton.errors import ConfigError, RunError
from lepton.models.layout import fast_layout
from lepton.tasks import Task
from lepton.train.data import Prepared
from lepton.train.distributed import SINGLE, Dist
from lepton.train.loop import Trainer, seed_epoch
from lepton.train.optim import lr_lambda

#: The weak view: what a label survives for certain (flips, small shifts).
WEAK = {"hflip": 0.5, "translate": 0.0625}
#: The strong view: heavy geometry, exposure, noise and, on half the batches, a corruption family.
STRONG = {**AUGMENT_PRESETS["strong"], "corrupt": 0.5}
TEACHER_DECAY = 0.99
#: What a semi-supervised epoch reports beside the training loss (into ``history.csv``).
SEMI_FIELDS = ("sup_loss", "unsup_loss", "pseudo_fraction")
RAMP_UP = 0.3


def make_trainer(config: TrainConfig, task: Task, prepared: Prepared, device: str, *, pretrained: str | None = None,
                 dist: Dist = SINGLE) -> Trainer:
    """The trainer a config asks for: ``SemiTrainer`` when it names an unlabelled pool, else ``Trainer``."""
    cls = SemiTrainer if config.semi else Trainer
    return cls(config, task, prepared, device, pretrained=pretrained, dist=dist)


class SemiTrainer(Trainer):
    """``Trainer`` whose epochs also learn from the unlabelled pool (FixMatch or Mean Teacher)."""

    def __init__(self, config: TrainConfig, task: Task, prepared: Prepared, device: str, *,
                 pretrained: str | None = None, dist: Dist = SINGLE):
        if prepared.unlabelled is None or not task.semi_supervised:
            raise ConfigError(f"semi-supervised training needs a task that learns from unlabelled cases "
                              f"(classification, segmentation; not {task.name}) and an unlabelled pool "
                              "(unlabelled: SOURCE)")
        if dist.enabled or config.adversarial or prepared.e_train is not None:
            raise ConfigError("semi-supervised training runs in one process, without adversarial training or "
                              "covariates")
        if isinstance(prepared.x_train, CaseStore):
            raise ConfigError("semi-supervised training holds the labelled cases in memory; these would not fit "
                              "(data_engine=cache); raise memory_limit_gb or label fewer, smaller cases")
        super().__init__(config, task, prepared, device, pretrained=pretrained, dist=dist)
        self.pool = prepared.unlabelled
        self.unlabelled_batch = config.batch_size * config.semi_ratio
        self.steps_per_epoch = max(1, len(self.pool) // self.unlabelled_batch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config, self.steps_per_epoch))
        self.teacher = None
        if config.semi == "mean-teacher":
            from lepton.train.optim import ema_update

            self.teacher = torch.optim.swa_utils.AveragedModel(self.module, multi_avg_fn=ema_update(TEACHER_DECAY),
                                                               use_buffers=True)
        self.steps_done = 0

    def train_epoch(self, epoch: int, on_step=None) -> dict[str, float]:
        """One pass over the unlabelled pool; the labelled images cycle beside it."""
        config, device, spec = self.config, self.device, self.data.spec
        order, gen = self.epoch_order(epoch)
        pool_order = torch.randperm(len(self.pool), generator=gen)
        labelled = order
        while len(labelled) < self.steps_per_epoch * config.batch_size:  # small labelled sets cycle
            labelled = torch.cat([labelled, self.epoch_order(epoch * 1_000 + len(labelled))[0]])
        seed_epoch(config.seed, epoch)
        self.model.train()
        t0, seen, totals = time.perf_counter(), 0, {"loss": 0.0, "sup": 0.0, "unsup": 0.0, "mask": 0.0}
        for step in range(self.steps_per_epoch):
            li = labelled[step * config.batch_size:(step + 1) * config.batch_size]
            ui = pool_order[step * self.unlabelled_batch:(step + 1) * self.unlabelled_batch]
            if len(li) < 2 or len(ui) < 2:
                continue
            xl, yl = self.labelled_batch(li, gen)
            weak, strong = self.task.unlabelled_views(self.pool.batch(ui.numpy(), spec), WEAK, STRONG, gen)
            parts = self.semi_step(spec.normalize(xl), yl, spec.normalize(weak.to(device)),
                                   spec.normalize(strong.to(device)), epoch)
            seen += len(li)
            for key in totals:
                totals[key] += parts[key] * len(li)
            if on_step is not None:
                on_step(parts["loss"], seen / (time.perf_counter() - t0))
        seconds = time.perf_counter() - t0
        n = max(1, seen)
        return {"lr": self.optimizer.param_groups[-1]["lr"], "train_loss": totals["loss"] / n,
                "sup_loss": totals["sup"] / n, "unsup_loss": totals["unsup"] / n,
                "pseudo_fraction": totals["mask"] / n, "seen": seen, "train_seconds": seconds}

    def ramp(self) -> float:
        """Mean Teacher's consistency weight: exp(-5 (1 - t)²) over the first 30 % of the steps, then 1."""
        total = self.steps_per_epoch * self.config.epochs * RAMP_UP
        t = min(1.0, self.steps_done / max(1.0, total))
        return math.exp(-5.0 * (1.0 - t) ** 2)

    def semi_step(self, xl: torch.Tensor, yl: torch.Tensor, weak: torch.Tensor, strong: torch.Tensor,
                  epoch: int) -> dict[str, float]:
        """One optimiser step on normalised labelled, weak and strong unlabelled batches; the loss parts."""
        dtype = self.amp_dtype
        with torch.autocast(self.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            with torch.no_grad():
                guide = (self.teacher.module if self.teacher is not None else self.model)(fast_layout(weak))
            logits = self.model(fast_layout(torch.cat([xl, strong])))
            sup = self.loss_fn(logits[:len(xl)], yl)
            unsup, mask = self.task.consistency(logits[len(xl):], guide, self.config.semi, self.config.semi_threshold)
            weight = self.config.semi_weight * (self.ramp() if self.teacher is not None else 1.0)
            loss = sup + weight * unsup
        if not torch.isfinite(loss):
            raise RunError(f"loss became {loss.item()} at epoch {epoch}; lower --lr or --semi-weight")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module)
        if self.teacher is not None:
            self.teacher.update_parameters(self.module)
        self.steps_done += 1
        return {"loss": loss.item(), "sup": sup.item(), "unsup": unsup.item(), "mask": mask.mean().item()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.steps_done = state.get("steps_done", 0)
