"""Training: `fit()` runs the MDD-Net objective on the normal training images of all classes.

One plain loop. Each step takes normal images x_n, their synthetic anomalous copies x_a and masks
M; the frozen teacher gives F_n = T(x_n); the model reads x_a; the loss terms come from
`mddnet.losses`. The run is exactly resumable on CPU: the batch order of every epoch comes from a
generator seeded by (seed, epoch), anomaly synthesis from (seed, epoch, index), and a resume
checkpoint (model, optimizer, schedule, loss history) is written atomically every
`train.checkpoint_every` steps, so a killed run continues to the same final weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from mddnet.config import Config, config_to_dict
from mddnet.data.datasets import TrainDataset
from mddnet.data.layout import Sample, scan_dataset
from mddnet.device import autocast, grad_scaler, memory_format, resolve_device
from mddnet.distributed import Context, convert_batch_norm, init_from_environment
from mddnet.io import load_checkpoint, save_checkpoint, write_csv
from mddnet.losses import LossTerms, compute_losses
from mddnet.models import build_model
from mddnet.models.mddnet import MDDNet
from mddnet.seed import seed_everything

__all__ = ["LOSS_COLUMNS", "TrainResult", "fit", "make_optimizer", "resume_path", "train_step"]

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("step", "epoch", "lr", *LossTerms._fields)


@dataclass(frozen=True)
class TrainResult:
    """What a finished `fit()` leaves behind."""

    checkpoint: Path
    losses_csv: Path
    steps: int
    class_names: tuple[str, ...]
    wall_time_s: float
    resumed_from_step: int


def resume_path(checkpoint: Path) -> Path:
    """Where the in-progress state of a run that will end in `checkpoint` is kept.

    It sits beside the final file under another name, so DVC (which deletes a stage's outputs
    before rerunning it) never removes it, and it is deleted once the run has finished.
    """
    return checkpoint.with_name(f".{checkpoint.stem}.resume{checkpoint.suffix}")


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled index batches of one epoch, a pure function of (seed, epoch).

    The last incomplete batch is dropped when there is more than one batch, so batch norm never
    sees a batch of one image.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def _lr_factor(step: int, steps_per_epoch: int, config: Config) -> float:
    """Step decay by `lr_gamma` once `lr_step_at` of the epochs are done (RD recipe)."""
    milestone = math.ceil(config.train.lr_step_at * config.train.epochs) * steps_per_epoch
    return config.train.lr_gamma if step >= milestone else 1.0


def _train_samples(config: Config, root: Path) -> tuple[list[Sample], tuple[str, ...]]:
    samples = [s for s in scan_dataset(root, config.data.classes) if s.split == "train"]
    class_names = tuple(sorted({s.class_name for s in samples}))
    return samples, class_names


def _check_finite(values: dict[str, float], step: int) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training stopped at step {step}: the {name} loss is {value} "
                f"(lower train.lr, check the input images, or disable that term)"
            )


def _state(
    model: MDDNet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: Config,
    class_names: Sequence[str],
    step: int,
    history: list[dict[str, Any]],
    complete: bool,
    wall_time_s: float,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "state_dict": model.state_dict(),
        "config": config_to_dict(config),
        "class_names": list(class_names),
        "step": step,
        "complete": complete,
        "losses": history,
        "teacher_weights": model.teacher.weights_id,
        "train_wall_time_s": wall_time_s,  # summed over resumed runs
    }
    if not complete:
        payload["optimizer"] = optimizer.state_dict()
        payload["scaler"] = scaler.state_dict()  # {} when disabled
    return payload


def _batches(
    dataset: TrainDataset, batches: list[list[int]], num_workers: int, pin: bool
) -> Iterator[dict[str, Any]]:
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin)
    yield from loader


def _shard(batches: list[list[int]], context: Context) -> list[list[int]]:
    """This process's equal, contiguous slice of every global batch."""
    sliced = []
    for batch in batches:
        size = len(batch) // context.world_size
        sliced.append(batch[context.rank * size : (context.rank + 1) * size])
    return sliced


def _logged(terms: LossTerms, context: Context) -> dict[str, float]:
    """Loss values of the global batch: each process's mean, averaged over the processes."""
    values = torch.stack([t.detach().float() for t in terms])
    if context.distributed:
        torch.distributed.all_reduce(values)
        values /= context.world_size
    return dict(zip(LossTerms._fields, values.tolist(), strict=True))


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """Adam over the trainable parameters (the teacher is frozen), as `train` configures it."""
    return torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.train.lr,
        betas=config.train.betas,
        weight_decay=config.train.weight_decay,
    )


def train_step(
    network: torch.nn.Module,
    teacher: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    config: Config,
    scaler: torch.amp.GradScaler | None = None,
) -> LossTerms:
    """One optimisation step on a batch already on the device: F_n = T(x_n), the model on x_a,
    every loss term, backward and the optimizer step. Returns the (unreduced) terms.

    The forward passes run under `train.precision` autocast, the losses in fp32; `scaler`
    (from `device.grad_scaler`) scales the loss for fp16 and is a no-op otherwise.
    """
    device = batch["anomalous"].device
    scaler = scaler or grad_scaler(device, config.train.precision)
    with autocast(device, config.train.precision):
        with torch.no_grad():
            teacher_normal = teacher(batch["normal"])
        output = network(batch["anomalous"], batch["class_id"])
    terms = compute_losses(
        output,
        teacher_normal,
        batch["mask"],
        batch["class_id"],
        config.train.loss_weights,
        config.train.cosine,
        config.train.discrepancy_reduction,
    )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms.total).backward()
    scaler.step(optimizer)
    scaler.update()
    return terms


