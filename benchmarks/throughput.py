"""Throughput and peak memory of MDD-Net and its ablations, against the frozen teacher alone.

Measures, per variant of `params.yaml` (e.g. rd_baseline, drd_net, mddnet):

- inference: model forward + both anomaly maps (upsampling, fusion, blur) + image scores, in eval
  mode under `torch.no_grad()`, the work `mddnet.evaluate.predict` does per batch;
- training: one full step as in `mddnet.train.fit` (teacher on x_n, model on x_a, all loss terms,
  backward, Adam step); data loading and anomaly synthesis are not included;
- the teacher's forward alone, timed in turn with each inference batch, which is the lower bound
  of any reverse-distillation model's inference time: the ratio inference / teacher shows what
  the bottleneck, decoders, memory and scoring add.

Inputs are random tensors of the right shapes (images ~ N(0, 1), i.e. ImageNet-normalised scale;
masks with ~10% anomalous pixels; random class ids): the work done does not depend on content.
The teacher is built without loading weights (random init) for the same reason, so no weight file
is needed. `train.channels_last` is respected as in training and evaluation.

Every (variant, mode) runs in a fresh spawned process, so one measurement's allocator caches cannot
leak into the next. Peak memory is the allocator's own account of ONE extra step run after the
timed ones (so profiling does not slow the timed steps), counted from zero at the step's start:

- CPU: torch's profiler records every CPU tensor allocation and free of the step with its size;
  the peak of their running sum is the most memory the step held beyond what existed before it
  (activations, gradients, temporary buffers; Adam's state exists already after the warmup). It
  cannot be negative and does not depend on what ran before in the process, unlike the resident
  set, which also moves with the C allocator's caching and the kernel's lazy RSS accounting.
- CUDA: torch.cuda.max_memory_allocated over the step minus memory_allocated before it.

Times are per batch; the report gives the median over the timed batches and their spread (min,
max, quartiles), and images/s = batch size / time. The load average before and after the run is
recorded, since other processes sharing the cores slow every number down.

Usage (one command line):
    python benchmarks/throughput.py --params params.yaml --variants rd_baseline drd_net mddnet
        --image-size 256 --batch-size 8 --steps 10 --warmup 2 --device auto
        --out results/benchmarks/cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mddnet.checkpoint import Scorer
from mddnet.config import Config, load_config, load_params
from mddnet.device import autocast, memory_format, resolve_device
from mddnet.io import write_json, write_text
from mddnet.kernels import cpu_model
from mddnet.models import build_model
from mddnet.models.mddnet import MDDNet
from mddnet.train import make_optimizer, train_step

log = logging.getLogger(__name__)

MODES = ("inference", "train")
MASK_FRACTION = 0.1  # anomalous pixels in the random training masks
MIB = 2**20


@dataclass(frozen=True)
class Settings:
    """What is measured, shared by every variant."""

    image_size: int
    batch_size: int
    steps: int  # timed batches
    warmup: int  # untimed batches before them
    device: str  # auto | cpu | cuda
    num_classes: int  # classes the memory holds prototypes for
    seed: int = 0


@dataclass(frozen=True)
class Timing:
    """Spread of the seconds per batch over the timed batches."""

    median: float
    q1: float
    q3: float
    min: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        """Quartiles by numpy's linear interpolation; robust to a few disturbed batches."""
        q1, median, q3 = np.percentile(seconds, [25, 50, 75])
        return cls(float(median), float(q1), float(q3), float(min(seconds)), float(max(seconds)))


@dataclass(frozen=True)
class MemoryPeak:
    """The most memory one step held beyond what existed before it (see the module docstring)."""

    method: str
    extra_bytes: int  # >= 0 by construction: the running sum starts at 0 at the step's start


@dataclass(frozen=True)
class Measurement:
    """One variant in one mode; `teacher_seconds` and the ratio only for inference."""

    variant: str
    mode: str
    seconds: Timing  # per batch
    images_per_s: float  # at the median time
    images_per_s_min: float  # at the slowest batch
    images_per_s_max: float  # at the fastest batch
    memory: MemoryPeak
    teacher_seconds: Timing | None
    inference_to_teacher: float | None  # median inference time / median teacher time
    torch_threads: int


