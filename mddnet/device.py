"""Device choice shared by training, evaluation and prediction."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

__all__ = ["PRECISIONS", "autocast", "grad_scaler", "memory_format", "resolve_device"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present, else the CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def memory_format(channels_last: bool) -> torch.memory_format:
    """`train.channels_last`: NHWC tensors, about 20% faster convolutions on CPU and GPU here."""
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """`train.precision`: the model's forward pass under torch's autocast in bf16 or fp16.

    fp32 disables autocast, so CPU results stay bit-identical; losses and anomaly maps are
    computed in fp32 from the autocast features either way (`losses.py`, `scoring.py`).
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling, on for fp16 only (bf16 has fp32's range); a disabled scaler is a no-op."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
