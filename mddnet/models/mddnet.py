"""MDD-Net: frozen teacher, bottleneck, restoration and identity decoders, class-aware memory.

[paper] The teacher T encodes the (anomalous) input; the restoration decoder D_R recovers normal
teacher features, the identity decoder D_I reproduces the input's features, and the class-aware
memory steers the restoration. [ours] Both decoders read the same bottleneck embedding z (D_I
optionally without training it: `detach_identity`); the memory sits between z and D_R only, so
D_I keeps seeing the anomaly it must reproduce.

The model is composed by injection: an ablation passes `identity_decoder=None` or `memory=None`,
and `forward` follows whatever parts it was given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor, nn

if TYPE_CHECKING:  # annotations only: any module with the Teacher's forward contract works
    from mddnet.models.bottleneck import Bottleneck
    from mddnet.models.decoder import Decoder
    from mddnet.models.encoder import Teacher
    from mddnet.models.memory import ClassAwareMemory

__all__ = ["MDDNet", "MDDNetOutput"]


class MDDNetOutput(NamedTuple):
    """Everything one forward pass produces; feature lists are shallow -> deep."""

    teacher: list[Tensor]  # T(x) of the input, [(B, C_i, H/r_i, W/r_i)]
    restoration: list[Tensor]  # D_R(memory(z)) or D_R(z), same shapes as `teacher`
    identity: list[Tensor] | None  # D_I(z), None without identity decoder
    memory_logits: Tensor | None  # (B, num_classes), None without memory
    class_ids: Tensor | None  # (B,) class read from the memory (given or predicted)
    attention: Tensor | None = None  # (B, h*w, K) the memory's attention, None without memory


class MDDNet(nn.Module):
    """Reverse distillation with two decoders and an optional class-aware memory."""

    def __init__(
        self,
        teacher: Teacher,
        bottleneck: Bottleneck,
        restoration_decoder: Decoder,
        identity_decoder: Decoder | None = None,
        memory: ClassAwareMemory | None = None,
        detach_identity: bool = False,
    ) -> None:
        super().__init__()
        self.detach_identity = detach_identity
        self.teacher = teacher
        self.bottleneck = bottleneck
        self.restoration_decoder = restoration_decoder
        self.identity_decoder = identity_decoder
        self.memory = memory

    def forward(
        self, image: Tensor, class_ids: Tensor | None = None, teacher: list[Tensor] | None = None
    ) -> MDDNetOutput:
        """`image` (B, 3, H, W) ImageNet-normalised; `class_ids` (B,) or None to predict them.

        Without a memory the class is not used, and `class_ids` in the output is None. `teacher`
        is T(image) when the caller has it already (the frozen teacher's maps of a training image
        are cached), so it is not computed again.
        """
        if teacher is None:
            teacher = self.teacher(image)  # [(B, C_i, H/r_i, W/r_i)]
        z = self.bottleneck(teacher)  # (B, D, H/(2 r_last), W/(2 r_last))
        if self.memory is None:
            restoration_input, logits, read_ids, attention = z, None, None, None
        else:
            restoration_input, logits, read_ids, attention = self.memory(z, class_ids)
        restoration = self.restoration_decoder(restoration_input)
        identity = None
        if self.identity_decoder is not None:
            # [ours] detached: the identity loss (and L_dist through D_I) do not train the
            # bottleneck, whose compression then serves restoration alone.
            shared = z.detach() if self.detach_identity else z
            identity = self.identity_decoder(shared, teacher)  # the teacher feeds skips if any
        return MDDNetOutput(teacher, restoration, identity, logits, read_ids, attention)
