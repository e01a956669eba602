"""Global batch norm and sums on two CPU processes (gloo) equal one process on the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mddnet.distributed import convert_batch_norm, global_sum

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    nn.init.uniform_(bn.weight)
    x = x.clone().requires_grad_(True)
    y = bn(x)  # one training step: the running statistics move once
    (y * torch.arange(x.numel()).view_as(x)).sum().backward()
    return y.detach(), x.grad, {k: v.clone() for k, v in bn.state_dict().items()}


def _worker(rank: int, port: int, x: torch.Tensor, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.BatchNorm2d(3))
        nn.init.uniform_(model[0].weight)
        model = convert_batch_norm(model, torch.device("cpu"))
        part = x[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
        weights = torch.arange(x.numel()).view_as(x)[2 * rank : 2 * rank + 2]
        (model(part) * weights).sum().backward()
        summed = global_sum(torch.tensor([float(rank + 1)]))
        state = {k: v.numpy().copy() for k, v in model[0].state_dict().items()}
        queue.put((rank, part.grad.numpy().copy(), state, float(summed)))
    finally:
        dist.destroy_process_group()


def test_two_processes_normalise_with_the_statistics_of_the_whole_batch() -> None:
    x = torch.randn(4, 3, 2, 5, generator=torch.Generator().manual_seed(1)) * 3 + 1
    _, grad, state = _reference(x)
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(_worker, args=(_free_port(), x, queue), nprocs=2, start_method="spawn")
    results = sorted((queue.get(timeout=60) for _ in range(2)), key=lambda r: r[0])
    assert [r[3] for r in results] == [3.0, 3.0]  # 1 + 2 on both processes
    got = torch.cat([torch.from_numpy(r[1]) for r in results])
    torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-6)
    for _, _, running, _ in results:  # running statistics follow the whole batch, on both
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(torch.from_numpy(running[key]), state[key])