def _cpu_peak_bytes(call: Callable[[], object]) -> int:
    """Peak of the live CPU tensor bytes that `call` allocated, from torch's profiler events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    # Each "[memory]" event is one allocation (+bytes) or free (-bytes) by torch's allocator.
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def step_peak_memory(call: Callable[[], object], device: torch.device) -> MemoryPeak:
    """Run `call` once and return the most memory it held beyond what existed before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - baseline
        return MemoryPeak("torch.cuda.max_memory_allocated over one step", extra)
    return MemoryPeak(
        "torch profiler: CPU allocations and frees of one step", _cpu_peak_bytes(call)
    )


def time_calls(
    calls: Sequence[Callable[[], object]], warmup: int, steps: int, device: torch.device
) -> list[list[float]]:
    """Seconds of each call in each of `steps` rounds, after `warmup` untimed rounds.

    The calls run in turn within a round, so a load change from other processes hits all of them
    alike and their ratio stays fair. CUDA is synchronised around each call.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for call in calls:
            call()
    seconds: list[list[float]] = [[] for _ in calls]
    for _ in range(steps):
        for call, record in zip(calls, seconds, strict=True):
            sync()
            started = time.perf_counter()
            call()
            sync()
            record.append(time.perf_counter() - started)
    return seconds


def _inference_call(
    model: MDDNet, config: Config, image: torch.Tensor, class_ids: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """What `mddnet.evaluate.predict` computes for one batch (without copying maps to numpy)."""
    given = class_ids if config.evaluate.class_source == "label" else None
    # Both maps fused and max-pooled, without calibration: per-class normalisation adds one
    # subtraction and one division per pixel, so the measured work is the same.
    weight = 0.0 if model.identity_decoder is None else 1.0
    scorer = Scorer((1.0, weight), None, "max", config)

    @torch.no_grad()
    def infer() -> torch.Tensor:
        return scorer(model, image, given).scores  # (B,)

    return infer


def _train_call(
    model: MDDNet, config: Config, images: torch.Tensor, class_ids: torch.Tensor, seed: int
) -> Callable[[], None]:
    """One step of `mddnet.train.fit` on fixed random x_n, x_a and mask M."""
    generator = torch.Generator().manual_seed(seed + 1)
    anomalous = torch.randn(images.shape, generator=generator).to(
        images.device, memory_format=memory_format(config.train.channels_last)
    )  # (B, 3, H, W)
    mask = torch.rand(images.shape[0], 1, *images.shape[-2:], generator=generator) < MASK_FRACTION
    mask = mask.float().to(images.device)  # (B, 1, H, W)
    optimizer = make_optimizer(model, config)
    batch = {"normal": images, "anomalous": anomalous, "mask": mask, "class_id": class_ids}

    def step() -> None:
        train_step(model, model.teacher, optimizer, batch, config)

    return step


def measure(
    params: str | Path,
    variant: str,
    mode: str,
    settings: Settings,
    overrides: dict[str, Any] | None = None,
) -> Measurement:
    """Time `mode` (inference or train) of one variant in this process; see `measure_isolated`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    config = load_config(params, variant, overrides)
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    layout = memory_format(config.train.channels_last)
    # Weights do not change the work done; skipping them needs no weight file.
    model = build_model(config.model, settings.num_classes, pretrained=False)
    model = model.to(device, memory_format=layout)
    stride = 2 * model.teacher.reductions[-1]  # the bottleneck halves the deepest teacher scale
    if settings.image_size % stride:
        raise ValueError(
            f"--image-size {settings.image_size} is not a multiple of {stride}, the bottleneck "
            f"stride of {config.model.backbone} at model.stages {list(config.model.stages)}; "
            f"pick a multiple of {stride}"
        )
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.batch_size, 3, settings.image_size, settings.image_size)
    images = torch.randn(shape, generator=generator).to(device, memory_format=layout)
    class_ids = torch.randint(settings.num_classes, (settings.batch_size,), generator=generator)
    class_ids = class_ids.to(device)

    if mode == "inference":
        model.eval()
        infer = _inference_call(model, config, images, class_ids)

        @torch.no_grad()
        def teacher_call() -> None:
            with autocast(device, config.train.precision):
                model.teacher(images)

        model_s, teacher_s = time_calls(
            [infer, teacher_call], settings.warmup, settings.steps, device
        )
        teacher = Timing.of(teacher_s)
        memory = step_peak_memory(infer, device)
    else:
        model.train()
        step = _train_call(model, config, images, class_ids, settings.seed)
        (model_s,) = time_calls([step], settings.warmup, settings.steps, device)
        teacher = None
        memory = step_peak_memory(step, device)
    seconds = Timing.of(model_s)
    batch = settings.batch_size
    return Measurement(
        variant=variant,
        mode=mode,
        seconds=seconds,
        images_per_s=batch / seconds.median,
        images_per_s_min=batch / seconds.max,
        images_per_s_max=batch / seconds.min,
        memory=memory,
        teacher_seconds=teacher,
        inference_to_teacher=None if teacher is None else seconds.median / teacher.median,
        torch_threads=torch.get_num_threads(),
    )


