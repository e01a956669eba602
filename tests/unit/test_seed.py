from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mddnet.seed import seed_everything


def _draw() -> tuple:
    return random.random(), np.random.rand(), torch.rand(1).item()  # noqa: NPY002


def test_same_seed_same_draws_different_seed_different_draws() -> None:
    seed_everything(3)
    first = _draw()
    seed_everything(3)
    assert _draw() == first
    seed_everything(4)
    assert _draw() != first


def test_generator_fixes_dataloader_order() -> None:
    def order(seed: int) -> list[int]:
        loader = DataLoader(
            list(range(20)), batch_size=5, shuffle=True, generator=seed_everything(seed)
        )
        return [int(x) for batch in loader for x in batch]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(20))


def test_negative_seed_is_rejected() -> None:
    with pytest.raises(ValueError, match="seed must be >= 0"):
        seed_everything(-1)
