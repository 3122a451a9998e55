"""The optimisation state of one model and its steps: an epoch of training, the validation hook and the
state a checkpoint keeps. ``lepton.train.train`` drives it over a run directory; distributed and federated
training drive the same parts (wrap ``trainer.model``, call ``train_epoch``/``validate``, exchange weights)."""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import torch

from lepton.config import TrainConfig
from lepton.data.index.cases import CaseStore
from lepton.data.index.imagecache import CachedImages
from lepton.data.transforms.preprocessing import augment_options
from lepton.errors import ConfigError, RunError
from lepton.models import create_model
from lepton.models.adversarial import attack
from lepton.models.layout import fast_layout, model_layout
from lepton.models.precision import resolve_precision, torch_dtype
from lepton.runs import predict_outputs
from lepton.tasks import Task
from lepton.train.data import Prepared, bn_sample, case_outputs, normalized, patch_loader, val_targets
from lepton.train.distributed import LR_SCALING, SINGLE, Dist, shard, wrap
from lepton.train.optim import ema_update, lr_lambda, make_optimizer, recalibrate_bn


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Every epoch's randomness derives from (seed, epoch) alone, so a resumed run repeats exactly."""
    torch.manual_seed(seed * 1_000_003 + epoch)
    random.seed(seed * 1_000_003 + epoch)
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def model_spec(config: TrainConfig, task: Task, prepared: Prepared) -> dict[str, Any]:
    """The arguments of ``create_model`` that rebuild this run's network (saved in ``best.pt``)."""
    from lepton.models import model_info

    spec = prepared.spec
    kind = model_info(config.model).kind
    if kind != task.network_kind:
        from lepton.models import list_models

        fitting = [m.name for m in list_models() if m.kind == task.network_kind]
        raise ConfigError(f"{config.model} is an {' → '.join(kind)} network; the {task.name} task trains "
                          f"{' → '.join(task.network_kind)} networks: {', '.join(fitting)}")
    out = {"name": config.model, "in_channels": spec.channels, "num_classes": task.num_outputs(prepared.label_names),
           "image_size": spec.size[-1]}
    if spec.spatial_dims != 2:
        out["spatial_dims"] = spec.spatial_dims
    out.update(task.model_options(spec))
    if config.slab:
        if spec.spatial_dims != 3:
            raise ConfigError("slab (2.5-D) needs volumes; these data are 2-D images")
        out["slab_depth"] = spec.size[0]
    return out


