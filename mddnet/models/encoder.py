"""The frozen teacher encoder T of MDD-Net (paper: a frozen pretrained encoder, three scales).

T gives the multi-scale features that both decoders are trained to reproduce (F_n for the
restoration decoder, F_a for the identity decoder) and that the teacher-restoration anomaly map
compares against. It is a timm backbone in `features_only` mode, built from `model.backbone` and
`model.stages` (timm `out_indices`), with its weights from `mddnet.models.weights`. Images reach
the teacher ImageNet-normalised; weights trained with another input normalisation get it through
a fixed affine map inside the teacher (`InputRenormalisation`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mddnet.config import ModelConfig
from mddnet.imagenet import IMAGENET_MEAN, IMAGENET_STD
from mddnet.models.weights import RESTORED, create_network

__all__ = ["InputRenormalisation", "Teacher", "build_teacher"]

logger = logging.getLogger(__name__)


class InputRenormalisation(nn.Module):
    """Fixed affine map from ImageNet-normalised images to the normalisation the weights expect.

    raw = x * imagenet_std + imagenet_mean and expected = (raw - mean) / std, so
    expected = x * (imagenet_std / std) + (imagenet_mean - mean) / std. The buffers are saved in
    state dicts, so a checkpoint restores the map its teacher weights need even when the model is
    rebuilt with `model.weights: none` before loading it.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)  # (1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        imagenet_mean = torch.tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
        imagenet_std = torch.tensor(IMAGENET_STD).view(1, -1, 1, 1)
        self.register_buffer("scale", imagenet_std / std_t)
        self.register_buffer("shift", (imagenet_mean - mean_t) / std_t)

    def forward(self, image: Tensor) -> Tensor:
        return image * self.scale + self.shift  # (B, 3, H, W)


class Teacher(nn.Module):
    """Frozen timm feature extractor: eval mode always, no trainable parameters.

    Frozen because reverse distillation needs fixed targets: batch-norm statistics must not move
    when the parent model is put in train mode, so `train()` always keeps eval mode.
    """

    def __init__(
        self,
        network: nn.Module,
        weights_id: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.renormalise = InputRenormalisation(mean, std)
        self.network = network
        self.channels: tuple[int, ...] = tuple(network.feature_info.channels())
        self.reductions: tuple[int, ...] = tuple(network.feature_info.reduction())
        self.weights_id = weights_id
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Ignore `mode`: the teacher stays in eval mode whatever its parent does."""
        return super().train(False)

    def forward(self, image: Tensor) -> list[Tensor]:
        """(B, 3, H, W) ImageNet-normalised -> [(B, C_i, H / r_i, W / r_i)], shallow to deep."""
        with torch.no_grad():
            return list(self.network(self.renormalise(image)))


def build_teacher(config: ModelConfig, *, load_weights: bool = True) -> Teacher:
    """The frozen teacher: `config.backbone` at `config.stages`, weights from `config.weights`.

    `load_weights=False` builds it untrained and silently, for a caller about to load a
    checkpoint that holds the teacher's weights (so the weight source need not be at hand).
    """
    if not load_weights:
        config = dataclasses.replace(config, weights=RESTORED)
    network = create_network(config, features=True)
    teacher = Teacher(network.module, network.weights_id, network.mean, network.std)
    logger.info(
        "teacher %s stages %s: channels %s, strides %s, weights %s",
        config.backbone,
        config.stages,
        teacher.channels,
        teacher.reductions,
        teacher.weights_id,
    )
    return teacher
