"""One seeding function for every source of randomness a run touches."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch, and return a generator for DataLoader shuffling.

    The returned generator is what makes the order of batches reproducible: pass it to
    `DataLoader(generator=...)` instead of relying on the global torch state.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    random.seed(seed)
    # The legacy global state still drives third-party code that calls np.random directly.
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
