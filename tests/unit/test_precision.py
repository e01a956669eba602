"""`train.precision`: fp32 leaves every number unchanged; bf16 and fp16 autocast stay near fp32.

bf16 and fp16 are for GPUs; torch's CPU autocast runs both, so CI checks the code path here.
The tolerances are what these tiny random-teacher models measured, with about 3x headroom.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mddnet.checkpoint import Scorer
from mddnet.config import Config, ConfigError, load_config
from mddnet.device import autocast, grad_scaler
from mddnet.models import build_model
from mddnet.train import make_optimizer, train_step

SIZE = 64
CLASSES = 3


def _config(params_path: Path, precision: str) -> Config:
    # The paper's plain sum of both maps: these untrained models carry no calibration to validate.
    plain_sum = {
        "fusion": {"normalise": False, "scale_weights": None, "restoration_identity": 1.0},
        "image_score": "max",
    }
    return load_config(
        params_path,
        "mddnet",
        {
            "model": {"weights": "none"},
            "train": {"precision": precision, "channels_last": False},
            "evaluate": plain_sum,
        },
    )


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(4, 3, SIZE, SIZE, generator=g)
    return {
        "normal": normal,
        "anomalous": normal + 0.5 * torch.randn(4, 3, SIZE, SIZE, generator=g),
        "mask": (torch.rand(4, 1, SIZE, SIZE, generator=g) > 0.8).float(),
        "class_id": torch.tensor([0, 1, 2, 0]),
    }


def _first_steps(config: Config, steps: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(config.model, CLASSES).train()
    optimizer = make_optimizer(model, config)
    scaler = grad_scaler(torch.device("cpu"), config.train.precision)
    return [
        torch.stack(
            train_step(model, model.teacher, optimizer, _batch(i), config, scaler).terms
        ).detach()
        for i in range(steps)
    ]


@pytest.mark.slow
def test_fp32_is_autocast_off_and_bit_identical(params_path: Path) -> None:
    config = _config(params_path, "fp32")
    torch.manual_seed(0)
    model = build_model(config.model, CLASSES).eval()
    image = _batch()["anomalous"]
    with torch.no_grad():
        plain = model(image, None).restoration
        with autocast(torch.device("cpu"), "fp32"):
            assert not torch.is_autocast_enabled("cpu")
            wrapped = model(image, None).restoration
    assert all(torch.equal(a, b) for a, b in zip(plain, wrapped, strict=True))
    assert not grad_scaler(torch.device("cpu"), "fp32").is_enabled()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_training_stays_near_fp32(params_path: Path, precision: str) -> None:
    reference = _first_steps(_config(params_path, "fp32"))
    low = _first_steps(_config(params_path, precision))
    for step, (ref, got) in enumerate(zip(reference, low, strict=True)):
        assert got.dtype == torch.float32  # the losses are computed in fp32
        assert torch.isfinite(got).all()
        # After the first step, all but the memory term: Adam's first update is about lr times
        # the sign of each gradient, so weights whose tiny gradient low precision flips part by
        # 2 lr, and the temperature-sharpened memory term then moves by up to 15 % (bf16, 3
        # bottleneck blocks) while the total and the decoder terms stay within 1 %.
        terms = slice(None) if step == 0 else slice(0, 4)
        torch.testing.assert_close(got[terms], ref[terms], rtol=0.05, atol=0.01)
    assert grad_scaler(torch.device("cpu"), precision).is_enabled() == (precision == "fp16")


@pytest.mark.slow
def test_bf16_anomaly_maps_are_fp32_and_close(params_path: Path) -> None:
    torch.manual_seed(0)
    maps = {}
    for precision in ("fp32", "bf16"):
        config = _config(params_path, precision)
        torch.manual_seed(0)
        model = build_model(config.model, CLASSES).eval()
        scored = Scorer.of(config, None)(model, _batch()["anomalous"], None)
        assert scored.fused.dtype == torch.float32 and scored.scores.dtype == torch.float32
        maps[precision] = scored.fused
    correlation = torch.corrcoef(torch.stack([m.flatten() for m in maps.values()]))[0, 1]
    assert correlation > 0.98


def test_unknown_precision_names_the_key(params_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config(params_path, overrides={"train": {"precision": "fp64"}})