class Trainer:
    """A network with its optimiser, LR schedule, EMA copy, mixed precision and loss, over prepared data."""

    def __init__(self, config: TrainConfig, task: Task, prepared: Prepared, device: str, *,
                 pretrained: str | None = None, dist: Dist = SINGLE):
        self.config, self.task, self.data, self.device, self.dist = config, task, prepared, device, dist
        self.spec = model_spec(config, task, prepared)
        if prepared.e_train is not None and config.adversarial:
            raise ConfigError("adversarial training attacks images alone; it is not for networks that take "
                              "covariates beside them")
        model = create_model(**self.spec, pretrained=pretrained)
        task.prepare_model(model, prepared.y_train, prepared.spec, config)
        #: The network itself; ``self.model`` is what the steps call (under DistributedDataParallel when
        #: several processes train, with BatchNorm statistics synchronised across them).
        self.module = model_layout(model.to(device))
        self.model = wrap(self.module, dist, device, sync_bn=config.sync_batchnorm)
        #: One step takes ``batch_size`` images in every process: the effective batch is their sum.
        self.global_batch = config.batch_size * dist.world
        self.lr_factor = LR_SCALING[config.lr_scaling](dist.world)
        self.optimizer = make_optimizer(self.module, config)
        for group in self.optimizer.param_groups:
            group["lr"] *= self.lr_factor
        self.steps_per_epoch = -(-len(prepared.y_train) // self.global_batch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config, self.steps_per_epoch))
        self.ema = None
        if config.ema_decay > 0:
            self.ema = torch.optim.swa_utils.AveragedModel(self.module, multi_avg_fn=ema_update(config.ema_decay),
                                                           use_buffers=True)
        self.precision = resolve_precision(config.precision if config.amp else "fp32", device,
                                           prepared.spec.spatial_dims)
        self.amp_dtype = torch_dtype(self.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn = task.criterion(prepared.y_train, config)
        self.sample_weight = task.sample_weights(prepared.y_train, config)
        self.augment = augment_options(config.augment, config.augment_options)
        norm = prepared.spec.normalize
        self.x_val = normalized(prepared.x_val, prepared.spec)
        # Averaged weights do not match averaged BatchNorm statistics; the EMA model's statistics are
        # recomputed on a fixed, un-augmented slice of the training set before each evaluation.
        self.bn_batches = lambda: (norm(b) for b in bn_sample(prepared, config.seed, config.batch_size))
        self._loader, self._plan = None, None

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated and saved: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.module

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
        """This epoch's sample order (weighted draws when the task asks for them) and its generator."""
        gen = seed_epoch(self.config.seed, epoch)
        n = len(self.data.y_train)
        order = (torch.multinomial(self.sample_weight, n, replacement=True, generator=gen)
                 if self.sample_weight is not None else torch.randperm(n, generator=gen))
        return order, gen

    def train_epoch(self, epoch: int, on_step=None) -> dict[str, float]:
        """One pass over the training set; ``on_step(loss, images_per_s)`` after each step."""
        config, data, device = self.config, self.data, self.device
        order, gen = self.epoch_order(epoch)
        dist, width = self.dist, self.global_batch
        if dist.enabled:  # the order is shared; augmentation, patch and dropout draws are each process's own
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch + 7919 * (dist.rank + 1))
            if dist.rank:  # rank 0 keeps the one-process stream
                torch.manual_seed(config.seed * 1_000_003 + epoch + 7919 * dist.rank)
        self.model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        planned = [order[step * width:(step + 1) * width] for step in range(self.steps_per_epoch)]
        # BatchNorm cannot train on a batch of one (in any process)
        planned = [(step, whole) for step, whole in enumerate(planned) if len(whole) >= 2 * dist.world]
        patches = self._patches(epoch, planned)
        for step, whole in planned:
            idx = shard(whole, dist)
            if patches is not None:  # cached cases: this step's patches, read ahead by the loader's workers
                xb, yb = next(patches)
                x01, yb = self.task.augment(xb, yb, self.augment, gen)
                x01, yb = x01.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            else:
                x01, yb = self.labelled_batch(idx, gen)
            eb = None if data.e_train is None else data.e_train[idx].to(device, non_blocking=True)
            if config.adversarial:
                adv = attack(self.module, data.spec.normalize, x01, yb, config.adv_epsilon, config.adversarial,
                             steps=config.adv_steps, seed=epoch * 100_000 + step, loss_fn=self.task.loss)
                self.model.train()
                x01, yb = torch.cat([x01, adv]), torch.cat([yb, yb])
            # Gradients are averaged over processes: a share's weight is its size, as in one global batch.
            weight = dist.world * len(idx) / len(whole)
            loss = self.step(fast_layout(data.spec.normalize(x01)), yb, epoch, weight, eb)
            seen += len(whole)  # images per second of the whole job; the loss is this process's estimate
            loss_sum += loss * len(whole)
            if on_step is not None:
                on_step(loss, seen / (time.perf_counter() - t0))
        seconds = time.perf_counter() - t0
        return {"lr": self.optimizer.param_groups[-1]["lr"], "train_loss": loss_sum / max(1, seen),
                "seen": seen, "train_seconds": seconds}

    def labelled_batch(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training images at ``idx`` (held in memory) as the task batches and augments them (``Task.batch``,
        ``Task.augment``: segmentation's patches cut from larger cases, masks and boxes moved along), in [0, 1], on the
        device."""
        data = self.data
        xb, yb = self.task.batch(data.x_train[idx], data.y_train[idx], data.spec, gen)
        x01, yb = self.task.augment(xb, yb, self.augment, gen)
        return x01.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)

    def _patches(self, epoch: int, planned: list[tuple[int, torch.Tensor]]):
        """For cases in the cache: an iterator over this epoch's patch batches, each step's drawn from its own seed
        (seed, epoch, step, process), read by the patch loader; None for tensors in memory."""
        if not isinstance(self.data.x_train, (CaseStore, CachedImages)):
            return None
        if self._loader is None:
            self._loader, self._plan = patch_loader(self.data.x_train, tuple(self.data.spec.size),
                                                    self.config.loader_workers, self.device, self.data.y_train)
        base = (self.config.seed * 1_000_003 + epoch) * 100_003 + 7919 * self.dist.rank
        self._plan.items = [(shard(whole, self.dist).tolist(), base + step) for step, whole in planned]
        return iter(self._loader)

    def step(self, xb: torch.Tensor, yb: torch.Tensor, epoch: int, weight: float = 1.0,
             extras: torch.Tensor | None = None) -> float:
        """One optimiser step on a normalised batch (its loss scaled by ``weight``; ``extras`` the per-sample inputs
        beside the images, if the task has them); returns the loss."""
        with torch.autocast(self.device.split(":")[0], dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = self.loss_fn(self.model(xb) if extras is None else self.model(xb, extras), yb)
        if not torch.isfinite(loss):
            if self.precision != "fp32":
                raise RunError(f"loss became {loss.item()} at epoch {epoch} in {self.precision}; train in fp32 "
                               "(--precision fp32), or lower --lr")
            raise RunError(f"loss became {loss.item()} at epoch {epoch}; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * weight if weight != 1.0 else loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module)
        return loss.item()

    def predict_val(self, model: torch.nn.Module | None = None) -> np.ndarray:
        """The task's outputs on the val split (the EMA model's BatchNorm statistics recomputed first)."""
        model = model or self.eval_model
        if self.ema is not None and model is self.ema.module:
            recalibrate_bn(model, self.bn_batches, self.device)
        if isinstance(self.x_val, CaseStore):  # one cached case at a time; each process its contiguous share
            share = np.array_split(np.arange(len(self.x_val)), self.dist.world)[self.dist.rank]
            mine = case_outputs(model, self.x_val, self.data.spec, self.task.activate, tta=self.config.tta,
                                device=self.device, indices=share.tolist())
            if not self.dist.enabled:
                return mine  # consumed case by case by the task's metrics
            return [o for part in self.dist.gather(list(mine)) for o in part]
        if not self.dist.enabled:
            # in chunks of the training batch, which already fits with gradients: memory does not grow with val
            return predict_outputs(model, self.x_val, self.task.activate, tta=self.config.tta, device=self.device,
                                   extras=self.data.e_val, batch_size=self.config.batch_size)
        if self.data.e_val is not None:
            raise ConfigError("a network with inputs beside the images (covariates) trains in one process")
        # Each process predicts its contiguous share once (no padded duplicates); the shares are joined in order.
        part = (torch.tensor_split(self.x_val, self.dist.world)[self.dist.rank] if isinstance(self.x_val, torch.Tensor)
                else self.x_val.part(np.array_split(np.arange(len(self.x_val)), self.dist.world)[self.dist.rank]))
        mine = (predict_outputs(model, part, self.task.activate, tta=self.config.tta, device=self.device,
                                batch_size=self.config.batch_size)
                if len(part) else None)
        return np.concatenate([p for p in self.dist.gather(mine) if p is not None])

    def validate(self) -> dict[str, float]:
        """The task's validation figures for the current weights."""
        return self.task.val_metrics(val_targets(self.data.y_val), self.predict_val())

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
