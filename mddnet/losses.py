"""Training objective of MDD-Net: restoration, identity, discrepancy and memory losses.

[paper] With F_n = T(x_n), F_a = T(x_a) and the synthetic-anomaly mask M, summed over scales i:
- restoration  sum_i [1 - cos(D_R(x_a)_i, F_n,i)]   (recover the normal features)
- identity     sum_i [1 - cos(D_I(x_a)_i, F_a,i)]   (reproduce the anomalous features)
- discrepancy  sum_i L1(M_RI,i, M_i), M_RI,i = 1 - cos(D_R_i(h, w), D_I_i(h, w)) over channels
  (the two decoders must disagree exactly where the anomaly is).
[ours], each a param of `train`: the L1 is a mean over pixels (`mean`, the paper's plain norm) or
balances anomalous and normal pixels (`balanced`); its target is M (`mask`) or the discrepancy the
teacher itself sees inside M (`teacher`: M * (1 - cos(T(x_n), T(x_a))), which perfect decoders
reach); its gradient reaches both decoders (`both`) or only the identity decoder (`identity`:
D_R, the memory and z are then trained by the restoration loss alone); the memory loss is the
cross-entropy of the memory's class logits; the cosine is over each sample's flattened map (RD4AD)
or per pixel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mddnet.config import Cosine, DiscrepancyGradient, DiscrepancyTarget, LossWeights, Reduction

if TYPE_CHECKING:
    from mddnet.models.mddnet import MDDNetOutput

__all__ = [
    "DiscrepancyOptions",
    "LossTerms",
    "PixelCounter",
    "compute_losses",
    "cosine_distance",
    "discrepancy_loss",
    "discrepancy_target",
    "feature_cosine_loss",
    "resize_mask",
]


class LossTerms(NamedTuple):
    """Unweighted loss terms (0 when skipped) and their weighted sum `total` (0-dim tensors)."""

    total: Tensor
    restoration: Tensor
    identity: Tensor
    discrepancy: Tensor
    memory: Tensor


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cosine over channels at every position: (B, C, h, w) x 2 -> (B, h, w).

    The one discrepancy of the method: every loss term, and every anomaly map
    (`mddnet.scoring`), is built from it.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"feature maps differ in shape, {tuple(a.shape)} vs {tuple(b.shape)}: the decoder "
            f"mirrors the teacher only when the image size is a multiple of the bottleneck stride"
        )
    return 1.0 - F.cosine_similarity(a.float(), b.float(), dim=1)  # fp32 under autocast too


def _scale_pairs(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Pair the scales of two feature lists, refusing a mismatch that flattening would hide."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=False)):
        shapes_a, shapes_b = [tuple(x.shape) for x in a], [tuple(y.shape) for y in b]
        raise ValueError(
            f"feature maps differ: {shapes_a} vs {shapes_b}; "
            f"the decoders mirror the teacher only when the image size is a multiple of the "
            f"bottleneck stride (2 x the deepest teacher stride)"
        )
    return [(x.float(), y.float()) for x, y in zip(a, b, strict=True)]  # fp32 under autocast


def feature_cosine_loss(
    predicted: Sequence[Tensor], target: Sequence[Tensor], cosine: Cosine
) -> Tensor:
    """sum_i [1 - cos(predicted_i, target_i)], averaged over the batch (and pixels for `pixel`).

    `flatten` (RD4AD) takes one cosine per sample over its whole (C, h, w) map, so it tolerates
    small local errors; `pixel` takes one per position over the channels, weighting every
    location equally.
    """
    per_scale = [
        1.0 - F.cosine_similarity(p.flatten(1), t.flatten(1), dim=1).mean()  # (B,) -> ()
        if cosine == "flatten"
        else cosine_distance(p, t).mean()  # (B, h, w) -> ()
        for p, t in _scale_pairs(predicted, target)
    ]
    return torch.stack(per_scale).sum()


def resize_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Mask (B, 1, H, W) -> (B, h, w) by area averaging: the anomalous fraction of each cell.

    Nearest sampling would give {0, 1} but let a defect smaller than a cell vanish at the deep
    scales (or fill a whole cell); the fraction keeps every defect's mass at every scale and asks
    for a proportionally smaller discrepancy where a cell is only partly anomalous.
    """
    return F.adaptive_avg_pool2d(mask, tuple(size)).squeeze(1)


PixelCounter = Callable[[Tensor], Tensor]  # sums a pixel count over the global batch


def _balanced_mean(error: Tensor, target: Tensor, count: PixelCounter, processes: int) -> Tensor:
    """Mean error over anomalous pixels and over normal pixels, averaged (each weighs half).

    With anomalies covering a few percent of the pixels, a plain mean is nearly minimised by
    predicting "no discrepancy" everywhere; balancing keeps the anomalous pixels' pull.
    `target` holds the fraction of each cell that is anomalous, used as the weight. Under
    torchrun the pixel counts are global (`count`, a differentiable all-reduce from the trainer)
    and each process scales its part by the process count before DDP averages the gradients, so
    N processes train exactly as one; in one process `count` is the identity.
    """
    positive, negative = count(target.sum()), count((1 - target).sum())
    normal_part = processes * ((1 - target) * error).sum() / negative.clamp_min(1e-12)
    if positive <= 0:
        return normal_part
    return 0.5 * (processes * (target * error).sum() / positive + normal_part)


