"""Class-aware memory module (CMM) of MDD-Net.

[paper] The memory stores class-specific normal prototypes, is trained with class-discriminative
supervision, and steers the restoration decoder away from anomalies. [ours] How: prototypes
P (classes, K, D) learned by backprop; every position of the bottleneck embedding z attends to its
class's K prototypes with softmax(cosine / temperature), and the attention-weighted sum of those
prototypes replaces z (`replace`), is added to it (`mix`), or moves z towards it by a learned
per-position gate (`gated`: z + g * (read-out - z)). Since the read-out is built from prototypes of
normal features only, an anomalous position is rewritten as the nearest mixture of normal ones.
The class logits (best-prototype cosine, pooled over positions) carry the cross-entropy and, at
test time, can pick the class when no label is given. Prototypes start random or, after a
warm-up, at per-class k-means centroids of z (`initialise`), so that every prototype is used.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mddnet.config import MemoryMode

__all__ = ["ClassAwareMemory", "MemoryRead", "MemoryUsage", "kmeans"]

PROTOTYPE_INIT_STD = 0.02  # small, so training (not the init) shapes the prototypes
KMEANS_ITERATIONS = 20


class MemoryRead(NamedTuple):
    """What one memory read gives the model."""

    readout: Tensor  # (B, D, h, w) the embedding D_R reads
    logits: Tensor  # (B, num_classes) pooled best-prototype cosine / temperature
    class_ids: Tensor  # (B,) int64, the class whose prototypes were read (given or predicted)
    attention: Tensor  # (B, N=h*w, K) attention over the read class's prototypes


class MemoryUsage(NamedTuple):
    """How the prototypes are used on a batch (logged per step)."""

    entropy: float  # mean attention entropy / log K: 1 = uniform, 0 = one prototype per position
    used: float  # per class in the batch: fraction of prototypes that win >= 1 position, mean


class ClassAwareMemory(nn.Module):
    """Per-class prototype memory read by cosine attention on the bottleneck embedding."""

    def __init__(
        self, num_classes: int, prototypes: int, dim: int, temperature: float, mode: MemoryMode
    ) -> None:
        super().__init__()
        # Drawn from the global torch RNG, so the run seed fixes them.
        self.prototypes = nn.Parameter(
            torch.randn(num_classes, prototypes, dim) * PROTOTYPE_INIT_STD
        )
        self.temperature = temperature
        self.mode = mode
        # gated: g = sigmoid(w . [z, read-out] + b) per position; b = 0 starts halfway.
        self.gate = nn.Conv2d(2 * dim, 1, kernel_size=1) if mode == "gated" else None

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
        return MemoryRead(self._combine(z, read), logits, class_ids, attention)

    def _combine(self, z: Tensor, read: Tensor) -> Tensor:
        if self.mode == "replace":
            return read
        if self.mode == "mix":
            return z + read
        gate = torch.sigmoid(self.gate(torch.cat([z, read], dim=1)))  # (B, 1, h, w)
        return z + gate * (read - z)

    @torch.no_grad()
    def initialise(self, embeddings: list[Tensor], generator: torch.Generator) -> None:
        """Set each class's prototypes to k-means centroids of its embeddings (N_c, D)."""
        for class_id, points in enumerate(embeddings):
            self.prototypes[class_id] = kmeans(points, self.prototypes.shape[1], generator)

    @staticmethod
    def usage(attention: Tensor, class_ids: Tensor) -> MemoryUsage:
        """Entropy and prototype use of one read (B, N, K) by the classes in `class_ids`."""
        k = attention.shape[-1]
        entropy = -(attention * attention.clamp_min(1e-12).log()).sum(-1).mean()
        winners = F.one_hot(attention.argmax(-1), k).amax(dim=1)  # (B, K) won by some position
        used = [winners[class_ids == c].amax(0).float().mean() for c in class_ids.unique()]
        normaliser = math.log(k) if k > 1 else 1.0
        return MemoryUsage(float(entropy) / normaliser, float(torch.stack(used).mean()))

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


def kmeans(points: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k centroids (k, D) of `points` (N, D) by Lloyd's algorithm from k seeded random points.

    A centroid that loses all its points keeps its place. With fewer points than k, points are
    repeated, so every prototype still starts on real data.
    """
    if points.shape[0] < k:
        points = points.repeat(math.ceil(k / points.shape[0]), 1)
    start = torch.randperm(points.shape[0], generator=generator)[:k]
    centroids = points[start].clone()  # (k, D)
    for _ in range(KMEANS_ITERATIONS):
        nearest = torch.cdist(points, centroids).argmin(dim=1)  # (N,)
        members = F.one_hot(nearest, k).to(points.dtype)  # (N, k)
        counts = members.sum(0)  # (k,)
        sums = members.T @ points  # (k, D)
        moved = counts > 0
        centroids[moved] = sums[moved] / counts[moved, None]
    return centroids
