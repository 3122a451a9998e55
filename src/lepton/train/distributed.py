"""Data-parallel training on PyTorch's own runtime: ``torchrun`` starts the processes, ``torch.distributed``
(gloo on CPU, NCCL on CUDA) joins them through the standard ``env://`` variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so SLURM, Ray Train and Kubeflow launch the same entry point.

Every process holds the whole (small, preprocessed) data set and draws the same epoch order; each takes its
contiguous share of every global batch, DistributedDataParallel averages the gradients, BatchNorm statistics are
synchronised across processes (``SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm` on gloo), validation
predictions are gathered once in order, and only rank 0 writes the run directory.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lepton.errors import ConfigError

log = logging.getLogger("lepton.train")

#: ``lr_scaling`` choices: the learning rate for an effective batch of ``batch_size x world_size``.
LR_SCALING = {"none": lambda w: 1.0, "linear": lambda w: float(w), "sqrt": lambda w: math.sqrt(w)}


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size, local rank (its device on a node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    @property
    def restarts(self) -> int:
        """How often torchrun's elastic agent restarted the workers so far (0 on the first attempt)."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (decisions that depend on a clock must be taken once)."""
        if not self.enabled:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


SINGLE = Dist()


def from_env() -> Dist:
    """The job described by the ``env://`` variables (a single process when ``WORLD_SIZE`` is unset or 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({exc})") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return Dist(rank, world, local)


def init(dist: Dist, device: str) -> str:
    """Join the process group (gloo on CPU, NCCL on CUDA) and return this process's device."""
    if not dist.enabled:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={dist.world} but {' and '.join(missing)} unset; start with torchrun "
                              "(or `lepton train --nproc N`)")
        torch.distributed.init_process_group(backend, store=_store(dist), rank=dist.rank, world_size=dist.world)
    if not dist.main:  # one voice in the terminal and the logs
        logging.getLogger("lepton").setLevel(logging.WARNING)
    return device


def _store(dist: Dist) -> torch.distributed.Store:
    """The ``env://`` key-value store, its keys under this attempt's prefix: after an elastic restart torchrun's
    agent may hand the new workers the store of the failed attempt, where the dead workers' addresses still stand
    (measured: one restart in three failed to connect without the prefix)."""
    from datetime import timedelta

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = timedelta(minutes=30)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent hosts it
        store = torch.distributed.TCPStore(host, port, dist.world, is_master=False, timeout=timeout)
    else:  # another launcher (SLURM, Ray, a Kubernetes job): rank 0 hosts it
        store = torch.distributed.TCPStore(host, port, dist.world, is_master=dist.rank == 0, timeout=timeout,
                                           multi_tenant=True)
    return torch.distributed.PrefixStore(f"lepton/attempt_{dist.restarts}", store)


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(batch: torch.Tensor, dist: Dist) -> torch.Tensor:
    """This rank's contiguous share of a global batch (shares differ by at most one sample)."""
    if not dist.enabled:
        return batch
    return torch.tensor_split(batch, dist.world)[dist.rank]


class _SumAcrossProcesses(torch.autograd.Function):
    """The sum of a tensor over all processes; its gradient is the sum of every process's gradient (each one's
    loss depends on the shared total)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch across all processes, for gloo (CPU)
    where ``torch.nn.SyncBatchNorm`` does not run. Sums are all-reduced in a differentiable way, so
    autograd carries each process's share of the gradient through the shared mean and variance."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_initialized()):
            return super().forward(x)
        dims, channels = [0, *range(2, x.dim())], x.shape[1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        # One all-reduce of (sum, sum of squares, count) about a shift every process holds alike (the running mean,
        # which follows the global statistics): near the mean, E[d^2] - E[d]^2 loses no precision to cancellation.
        shift = (self.running_mean.detach().float() if self.track_running_stats
                 else xf.new_zeros(channels)).view(shape)
        d = xf - shift
        local = torch.cat([d.sum(dims), (d * d).sum(dims), xf.new_full((1,), x.numel() / channels)])
        total = _SumAcrossProcesses.apply(local)
        n = float(total[-1].item())
        mean_d = total[:channels] / n
        var = (total[channels:2 * channels] / n - mean_d * mean_d).clamp_min(0)
        mean = shift.view(-1) + mean_d
        centred = xf - mean.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / max(n - 1, 1))
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: str) -> nn.Module:
    """BatchNorm layers that see the global batch: ``SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm` else.
    Parameter and buffer names are unchanged, so checkpoints load into the plain network."""
    if device.startswith("cuda"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, CpuSyncBatchNorm):
            new = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            new.to(next(iter(child.buffers()), torch.empty(0)).device)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


def wrap(model: nn.Module, dist: Dist, device: str, sync_bn: bool = True) -> nn.Module:
    """The network under DistributedDataParallel (unchanged in a single process). With ``sync_bn`` BatchNorm
    sees the global batch (as one process would); without, each process normalises by its own share and rank 0's
    running statistics are broadcast every step (DDP's default)."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    if sync_bn:  # the statistics are the same in every process already: no buffer broadcast at each step
        import inspect

        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        return DistributedDataParallel(sync_batchnorm(model, device), device_ids=ids,
                                       **({"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}))
    return DistributedDataParallel(model, device_ids=ids)


def torchrun_command(argv: list[str], nproc: int, max_restarts: int = 0) -> list[str]:
    """``python -m torch.distributed.run --standalone ... -m lepton ARGV``: one node, ``nproc`` workers."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {nproc})")
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts must be 0 or more (got {max_restarts})")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts), "-m", "lepton", *argv]


def launch(argv: list[str], nproc: int, max_restarts: int = 0) -> int:
    """Run ``lepton ARGV`` under torchrun with ``nproc`` local processes; returns torchrun's exit status.

    Each worker gets an equal share of the cores (``OMP_NUM_THREADS``) unless that is set already."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log.info("torchrun: %d processes, up to %d restarts", nproc, max_restarts)
    return subprocess.call(torchrun_command(argv, nproc, max_restarts), env=env)
