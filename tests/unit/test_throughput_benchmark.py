"""Smoke tests of benchmarks/throughput.py's helpers on a tiny setting (64 px, batch 2, 1 step)."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    """The script as a module; its folder stays on sys.path so spawned workers can import it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("throughput")


@pytest.fixture
def tiny(throughput: ModuleType):
    return throughput.Settings(
        image_size=64, batch_size=2, steps=1, warmup=0, device="cpu", num_classes=3
    )


def test_timing_matches_numpy_linear_quartiles(throughput: ModuleType) -> None:
    timing = throughput.Timing.of([4.0, 1.0, 3.0, 2.0])
    # Linear interpolation on the sorted 1, 2, 3, 4: positions 0.75, 1.5 and 2.25.
    assert timing == throughput.Timing(median=2.5, q1=1.75, q3=3.25, min=1.0, max=4.0)


def test_time_calls_interleaves_calls_and_times_only_the_timed_rounds(
    throughput: ModuleType,
) -> None:
    order: list[str] = []

    def fast() -> None:
        order.append("fast")

    def slow() -> None:
        order.append("slow")
        time.sleep(0.02)

    fast_s, slow_s = throughput.time_calls([fast, slow], 1, 3, torch.device("cpu"))
    assert order == ["fast", "slow"] * 4  # one warmup round, then three timed ones
    assert len(fast_s) == len(slow_s) == 3
    assert min(slow_s) >= 0.02 > max(fast_s)


@pytest.mark.slow
def test_run_benchmark_reports_consistent_positive_numbers(
    throughput: ModuleType, tiny, params_path: Path
) -> None:
    report = throughput.run_benchmark(params_path, ["mddnet"], tiny, isolated=False)
    json.dumps(report, allow_nan=False)  # what write_json needs
    assert report["settings"]["image_size"] == 64 and report["machine"]["cpu_count"] >= 1
    assert len(report["load_average_before"]) == len(report["load_average_after"]) == 3
    result = report["variants"]["mddnet"]
    for mode in ("inference", "train"):
        measured = result[mode]
        seconds = measured["seconds"]
        assert 0 < seconds["min"] <= seconds["median"] <= seconds["max"]
        assert measured["images_per_s"] == pytest.approx(2 / seconds["median"])
        assert measured["images_per_s_min"] <= measured["images_per_s"]
        assert measured["memory"]["extra_bytes"] >= 0
    inference = result["inference"]
    assert inference["inference_to_teacher"] == pytest.approx(
        inference["seconds"]["median"] / inference["teacher_seconds"]["median"]
    )
    assert result["train"]["teacher_seconds"] is None
    # Activations and gradients are allocated by the measured step itself.
    assert result["train"]["memory"]["extra_bytes"] > result["inference"]["memory"]["extra_bytes"]

    table = throughput.markdown(report)
    assert "| mddnet " in table and "at 64 px, batch 2" in table
    assert f"{inference['inference_to_teacher']:.2f}" in table


def test_step_peak_memory_is_the_most_the_step_held_at_once(throughput: ModuleType) -> None:
    def step() -> None:
        a = torch.empty(1000, dtype=torch.float32)  # 4,000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4,000 bytes, while a is alive
        del a, b
        torch.empty(250, dtype=torch.float32)  # 1,000 bytes after both are freed

    memory = throughput.step_peak_memory(step, torch.device("cpu"))
    assert memory.extra_bytes == 8000


def test_step_peak_memory_ignores_memory_freed_from_before_the_step(
    throughput: ModuleType,
) -> None:
    # What the process held before (and frees during) the step cannot make the figure negative:
    # the resident-set difference did, when the allocator returned memory mid-step (issue 15).
    earlier = [torch.empty(1_000_000)]

    def step() -> None:
        earlier.pop()
        torch.empty(100, dtype=torch.float32)

    assert throughput.step_peak_memory(step, torch.device("cpu")).extra_bytes == 400


@pytest.mark.slow  # a spawned interpreter imports torch and timm again (about 5-10 s)
def test_isolated_measurement_runs_in_a_fresh_process(
    throughput: ModuleType, tiny, params_path: Path
) -> None:
    measured = throughput.measure_isolated(params_path, "rd_baseline", "inference", tiny)
    assert measured.mode == "inference" and measured.images_per_s > 0
    assert measured.memory.extra_bytes > 0


def test_image_size_off_the_bottleneck_stride_is_refused(
    throughput: ModuleType, params_path: Path
) -> None:
    odd = throughput.Settings(48, 2, 1, 0, "cpu", 3)
    with pytest.raises(ValueError, match="--image-size 48 is not a multiple of 32"):
        throughput.measure(params_path, "rd_baseline", "inference", odd)


def test_unknown_variant_and_mode_are_refused(
    throughput: ModuleType, tiny, params_path: Path
) -> None:
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        throughput.run_benchmark(params_path, ["nope"], tiny, isolated=False)
    with pytest.raises(ValueError, match="mode must be one of inference, train"):
        throughput.measure(params_path, "mddnet", "predict", tiny)