def fit(
    config: Config,
    checkpoint: str | Path,
    *,
    losses_csv: str | Path | None = None,
    root: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train one model on all classes; write `checkpoint` and the per-step losses CSV.

    `losses_csv` defaults to `<checkpoint stem>.losses.csv` beside the checkpoint; `root` to
    `data.root`. With `resume=True` an in-progress run of the same config continues from its
    last resume checkpoint; a resume file written for another config is refused, not reused.
    Started by `torchrun`, the processes share every global batch (`mddnet.distributed`) and
    only the main one writes files.
    """
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    losses_csv = Path(losses_csv) if losses_csv else checkpoint.with_suffix(".losses.csv")
    root = Path(root) if root is not None else config.data.root_path()
    device = resolve_device(config.train.device)
    context = init_from_environment(device)
    if device.type == "cuda" and context.distributed:
        device = torch.device("cuda", context.local_rank)
    if config.train.batch_size % context.world_size:
        raise ValueError(
            f"train.batch_size {config.train.batch_size} does not split over "
            f"{context.world_size} processes; use a multiple of {context.world_size}"
        )

    seed_everything(config.seed)
    samples, class_names = _train_samples(config, root)
    dataset = TrainDataset(
        samples, class_names, config.data.image_size, config.data.synthesis, config.seed
    )
    layout = memory_format(config.train.channels_last)
    model = build_model(config.model, len(class_names)).to(device, memory_format=layout)
    network: torch.nn.Module = model
    if context.distributed:
        model = convert_batch_norm(model, device)
        network = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # an ablation may leave a module without gradient
        )
    optimizer = make_optimizer(model, config)
    scaler = grad_scaler(device, config.train.precision)
    steps_per_epoch = len(_epoch_batches(len(dataset), config.train.batch_size, config.seed, 0))
    total_steps = steps_per_epoch * config.train.epochs

    step, history, earlier = 0, [], 0.0
    state_file = resume_path(checkpoint)
    if resume and state_file.exists():
        state = load_checkpoint(state_file, map_location=device)
        if state["config"] != config_to_dict(config) or state["class_names"] != list(class_names):
            raise ValueError(
                f"{state_file}: resume state was written for another config or class list; "
                f"delete it to start over, or restore the params it was written with"
            )
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, history, earlier = state["step"], state["losses"], state["train_wall_time_s"]
        log.info("resuming %s from step %d of %d", checkpoint, step, total_steps)
    resumed_from = step

    log.info(
        "training %s on %d images of %d classes (%s) for %d steps on %s%s",
        config.variant or "params",
        len(dataset),
        len(class_names),
        ", ".join(class_names),
        total_steps,
        device,
        f" x {context.world_size} processes" if context.distributed else "",
    )
    network.train()
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"train {config.variant or ''}".strip(),
        disable=not (progress and context.is_main),
        unit="step",
    )
    for epoch in range(step // steps_per_epoch, config.train.epochs):
        dataset.set_epoch(epoch)
        batches = _epoch_batches(len(dataset), config.train.batch_size, config.seed, epoch)
        batches = _shard(batches[step - epoch * steps_per_epoch :], context)
        for batch in _batches(dataset, batches, config.data.num_workers, device.type == "cuda"):
            lr = config.train.lr * _lr_factor(step, steps_per_epoch, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            on_device = {
                "normal": batch["normal"].to(device, memory_format=layout),
                "anomalous": batch["anomalous"].to(device, memory_format=layout),
                "mask": batch["mask"].to(device),
                "class_id": batch["class_id"].to(device),
            }
            terms = train_step(network, model.teacher, optimizer, on_device, config, scaler)
            logged = _logged(terms, context)
            _check_finite(logged, step)  # stops before a non-finite step is saved anywhere
            step += 1
            history.append({"step": step, "epoch": epoch, "lr": lr} | logged)
            bar.update(1)
            bar.set_postfix(loss=f"{logged['total']:.4f}")
            if (
                step % config.train.checkpoint_every == 0
                and step < total_steps
                and context.is_main
            ):
                elapsed = earlier + time.perf_counter() - started
                save_checkpoint(
                    state_file,
                    _state(
                        model,
                        optimizer,
                        scaler,
                        config,
                        class_names,
                        step,
                        history,
                        False,
                        elapsed,
                    ),
                )
                write_csv(losses_csv, history, LOSS_COLUMNS)
    bar.close()

    elapsed = earlier + time.perf_counter() - started
    if context.is_main:
        final = _state(model, optimizer, scaler, config, class_names, step, history, True, elapsed)
        save_checkpoint(
            checkpoint, final | {"device": str(device), "processes": context.world_size}
        )
        write_csv(losses_csv, history, LOSS_COLUMNS)
        state_file.unlink(missing_ok=True)
        log.info("wrote %s after %d steps in %.1f s", checkpoint, step, elapsed)
    return TrainResult(checkpoint, losses_csv, step, class_names, elapsed, resumed_from)
