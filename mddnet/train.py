"""Training: `fit()` runs the MDD-Net objective on the normal training images of all classes.

One plain loop over `train.steps` Adam steps. Each step takes normal images x_n, their synthetic
anomalous copies x_a and masks M; the frozen teacher gives F_n = T(x_n); the model reads x_a; the
loss terms come from `mddnet.losses`. The run is exactly resumable on CPU: the batch order of every
epoch comes from a generator seeded by (seed, epoch), anomaly synthesis from (seed, epoch, index),
and a resume checkpoint (model, optimizer, `TrainState`) is written atomically every
`train.checkpoint_every` steps, so a killed run continues to the same final weights. The final
checkpoint records which training normals were held out; calibration on them is a step of its
own (`mddnet.calibration`), so scoring choices never retrain a model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from mddnet.config import Config, config_to_dict
from mddnet.data.datasets import NormalDataset, TrainDataset
from mddnet.data.layout import Sample, scan_dataset, split_holdout
from mddnet.device import autocast, grad_scaler, memory_format, resolve_device
from mddnet.distributed import Context, convert_batch_norm, global_sum, init_from_environment
from mddnet.errors import MddnetError
from mddnet.io import load_checkpoint, save_checkpoint, write_csv
from mddnet.kernels import cpu_model
from mddnet.losses import DiscrepancyOptions, LossTerms, compute_losses
from mddnet.metrics import loss_plateau
from mddnet.models import build_model
from mddnet.models.mddnet import MDDNet
from mddnet.models.memory import ClassAwareMemory
from mddnet.seed import seed_everything

__all__ = [
    "LOSS_COLUMNS",
    "StepResult",
    "TrainResult",
    "TrainState",
    "fit",
    "make_optimizer",
    "resume_path",
    "train_step",
]

log = logging.getLogger(__name__)

MEMORY_COLUMNS = ("memory_entropy", "memory_used")
LOSS_COLUMNS = ("step", "epoch", "lr", *LossTerms._fields, *MEMORY_COLUMNS)


@dataclass(frozen=True)
class TrainResult:
    """What a finished `fit()` leaves behind."""

    checkpoint: Path
    losses_csv: Path
    steps: int
    class_names: tuple[str, ...]
    wall_time_s: float
    resumed_from_step: int
    final_losses: dict[str, float] = field(default_factory=dict)  # mean over the last tenth
    plateau: float = float("nan")  # see metrics.loss_plateau

    def summary(self, root: Path) -> dict[str, Any]:
        """The run at a glance, paths relative to `root` (for notebooks and logs)."""
        return {
            "checkpoint": self.checkpoint.resolve().relative_to(root.resolve()).as_posix(),
            "steps": self.steps,
            "wall time (s)": round(self.wall_time_s),
            "final losses": {k: round(v, 4) for k, v in self.final_losses.items()},
            "loss plateau (last tenth's drop, %)": round(100 * self.plateau, 2),
        }


@dataclass
class TrainState:
    """The loop's own progress, saved with the resume checkpoint."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0  # summed over resumed runs
    cpus: list[str] = field(default_factory=list)  # CPU models that ran it, in order (a resumed
    # run can finish on another machine, and CPU makers train different bytes: see `kernels`)


class StepResult(NamedTuple):
    """One optimisation step: the loss terms and, with a memory, how its prototypes were used."""

    terms: LossTerms
    memory: dict[str, float]  # MEMORY_COLUMNS -> value; empty without a memory


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


def _lr(step: int, config: Config) -> float:
    """Step decay by `lr_gamma` from `lr_step_at` of the steps on (RD recipe)."""
    milestone = math.ceil(config.train.lr_step_at * config.train.steps)
    return config.train.lr * (config.train.lr_gamma if step >= milestone else 1.0)


def _check_finite(values: dict[str, float], step: int) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training stopped at step {step}: the {name} loss is {value} "
                f"(lower train.lr, check the input images, or disable that term)"
            )


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """Adam over the trainable parameters (the teacher is frozen), as `train` configures it."""
    return torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.train.lr,
        betas=config.train.betas,
        weight_decay=config.train.weight_decay,
    )


