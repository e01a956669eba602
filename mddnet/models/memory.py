"""Class-aware memory module (CMM) of MDD-Net.

[paper] The memory stores class-specific normal prototypes, is trained with class-discriminative
supervision, and steers the restoration decoder away from anomalies. [ours] How: prototypes
P (classes, K, D) learned by backprop; every position of the bottleneck embedding z attends to its
class's K prototypes with softmax(cosine / temperature), and the attention-weighted sum of those
prototypes replaces z (`replace`) or is added to it (`mix`). Since the read-out is built from
prototypes of normal features only, an anomalous position is rewritten as the nearest mixture of
normal ones. The class logits (best-prototype cosine, pooled over positions) carry the
cross-entropy and, at test time, can pick the class when no label is given.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MEMORY_MODES", "ClassAwareMemory", "MemoryRead"]

MEMORY_MODES = ("replace", "mix")
PROTOTYPE_INIT_STD = 0.02  # small, so training (not the init) shapes the prototypes


class MemoryRead(NamedTuple):
    """What one memory read gives the model."""

    readout: Tensor  # (B, D, h, w) the embedding D_R reads: read-out (replace) or z + read-out
    logits: Tensor  # (B, num_classes) pooled best-prototype cosine / temperature
    class_ids: Tensor  # (B,) int64, the class whose prototypes were read (given or predicted)


class ClassAwareMemory(nn.Module):
    """Per-class prototype memory read by cosine attention on the bottleneck embedding."""

    def __init__(
        self, num_classes: int, prototypes: int, dim: int, temperature: float, mode: str
    ) -> None:
        super().__init__()
        if mode not in MEMORY_MODES:
            raise ValueError(
                f"model.memory.mode must be one of {', '.join(MEMORY_MODES)}, got {mode!r}"
            )
        if temperature <= 0:
            raise ValueError(f"model.memory.temperature must be > 0, got {temperature}")
        if num_classes < 1 or prototypes < 1 or dim < 1:
            raise ValueError(
                f"ClassAwareMemory needs num_classes, prototypes and dim >= 1, got "
                f"{num_classes}, {prototypes}, {dim}; check model.memory.prototypes and the data"
            )
        # Drawn from the global torch RNG, so the run seed fixes them.
        self.prototypes = nn.Parameter(
            torch.randn(num_classes, prototypes, dim) * PROTOTYPE_INIT_STD
        )
        self.temperature = temperature
        self.mode = mode

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    def forward(self, z: Tensor, class_ids: Tensor | None = None) -> MemoryRead:
        """Read the memory at every position of z; `class_ids` None reads the predicted class."""
        b, d, h, w = z.shape
        queries = F.normalize(z.flatten(2).transpose(1, 2), dim=-1)  # (B, N=h*w, D)
        keys = F.normalize(self.prototypes, dim=-1)  # (C, K, D)
        cosine = torch.einsum("bnd,ckd->bcnk", queries, keys)  # (B, C, N, K)
        logits = cosine.amax(dim=3).mean(dim=2) / self.temperature  # (B, C)
        if class_ids is None:
            class_ids = logits.argmax(dim=1)  # (B,) the label-free option
        else:
            self._check_class_ids(class_ids, b)
        # Select the read class with a one-hot product, not indexing: the backward of indexing
        # with repeated classes accumulates in a thread-dependent order on CPU, which made two
        # runs with the same seed differ; a matrix product's backward is deterministic.
        select = F.one_hot(class_ids, self.num_classes).to(cosine.dtype)  # (B, C)
        own = torch.einsum("bc,bcnk->bnk", select, cosine)  # (B, N, K) read class only
        attention = torch.softmax(own / self.temperature, dim=-1)  # (B, N, K)
        own_prototypes = torch.einsum("bc,ckd->bkd", select, self.prototypes)  # (B, K, D)
        read = attention @ own_prototypes  # (B, N, K) @ (B, K, D) -> (B, N, D)
        read = read.transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w)
        readout = read if self.mode == "replace" else z + read
        return MemoryRead(readout, logits, class_ids)

    def _check_class_ids(self, class_ids: Tensor, batch: int) -> None:
        if class_ids.shape != (batch,) or class_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"class_ids must be an integer tensor of shape ({batch},), got "
                f"{class_ids.dtype} {tuple(class_ids.shape)}; pass one class index per image"
            )
        if int(class_ids.min()) < 0 or int(class_ids.max()) >= self.num_classes:
            raise ValueError(
                f"class_ids must lie in [0, {self.num_classes}) (the classes the model was built "
                f"for), got {class_ids.tolist()}; rebuild the model with the dataset's classes"
            )