def measure_isolated(
    params: str | Path,
    variant: str,
    mode: str,
    settings: Settings,
    overrides: dict[str, Any] | None = None,
) -> Measurement:
    """`measure` in a fresh spawned process, so earlier measurements leave no memory behind."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, str(params), variant, mode, settings, overrides).result()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: processor, cores, threads, accelerator, versions."""
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else cpu_model(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run_benchmark(
    params: str | Path,
    variants: Sequence[str],
    settings: Settings,
    *,
    isolated: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure every variant in both modes; the JSON-ready report with machine and load.

    `isolated=False` measures in this process (fast, for tests); the memory figure counts only
    the step's own allocations either way.
    """
    run = measure_isolated if isolated else measure
    known = load_params(params, overrides).variants
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise ValueError(f"{params}: unknown variant {unknown[0]!r}; pick from {', '.join(known)}")
    load_before = os.getloadavg()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for variant in variants:
        results[variant] = {"label": known[variant].label}
        for mode in MODES:
            log.info("measuring %s %s", variant, mode)
            measured = run(params, variant, mode, settings, overrides)
            results[variant][mode] = dataclasses.asdict(measured)
    return {
        "machine": machine_info(resolve_device(settings.device)),
        "settings": dataclasses.asdict(settings) | {"params": str(params)},
        "inputs": "random tensors of the right shapes; random-init teacher (content-independent)",
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "wall_time_s": time.perf_counter() - started,
        "variants": results,
    }


def _rate(mode: dict[str, Any]) -> str:
    return (
        f"{mode['images_per_s']:.1f} ({mode['images_per_s_min']:.1f}-"
        f"{mode['images_per_s_max']:.1f})"
    )


def _mib(mode: dict[str, Any]) -> str:
    return f"{mode['memory']['extra_bytes'] / MIB:.0f}"


def markdown(report: dict[str, Any]) -> str:
    """A caption that says what was measured and where, and one row per variant."""
    rows = [
        {
            "Variant": name,
            "Inference img/s": _rate(result["inference"]),
            "Train img/s": _rate(result["train"]),
            "Inference / teacher time": f"{result['inference']['inference_to_teacher']:.2f}",
            "Inference peak extra MiB": _mib(result["inference"]),
            "Train peak extra MiB": _mib(result["train"]),
        }
        for name, result in report["variants"].items()
    ]
    settings, machine = report["settings"], report["machine"]
    load = report["load_average_before"][0], report["load_average_after"][0]
    caption = (
        f"Throughput at {settings['image_size']} px, batch {settings['batch_size']}, on "
        f"{machine['device_name']} ({machine['device']}, {machine['cpu_count']} CPUs, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}); median of "
        f"{settings['steps']} timed batches after {settings['warmup']} warmup, range in "
        f"parentheses (slowest-fastest batch). Inference = forward + anomaly maps + image "
        f"scores; train = one full step with Adam. Peak extra memory = the most one step held "
        f"beyond what existed before it ({_memory_method(report)}). Random inputs; 1-minute "
        f"load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after."
    )
    table = pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)  # keep "5.20"
    return f"{caption}\n\n{table}\n"


def _memory_method(report: dict[str, Any]) -> str:
    first = next(iter(report["variants"].values()))
    return first["inference"]["memory"]["method"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variants", nargs="+", default=["rd_baseline", "drd_net", "mddnet"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before them")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--num-classes", type=int, default=15, help="classes in the memory (MVTec AD: 15)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/benchmarks/cpu", help="writes <out>.json/.md")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.num_classes < 1:
        parser.error("--steps, --batch-size and --num-classes must be >= 1, --warmup >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = Settings(
        args.image_size,
        args.batch_size,
        args.steps,
        args.warmup,
        args.device,
        args.num_classes,
        args.seed,
    )
    report = run_benchmark(args.params, args.variants, settings)
    write_json(f"{args.out}.json", report)
    table = markdown(report)
    write_text(f"{args.out}.md", table)
    print(table)


if __name__ == "__main__":
    main()