@torch.no_grad()
def _teacher_maps(
    teacher: torch.nn.Module, batch: dict[str, Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """(T(x_n), T(x_a)): T(x_n) from the batch's cached maps when it has them, else computed;
    T(x_a) computed only for the images that got an anomaly (the others are x_n itself), or
    None to let the model compute it."""
    if "teacher_normal" not in batch:
        return teacher(batch["normal"]), None
    normal = batch["teacher_normal"]
    changed = batch["mask"].flatten(1).amax(dim=1) > 0  # (B,) images that differ from x_n
    anomalous = [maps.clone() for maps in normal]
    if changed.any():
        for maps, computed in zip(anomalous, teacher(batch["anomalous"][changed]), strict=True):
            maps[changed] = computed
    return normal, anomalous


def train_step(
    network: torch.nn.Module,
    teacher: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    config: Config,
    scaler: torch.amp.GradScaler | None = None,
    context: Context | None = None,
) -> StepResult:
    """One optimisation step on a batch already on the device: F_n = T(x_n), the model on x_a,
    every loss term, backward and the optimizer step.

    With `batch["teacher_normal"]` (the trainer's cache of the frozen teacher's maps), the teacher
    runs only on the images that got an anomaly. The forward passes run under `train.precision`
    autocast, the losses in fp32; `scaler`
    (from `device.grad_scaler`) scales the loss for fp16 and is a no-op otherwise. Under torchrun
    (`context`) the balanced discrepancy counts pixels over the global batch.
    """
    device = batch["anomalous"].device
    scaler = scaler or grad_scaler(device, config.train.precision)
    processes = context.world_size if context else 1
    discrepancy = DiscrepancyOptions(
        config.train.discrepancy_reduction,
        config.train.discrepancy_target,
        config.train.discrepancy_gradient,
        global_sum,
        processes,
    )
    with autocast(device, config.train.precision):
        teacher_normal, teacher_anomalous = _teacher_maps(teacher, batch)
        output = network(batch["anomalous"], batch["class_id"], teacher_anomalous)
    terms = compute_losses(
        output,
        teacher_normal,
        batch["mask"],
        batch["class_id"],
        config.train.loss_weights,
        config.train.cosine,
        discrepancy,
    )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms.total).backward()
    scaler.step(optimizer)
    scaler.update()
    if output.attention is not None:
        usage = ClassAwareMemory.usage(output.attention.detach(), output.class_ids)
        return StepResult(terms, dict(zip(MEMORY_COLUMNS, usage, strict=True)))
    return StepResult(terms, {})


class _Run(NamedTuple):
    """Everything the loop needs, built by `_prepare`."""

    model: MDDNet
    network: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dataset: TrainDataset
    held_out: list[Sample]
    device: torch.device
    context: Context
    layout: torch.memory_format
    teacher_cache: list[torch.Tensor] | None  # T(x_n) of every training image, per scale


def _prepare(config: Config, roots: Sequence[Path]) -> _Run:
    device = resolve_device(config.train.device)
    context = init_from_environment(device)
    if device.type == "cuda" and context.distributed:
        device = torch.device("cuda", context.local_rank)
    if config.train.batch_size % context.world_size:
        raise MddnetError(
            f"train.batch_size {config.train.batch_size} does not split over "
            f"{context.world_size} processes; use a multiple of {context.world_size}"
        )
    seed_everything(config.seed)
    samples = [s for s in scan_dataset(roots, config.data.classes) if s.split == "train"]
    training, held_out = split_holdout(samples, config.calibration.holdout)
    class_names = tuple(sorted({s.class_name for s in samples}))
    dataset = TrainDataset(
        training, class_names, config.data.image_size, config.data.synthesis, config.seed
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
    cache = (
        _teacher_cache(model, dataset, config, device, layout)
        if config.train.cache_teacher
        else None
    )
    return _Run(
        model, network, optimizer, scaler, dataset, held_out, device, context, layout, cache
    )


@torch.no_grad()
def _teacher_cache(
    model: MDDNet,
    dataset: TrainDataset,
    config: Config,
    device: torch.device,
    layout: torch.memory_format,
) -> list[torch.Tensor]:
    """The frozen teacher's maps of every training image, computed once instead of every step."""
    normals = NormalDataset(dataset.samples, dataset.class_names, dataset.image_size)
    parts: list[list[torch.Tensor]] = []
    for batch in DataLoader(normals, batch_size=config.train.batch_size):
        with autocast(device, config.train.precision):
            parts.append(model.teacher(batch["image"].to(device, memory_format=layout)))
    return [torch.cat(maps) for maps in zip(*parts, strict=True)]


def _payload(run: _Run, config: Config, state: TrainState, complete: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "state_dict": run.model.state_dict(),
        "config": config_to_dict(config),
        "class_names": list(run.dataset.class_names),
        "step": state.step,
        "complete": complete,
        "losses": state.history,
        "teacher_weights": run.model.teacher.weights_id,
        "train_wall_time_s": state.wall_time_s,
        "train_cpus": state.cpus,
    }
    if not complete:
        payload["optimizer"] = run.optimizer.state_dict()
        payload["scaler"] = run.scaler.state_dict()  # {} when disabled
    return payload


def _resume(run: _Run, config: Config, state_file: Path) -> TrainState:
    """The saved state of an unfinished run of this same config, or a fresh state."""
    if not state_file.exists():
        return TrainState()
    saved = load_checkpoint(state_file, map_location=run.device)
    same_classes = saved["class_names"] == list(run.dataset.class_names)
    if saved["config"] != config_to_dict(config) or not same_classes:
        raise MddnetError(
            f"{state_file}: resume state was written for another config or class list; "
            f"delete it to start over, or restore the params it was written with"
        )
    run.model.load_state_dict(saved["state_dict"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scaler.load_state_dict(saved["scaler"])
    log.info("resuming from step %d of %d", saved["step"], config.train.steps)
    return TrainState(
        saved["step"], saved["losses"], saved["train_wall_time_s"], saved.get("train_cpus", [])
    )


def _batches(run: _Run, config: Config, step: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(epoch, batch on the device) from `step` on, endlessly: the epochs' batch orders are
    pure functions of (seed, epoch), so a resumed run sees the same batches."""
    dataset, context = run.dataset, run.context
    epoch, offset = divmod(step, _steps_per_epoch(run, config))
    while True:
        dataset.set_epoch(epoch)
        batches = _epoch_batches(len(dataset), config.train.batch_size, config.seed, epoch)
        size = config.train.batch_size // context.world_size  # this process's contiguous slice
        shard = [b[context.rank * size : (context.rank + 1) * size] for b in batches[offset:]]
        pin = run.device.type == "cuda"
        loader = DataLoader(
            dataset, batch_sampler=shard, num_workers=config.data.num_workers, pin_memory=pin
        )
        for batch in loader:
            on_device = {
                key: batch[key].to(run.device, memory_format=run.layout)
                if key in ("normal", "anomalous")
                else batch[key].to(run.device)
                for key in ("normal", "anomalous", "mask", "class_id")
            }
            if run.teacher_cache is not None:
                index = batch["index"].to(run.device)
                on_device["teacher_normal"] = [maps[index] for maps in run.teacher_cache]
            yield epoch, on_device
        epoch, offset = epoch + 1, 0


def _logged(terms: LossTerms, context: Context) -> dict[str, float]:
    """Loss values of the global batch: each process's mean, averaged over the processes."""
    values = torch.stack([t.detach().float() for t in terms])
    if context.distributed:
        torch.distributed.all_reduce(values)
        values /= context.world_size
    return dict(zip(LossTerms._fields, values.tolist(), strict=True))


def _initialise_memory(run: _Run, config: Config) -> None:
    """k-means prototypes from z of every clean training image, class by class."""
    memory = run.model.memory
    run.model.eval()
    with torch.no_grad():
        per_class: list[list[torch.Tensor]] = [[] for _ in range(memory.num_classes)]
        normals = NormalDataset(
            run.dataset.samples, run.dataset.class_names, run.dataset.image_size
        )
        for batch in DataLoader(normals, batch_size=config.train.batch_size):
            image = batch["image"].to(run.device, memory_format=run.layout)
            z = run.model.bottleneck(run.model.teacher(image))  # (B, D, h, w)
            for point, class_id in zip(
                z.flatten(2).transpose(1, 2), batch["class_id"], strict=True
            ):
                per_class[int(class_id)].append(point.float())  # (h*w, D)
    run.model.train()
    generator = torch.Generator().manual_seed(config.seed)
    memory.initialise([torch.cat(points) for points in per_class], generator)
    log.info("memory initialised by k-means at step %d", _memory_init_step(config))


def fit(
    config: Config,
    checkpoint: str | Path,
    *,
    losses_csv: str | Path | None = None,
    roots: Sequence[str | Path] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train one model on all classes; write `checkpoint` (not yet calibrated) and the losses CSV.

    `losses_csv` defaults to `<checkpoint stem>.losses.csv` beside the checkpoint; `roots` to
    `data.root`. With `resume=True` an in-progress run of the same config continues from its
    last resume checkpoint; one written for another config is refused, not reused. Started by
    `torchrun`, the processes share every global batch and only the main one writes files.
    `progress=False` replaces the progress bar by a log line at every tenth of the steps (for
    notebooks: a short record above the summary, not one line per epoch).
    """
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    losses_csv = Path(losses_csv) if losses_csv else checkpoint.with_suffix(".losses.csv")
    roots = [Path(r) for r in roots] if roots is not None else list(config.data.root_paths())
    run = _prepare(config, roots)
    state_file = resume_path(checkpoint)
    state = _resume(run, config, state_file) if resume else TrainState()
    resumed_from, earlier = state.step, state.wall_time_s
    here = cpu_model()
    if here not in state.cpus[-1:]:
        state.cpus.append(here)
    total = config.train.steps
    _log_start(run, config)
    run.network.train()
    bar = tqdm(
        total=total,
        initial=state.step,
        desc=config.run,
        unit="step",
        disable=not (progress and run.context.is_main),
    )
    batches = _batches(run, config, state.step)
    while state.step < total:
        _step(run, config, state, batches, log_tenths=not progress)
        bar.update(1)
        bar.set_postfix(loss=f"{state.history[-1]['total']:.4f}")
        if state.step % config.train.checkpoint_every == 0 and state.step < total:
            state.wall_time_s = earlier + time.perf_counter() - started
            _save_progress(run, config, state, state_file, losses_csv)
    bar.close()
    state.wall_time_s = earlier + time.perf_counter() - started
    if run.context.is_main:
        _finish(run, config, state, checkpoint, losses_csv)
    tenth = state.history[-max(1, len(state.history) // 10) :]
    final = {key: float(np.mean([row[key] for row in tenth])) for key in LossTerms._fields}
    plateau = loss_plateau([row["total"] for row in state.history])
    names = run.dataset.class_names
    return TrainResult(
        checkpoint, losses_csv, state.step, names, state.wall_time_s, resumed_from, final,
        plateau,
    )  # fmt: skip


def _log_start(run: _Run, config: Config) -> None:
    log.info(
        "training %s on %d images of %d classes (%s) for %d steps on %s%s",
        config.run,
        len(run.dataset),
        len(run.dataset.class_names),
        ", ".join(run.dataset.class_names),
        config.train.steps,
        run.device,
        f" x {run.context.world_size} processes" if run.context.distributed else "",
    )


def _step(
    run: _Run,
    config: Config,
    state: TrainState,
    batches: Iterator[tuple[int, dict[str, Any]]],
    log_tenths: bool,
) -> None:
    """One step of the loop: memory initialisation when due, lr, train_step, history."""
    memory = config.model.memory
    if memory.enabled and memory.init == "kmeans" and state.step == _memory_init_step(config):
        _initialise_memory(run, config)
    epoch, batch = next(batches)
    lr = _lr(state.step, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    result = train_step(
        run.network, run.model.teacher, run.optimizer, batch, config, run.scaler, run.context
    )
    logged = _logged(result.terms, run.context)
    _check_finite(logged, state.step)  # stops before a non-finite step is saved anywhere
    state.step += 1
    state.history.append({"step": state.step, "epoch": epoch, "lr": lr} | logged | result.memory)
    total = config.train.steps
    if log_tenths and (state.step == total or state.step % max(1, total // 10) == 0):
        log.info("step %d/%d epoch %d: %s", state.step, total, epoch, _summary(logged))


def _memory_init_step(config: Config) -> int:
    """The step at which k-means initialises the prototypes: `init_at` of the budget."""
    return math.floor(config.model.memory.init_at * config.train.steps)


def _steps_per_epoch(run: _Run, config: Config) -> int:
    return len(_epoch_batches(len(run.dataset), config.train.batch_size, config.seed, 0))


def _save_progress(
    run: _Run, config: Config, state: TrainState, state_file: Path, losses_csv: Path
) -> None:
    if run.context.is_main:
        save_checkpoint(state_file, _payload(run, config, state, complete=False))
        write_csv(losses_csv, state.history, LOSS_COLUMNS)


def _summary(logged: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in logged.items() if v)


def _finish(
    run: _Run, config: Config, state: TrainState, checkpoint: Path, losses_csv: Path
) -> None:
    """Write the final checkpoint (with the names of the held-out normals that calibration
    will use) and the losses."""
    plateau = loss_plateau([row["total"] for row in state.history])
    log.info("the last tenth of the steps lowered the mean total loss by %.1f%%", 100 * plateau)
    payload = _payload(run, config, state, complete=True) | {
        "device": str(run.device),
        "processes": run.context.world_size,
        "held_out": [f"{s.class_name}/{s.image_path.name}" for s in run.held_out],
        "loss_plateau": plateau,
    }
    save_checkpoint(checkpoint, payload)
    write_csv(losses_csv, state.history, LOSS_COLUMNS)
    resume_path(checkpoint).unlink(missing_ok=True)
    log.info("wrote %s after %d steps in %.1f s", checkpoint, state.step, state.wall_time_s)
