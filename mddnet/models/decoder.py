"""Student decoder of reverse distillation, used twice in MDD-Net.

[paper] The restoration decoder D_R recovers the NORMAL teacher features F_n from the embedding of
an anomalous image; the identity decoder D_I reproduces the ANOMALOUS features F_a from the same
embedding. [ours] Both are one class: a mirror of the teacher built from RD4AD's de-convolutional
residual blocks, one per teacher stage, that double the resolution and step the channels down to
the teacher's, so every output matches a teacher feature map in shape; optionally followed, per
stage, by residual blocks that keep the resolution (RD4AD has 3, 4, 6 blocks per stage).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import conv3x3

__all__ = ["Decoder", "RefineBlock", "UpBlock"]


def _deconv2x(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 2x2 stride-2 transposed conv + BN: RD4AD's learned x2 upsampling."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class UpBlock(nn.Module):
    """De-convolutional residual block: (B, C_in, h, w) -> (B, C_out, 2h, 2w).

    Unlike a ResNet block it ends WITHOUT a ReLU, because the output is compared with teacher
    features that may be signed (EfficientNet stages end in a linear projection); a ReLU'd output
    could never align with their negative part. The decoder applies the ReLU before the next block.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            _deconv2x(in_channels, out_channels),
            nn.ReLU(inplace=True),
            conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = _deconv2x(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + self.shortcut(x)  # (B, C_out, 2h, 2w)


class RefineBlock(nn.Module):
    """Pre-activation residual block at one resolution: x + BN(conv(ReLU(BN(conv(ReLU(x)))))).

    The ReLU comes first and the identity path carries x unchanged, so the output, like an
    UpBlock's, may be signed.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ReLU(),
            conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.main(x)


class Decoder(nn.Module):
    """Mirrors the teacher: z -> one feature map per teacher stage, returned shallow -> deep.

    `channels` are the teacher's stage channels (shallow -> deep); the blocks run deep -> shallow,
    each doubling the resolution, so z at stride 2 * r_last yields maps at the teacher's strides
    when consecutive teacher stages differ by a factor 2 (checked by `build_model`). Each stage has
    `blocks` residual blocks: an UpBlock, then `blocks - 1` RefineBlocks.

    [ours] With `skips`, each block's output also gets a 1x1 projection of the teacher's map at
    that scale: a high-bandwidth path, so the identity decoder can keep what the compressed z
    drops (the anomaly it must reproduce). The restoration decoder never has one.
    """

    def __init__(
        self, in_channels: int, channels: Sequence[int], blocks: int = 1, skips: bool = False
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if not channels:
            raise ValueError("Decoder needs at least one teacher stage channel count, got none")
        widths = (in_channels, *reversed(channels))  # deep -> shallow
        self.blocks = nn.ModuleList(
            UpBlock(c_in, c_out) for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )
        # Empty at blocks=1: the model trained before these blocks existed (the same parameters
        # and initial values), so its checkpoints load.
        self.refine = nn.ModuleList(
            nn.Sequential(*(RefineBlock(c) for _ in range(blocks - 1))) for c in widths[1:]
        )
        self.skips = (
            nn.ModuleList(nn.Conv2d(c, c, kernel_size=1) for c in reversed(channels))
            if skips
            else None
        )

    def forward(self, z: Tensor, teacher: Sequence[Tensor] | None = None) -> list[Tensor]:
        """z (B, D, H/(2 r_last), W/(2 r_last)) -> maps; `teacher` (shallow -> deep) feeds the
        skips and is ignored without them."""
        skips = [None] * len(self.blocks)
        if self.skips is not None:
            if teacher is None:
                raise ValueError("this decoder has teacher skips: pass the teacher's maps")
            skips = [proj(f) for proj, f in zip(self.skips, teacher[::-1], strict=True)]
        deep_to_shallow: list[Tensor] = []
        for block, refine, skip in zip(self.blocks, self.refine, skips, strict=True):
            x = block(F.relu(deep_to_shallow[-1]) if deep_to_shallow else z)  # doubles h, w
            x = refine(x)  # keeps h, w
            deep_to_shallow.append(x if skip is None else x + skip)
        return deep_to_shallow[::-1]  # [(B, C_i, H/r_i, W/r_i)] shallow -> deep
