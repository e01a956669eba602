"""CPU kernel pinning (the `cpu` params section) and the CPU report kept with every result."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from mddnet.config import CpuConfig
from mddnet.kernels import cpu_model, cpu_report, pin_cpu_kernels

PINNED = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


@pytest.fixture
def environment(monkeypatch) -> None:
    """The pinning variables unset now and restored after the test; the thread count too."""
    for name in PINNED:
        monkeypatch.setenv(name, "placeholder")  # records the original value for the undo
        monkeypatch.delenv(name)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_avx2_sets_the_three_library_caps_and_the_threads(environment, monkeypatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    pin_cpu_kernels(CpuConfig(isa="avx2", threads=1))
    assert {name: os.environ[name] for name in PINNED} == {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_CBWR": "AVX2",
    }
    assert torch.get_num_threads() == 1


def test_native_and_other_machines_leave_the_kernels_alone(environment, monkeypatch) -> None:
    threads = torch.get_num_threads()
    pin_cpu_kernels(CpuConfig(isa="native", threads=None))
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    pin_cpu_kernels(CpuConfig(isa="avx2", threads=None))
    assert not any(name in os.environ for name in PINNED)
    assert torch.get_num_threads() == threads  # null: torch's own choice


def test_cpu_report_names_the_cpu_and_the_kernels_in_use() -> None:
    report = cpu_report()
    assert set(report) == {
        "cpu",
        "machine",
        "cores",
        "torch_threads",
        "torch_cpu_capability",
        "onednn_max_cpu_isa",
        "mkl_cbwr",
        "numpy_simd",
    }
    assert report["cpu"] == cpu_model() and isinstance(report["cpu"], str) and report["cpu"]
    assert report["torch_threads"] == torch.get_num_threads()
    assert report["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(report["numpy_simd"], list)
