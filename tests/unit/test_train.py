"""The training loop's parts that need no dataset: step budget, lr schedule, one step, plateau."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mddnet.config import load_config
from mddnet.metrics import loss_plateau
from mddnet.models import build_model
from mddnet.train import LOSS_COLUMNS, StepResult, _lr, make_optimizer, train_step


def test_lr_steps_down_at_the_ceiling_of_the_fraction_of_steps(params_path: Path) -> None:
    # 10 steps, lr_step_at 0.25: the milestone is ceil(2.5) = 3, so steps 0-2 run at lr.
    config = load_config(
        params_path, overrides={"train": {"steps": 10, "lr_step_at": 0.25, "lr_gamma": 0.1}}
    )
    lr = config.train.lr
    assert [_lr(step, config) for step in range(5)] == pytest.approx(
        [lr, lr, lr, 0.1 * lr, 0.1 * lr]
    )
    never = load_config(params_path, overrides={"train": {"steps": 10, "lr_step_at": 1.0}})
    assert _lr(9, never) == never.train.lr


def test_loss_plateau_is_the_relative_drop_between_the_last_two_tenths() -> None:
    # 20 steps: tenths of 2; the second-last tenth averages 4, the last 3: (4 - 3) / 4.
    totals = [9.0] * 16 + [4.5, 3.5, 3.0, 3.0]
    assert loss_plateau(totals) == pytest.approx(0.25)
    assert loss_plateau([2.0] * 20) == 0.0  # flat: the plateau is reached
    assert loss_plateau([0.0] * 20) == 0.0  # a zero loss does not divide by zero
    assert math.isnan(loss_plateau([1.0] * 19))  # under 20 steps a tenth is too short
    assert loss_plateau([1.0] * 18 + [2.0, 2.0]) == pytest.approx(-1.0)  # still rising


def test_loss_columns_carry_the_memory_usage() -> None:
    assert LOSS_COLUMNS == (
        "step",
        "epoch",
        "lr",
        "total",
        "restoration",
        "identity",
        "discrepancy",
        "memory",
        "memory_entropy",
        "memory_used",
    )


@pytest.mark.slow
def test_a_train_step_returns_its_terms_and_the_memory_usage(params_path) -> None:
    config = load_config(
        params_path,
        "mddnet",
        overrides={"model": {"weights": "none"}, "train": {"channels_last": False}},
    )
    torch.manual_seed(0)
    model = build_model(config.model, 2).train()
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(2, 3, 32, 32, generator=g)
    batch = {
        "normal": normal,
        "anomalous": normal + torch.randn(2, 3, 32, 32, generator=g),
        "mask": (torch.rand(2, 1, 32, 32, generator=g) > 0.7).float(),
        "class_id": torch.tensor([0, 1]),
    }
    result = train_step(model, model.teacher, make_optimizer(model, config), batch, config)
    assert isinstance(result, StepResult) and torch.isfinite(result.terms.total)
    assert set(result.memory) == {"memory_entropy", "memory_used"}
    assert 0.0 <= result.memory["memory_entropy"] <= 1.0
    # K = 10 prototypes per class, one position of z per image: each class uses 1 of 10
    assert result.memory["memory_used"] == pytest.approx(0.1)
