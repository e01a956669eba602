"""Bottleneck: RD4AD's one-class embedding (OCBE) of the multi-scale teacher features.

[ours] MDD-Net's paper leaves the bottleneck unstated; we take reverse distillation's: every
shallower teacher map is brought to the deepest stage's resolution by strided 3x3 convs, the maps
are concatenated and fused by a 1x1 conv, and a stride-2 ResNet bottleneck block (then, with
`blocks` > 1, stride-1 ones, as RD4AD's three) compresses them into the embedding z that both
decoders (and the class-aware memory) read. The compression is what keeps anomalous detail from
passing straight to the decoders.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models import resnet

__all__ = ["Bottleneck"]


def _bn_relu_after(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU(inplace=True))


class Bottleneck(nn.Module):
    """Multi-scale fusion + residual stage: teacher features -> z (B, D, H/(2 r_last), ...).

    `channels` are the teacher's stage channels, shallow -> deep, each stage at half the previous
    one's resolution. D (`embed_dim`) defaults to 2 * channels[-1], the ratio of ResNet's layer4
    to layer3 that RD4AD's embedding has with its wide_resnet50_2 teacher.
    """

    def __init__(
        self, channels: Sequence[int], embed_dim: int | None = None, blocks: int = 1
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if not channels:
            raise ValueError("Bottleneck needs at least one teacher stage channel count, got none")
        embed_dim = 2 * channels[-1] if embed_dim is None else embed_dim
        if embed_dim % resnet.Bottleneck.expansion:
            raise ValueError(
                f"Bottleneck embed_dim must be a multiple of {resnet.Bottleneck.expansion} "
                f"(ResNet bottleneck expansion), got {embed_dim}; pass another embed_dim"
            )
        # Stage i steps through the deeper stages' channel counts, halving its size each time;
        # the deepest stage's chain is empty (an identity).
        self.align = nn.ModuleList(
            nn.Sequential(
                *(
                    _bn_relu_after(resnet.conv3x3(c_in, c_out, stride=2))
                    for c_in, c_out in zip(channels[i:-1], channels[i + 1 :], strict=True)
                )
            )
            for i in range(len(channels))
        )
        self.fuse = _bn_relu_after(resnet.conv1x1(len(channels) * channels[-1], embed_dim))
        self.residual = resnet.Bottleneck(
            embed_dim,
            embed_dim // resnet.Bottleneck.expansion,
            stride=2,
            downsample=nn.Sequential(
                resnet.conv1x1(embed_dim, embed_dim, stride=2), nn.BatchNorm2d(embed_dim)
            ),
        )
        # Empty at blocks=1: the model trained before these blocks existed (the same parameters
        # and initial values), so its checkpoints load.
        self.refine = nn.Sequential(
            *(
                resnet.Bottleneck(embed_dim, embed_dim // resnet.Bottleneck.expansion)
                for _ in range(blocks - 1)
            )
        )
        self.out_channels = embed_dim

    def forward(self, features: list[Tensor]) -> Tensor:
        if len(features) != len(self.align):
            raise ValueError(
                f"Bottleneck was built for {len(self.align)} teacher stages, got "
                f"{len(features)} feature maps; build it with the teacher's channels"
            )
        # [(B, C_i, H/r_i, W/r_i)] -> [(B, C_last, H/r_last, W/r_last)] each
        aligned = [align(f) for align, f in zip(self.align, features, strict=True)]
        fused = self.fuse(torch.cat(aligned, dim=1))  # (B, D, H/r_last, W/r_last)
        return self.refine(self.residual(fused))  # (B, D, H/(2 r_last), W/(2 r_last))
