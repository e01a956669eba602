"""CPU kernel pinning: the same numbers on x86-64 CPUs of one maker (the `cpu` params section).

torch, oneDNN and MKL pick their CPU kernels by instruction set at the first operation, and
kernels for AVX2 and AVX-512 round differently, so the same seed trains different weights on
different CPUs (measured: every weight changes after 3 steps). The thread count splits sums
differently too. [ours] `cpu.isa: avx2` caps all three at AVX2, which every x86-64 CPU of the
last decade has (and which was also the faster choice on the 2-core AMD EPYC measured here), and
`cpu.threads` fixes the thread count. numpy's own SIMD dispatch is read when numpy is imported,
so it cannot be capped here; the code whose output feeds the numbers (the benchmark renderer,
anomaly synthesis, metrics) avoids numpy functions whose result depends on it. Even pinned, an
Intel Xeon and an AMD EPYC train different bytes (README, "What the numbers mean"), so checkpoints
record the CPU that trained them and provenance the one that evaluated.

Call `pin_cpu_kernels` before the first torch operation of the process (notebook setup, CLI);
`cpu_report` says what is in use, for provenance.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

from mddnet.config import CpuConfig

__all__ = ["cpu_model", "cpu_report", "pin_cpu_kernels"]

log = logging.getLogger(__name__)

# What each library reads, and the AVX2 value it takes.
_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def pin_cpu_kernels(config: CpuConfig) -> None:
    """Cap torch/oneDNN/MKL at `config.isa` and set `config.threads` torch threads.

    The libraries read the cap at their first operation: a process that already ran one keeps
    its kernels, which is logged and which `cpu_report` shows (the pin is checked, not assumed).
    """
    pin = config.isa == "avx2" and platform.machine() in ("x86_64", "AMD64")
    if pin:
        os.environ.update(_AVX2)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    if pin and capability not in ("AVX2", "DEFAULT"):
        log.warning("torch already runs %s kernels: cpu.isa avx2 came too late", capability)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_report() -> dict[str, Any]:
    """The CPU and the kernels in use: what a reader needs to tell why numbers differ."""
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "native"),
        "numpy_simd": _numpy_simd(),
    }


def _numpy_simd() -> list[str]:
    """numpy's SIMD extensions in use on this CPU: its baseline plus the dispatched ones found."""
    from numpy._core._multiarray_umath import (
        __cpu_baseline__,
        __cpu_dispatch__,
        __cpu_features__,
    )

    return [*__cpu_baseline__, *(name for name in __cpu_dispatch__ if __cpu_features__[name])]
