"""MDD-Net model parts: teacher, bottleneck, decoders, class-aware memory.

`build_model` composes them from the `model` params; an ablation drops a part by leaving it out
of the constructor, never by a branch on a variant name.
"""

from __future__ import annotations

from mddnet.config import ModelConfig
from mddnet.errors import MddnetError
from mddnet.models.bottleneck import Bottleneck
from mddnet.models.decoder import Decoder
from mddnet.models.encoder import build_teacher
from mddnet.models.mddnet import MDDNet, MDDNetOutput
from mddnet.models.memory import ClassAwareMemory, MemoryRead

__all__ = [
    "Bottleneck",
    "ClassAwareMemory",
    "Decoder",
    "MDDNet",
    "MDDNetOutput",
    "MemoryRead",
    "build_model",
]


def build_model(config: ModelConfig, num_classes: int, *, pretrained: bool = True) -> MDDNet:
    """Compose MDD-Net; `identity_decoder: false` and `memory.enabled: false` drop those parts.

    `pretrained=False` builds the teacher without loading weights, for callers that load a
    checkpoint (which holds the teacher's weights) and must not need the weight source.
    """
    teacher = build_teacher(config, load_weights=pretrained)
    reductions = tuple(teacher.reductions)
    if any(
        deep != 2 * shallow for shallow, deep in zip(reductions[:-1], reductions[1:], strict=True)
    ):
        raise MddnetError(
            f"model.stages {list(config.stages)} of {config.backbone} have strides "
            f"{list(reductions)}; the bottleneck and decoders need each stage at half the "
            f"previous one's resolution: pick consecutive stages"
        )
    bottleneck = Bottleneck(
        teacher.channels, config.embed_width * teacher.channels[-1], config.bottleneck_blocks
    )
    dim = bottleneck.out_channels
    memory = None
    if config.memory.enabled:
        memory = ClassAwareMemory(
            num_classes,
            config.memory.prototypes,
            dim,
            config.memory.temperature,
            config.memory.mode,
        )
    return MDDNet(
        teacher,
        bottleneck,
        restoration_decoder=Decoder(dim, teacher.channels, config.decoder_blocks),
        identity_decoder=(
            Decoder(dim, teacher.channels, config.decoder_blocks, skips=config.identity_skips)
            if config.identity_decoder
            else None
        ),
        memory=memory,
        detach_identity=config.identity_detached,
    )