def _own_count(value: Tensor) -> Tensor:
    return value


def discrepancy_target(
    mask: Tensor, size: Sequence[int], normal: Tensor | None, anomalous: Tensor | None
) -> Tensor:
    """The per-cell target (B, h, w): the mask's area fraction, times the teacher's own
    discrepancy 1 - cos(T(x_n), T(x_a)) when both teacher maps are given (`teacher` target)."""
    target = resize_mask(mask, size)
    if normal is None or anomalous is None:
        return target
    return target * cosine_distance(normal, anomalous).clamp(0.0, 1.0)


def discrepancy_loss(
    restoration: Sequence[Tensor],
    identity: Sequence[Tensor],
    mask: Tensor,
    reduction: Reduction = "mean",
    teacher_pair: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
    count: PixelCounter = _own_count,
    processes: int = 1,
) -> Tensor:
    """sum_i reduce |M_RI,i - target_i| with M_RI,i = 1 - cos over channels of D_R_i and D_I_i.

    The target is M resized to each scale, or with `teacher_pair` (F_n, F_a) the teacher's own
    discrepancy inside M. `reduction` is `mean` (over all pixels) or `balanced`.
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"mask must have shape (B, 1, H, W), got {tuple(mask.shape)}; add the channel axis"
        )
    normals, anomalies = teacher_pair or ([None] * len(restoration), [None] * len(restoration))
    per_scale = []
    for (r, i), n, a in zip(_scale_pairs(restoration, identity), normals, anomalies, strict=True):
        target = discrepancy_target(mask, r.shape[-2:], n, a)  # (B, h, w)
        error = (cosine_distance(r, i) - target).abs()  # (B, h, w)
        per_scale.append(
            error.mean()
            if reduction == "mean"
            else _balanced_mean(error, target, count, processes)
        )
    return torch.stack(per_scale).sum()


def _require(weight: float, present: bool, term: str, part: str) -> None:
    if weight > 0 and not present:
        raise ValueError(
            f"train.loss_weights.{term} is {weight} but the model has no {part}; set the weight "
            f"to 0 or enable the {part} in the model params"
        )


def compute_losses(
    output: MDDNetOutput,
    teacher_normal: Sequence[Tensor],
    mask: Tensor,
    class_ids: Tensor,
    weights: LossWeights,
    cosine: Cosine,
    discrepancy: DiscrepancyOptions | None = None,
) -> LossTerms:
    """All loss terms of one training step; a term with weight 0 is not computed (0 instead).

    `output` is the model's pass on x_a, `teacher_normal` is T(x_n), `mask` (B, 1, H, W) marks the
    synthetic anomaly and `class_ids` (B,) are the true classes for the memory loss.
    """
    if not any(
        w > 0 for w in (weights.restoration, weights.identity, weights.discrepancy, weights.memory)
    ):
        raise ValueError("train.loss_weights: every weight is 0; give at least one term a weight")
    discrepancy_options = discrepancy or DiscrepancyOptions()
    has_identity = output.identity is not None
    _require(weights.identity, has_identity, "identity", "identity decoder")
    _require(weights.discrepancy, has_identity, "discrepancy", "identity decoder")
    _require(weights.memory, output.memory_logits is not None, "memory", "memory")
    zero = output.restoration[0].new_zeros((), dtype=torch.float32)
    restoration = identity = discrepancy_term = memory = zero
    if weights.restoration > 0:
        restoration = feature_cosine_loss(output.restoration, teacher_normal, cosine)
    if weights.identity > 0:
        identity = feature_cosine_loss(output.identity, output.teacher, cosine)
    if weights.discrepancy > 0:
        discrepancy_term = discrepancy_options.loss(output, teacher_normal, mask)
    if weights.memory > 0:
        memory = F.cross_entropy(output.memory_logits.float(), class_ids)
    total = (
        weights.restoration * restoration
        + weights.identity * identity
        + weights.discrepancy * discrepancy_term
        + weights.memory * memory
    )
    return LossTerms(total, restoration, identity, discrepancy_term, memory)


class DiscrepancyOptions(NamedTuple):
    """How L_dist is computed: the `train.discrepancy_*` params and the pixel counter."""

    reduction: Reduction = "mean"
    target: DiscrepancyTarget = "mask"
    gradient: DiscrepancyGradient = "both"
    count: PixelCounter = _own_count
    processes: int = 1

    def loss(self, output: MDDNetOutput, teacher_normal: Sequence[Tensor], mask: Tensor) -> Tensor:
        """L_dist of one forward pass; with gradient `identity` D_R's maps are detached."""
        restoration = output.restoration
        if self.gradient == "identity":
            restoration = [r.detach() for r in restoration]
        pair = (teacher_normal, output.teacher) if self.target == "teacher" else None
        return discrepancy_loss(
            restoration, output.identity, mask, self.reduction, pair, self.count, self.processes
        )
