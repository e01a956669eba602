"""Data-parallel training started with `torchrun`: process group, global batch norm, global sums.

`mddnet train` run under `torchrun --nproc_per_node N` trains one model on N processes (GPUs, or
CPU processes with the gloo backend). Each process takes 1/N of every global batch; gradients are
averaged by PyTorch's DistributedDataParallel. Two things would otherwise make N processes differ
from one process with the same global batch, and are made global here:

- batch norm statistics: torch's `SyncBatchNorm` on GPUs; on CPUs, where it is not available,
  `_GlobalBatchNorm2d` all-reduces the per-channel sums (differentiably) instead;
- normalisers that count pixels over the batch (the balanced discrepancy loss): `global_sum`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "Context",
    "convert_batch_norm",
    "global_sum",
    "init_from_environment",
    "world_size",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """This process's place in the run (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_environment(device: torch.device) -> Context:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else a single process.

    The backend is NCCL on GPUs and gloo on CPUs; on GPUs each process takes the GPU of its
    LOCAL_RANK.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return Context()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend)
    context = Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    log.info("process %d of %d (%s)", context.rank, context.world_size, dist.get_backend())
    return context


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """y = sum over processes of x. Each process's y feeds its own loss, so the gradient of the
    global objective with respect to x is the sum over processes of dL/dy: all-reduced again."""

    @staticmethod
    def forward(ctx, value: Tensor) -> Tensor:  # noqa: ANN001 (autograd's signature)
        total = value.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


def global_sum(value: Tensor) -> Tensor:
    """Sum of `value` over all processes, differentiable (just `value` in a single process)."""
    if world_size() == 1:
        return value
    return _AllReduceSum.apply(value)


class _GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over the global batch of all processes.

    The per-channel count, sum and sum of squares are all-reduced with a differentiable
    all-reduce, so the gradients are those of batch norm over the whole global batch.
    """

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, H, W)
        if not self.training or world_size() == 1:
            return super().forward(x)
        count = global_sum(x.new_tensor(float(x.numel() // x.shape[1])))
        total = global_sum(x.sum(dim=(0, 2, 3)))  # (C,)
        squares = global_sum((x * x).sum(dim=(0, 2, 3)))  # (C,)
        mean = total / count
        var = squares / count - mean * mean  # biased, as batch norm normalises with it
        with torch.no_grad():
            unbiased = var * count / (count - 1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(unbiased, self.momentum)
            self.num_batches_tracked += 1
        shape = (1, -1, 1, 1)
        normalised = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return normalised * self.weight.view(shape) + self.bias.view(shape)


def convert_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every trainable BatchNorm2d compute global statistics (frozen ones are left alone).

    The frozen teacher runs in eval mode with its ImageNet statistics, so it is not converted.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        trainable = any(p.requires_grad for p in child.parameters())
        if type(child) is nn.BatchNorm2d and trainable:
            replacement = _GlobalBatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement.to(device))
        else:
            convert_batch_norm(child, device)
    return model
