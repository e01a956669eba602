"""Training objective of MDD-Net: restoration, identity, discrepancy and memory losses.

[paper] With F_n = T(x_n), F_a = T(x_a) and the synthetic-anomaly mask M, summed over scales i:
- restoration  sum_i [1 - cos(D_R(x_a)_i, F_n,i)]   (recover the normal features)
- identity     sum_i [1 - cos(D_I(x_a)_i, F_a,i)]   (reproduce the anomalous features)
- discrepancy  sum_i L1(M_RI,i, M_i), M_RI,i = 1 - cos(D_R_i(h, w), D_I_i(h, w)) over channels
  (the two decoders must disagree exactly where the anomaly is).
[ours] The discrepancy L1 is a mean over pixels; the memory loss is the cross-entropy of the
memory's class logits; the cosine is over each sample's flattened map (RD4AD) or per pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mddnet.config import LossWeights
from mddnet.distributed import global_sum, world_size
from mddnet.scoring import cosine_distance

if TYPE_CHECKING:
    from mddnet.models.mddnet import MDDNetOutput

__all__ = [
    "COSINE_MODES",
    "LossTerms",
    "compute_losses",
    "discrepancy_loss",
    "feature_cosine_loss",
    "resize_mask",
]

COSINE_MODES = ("flatten", "pixel")


class LossTerms(NamedTuple):
    """Unweighted loss terms (0 when skipped) and their weighted sum `total` (0-dim tensors)."""

    total: Tensor
    restoration: Tensor
    identity: Tensor
    discrepancy: Tensor
    memory: Tensor


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
    predicted: Sequence[Tensor], target: Sequence[Tensor], cosine: str
) -> Tensor:
    """sum_i [1 - cos(predicted_i, target_i)], averaged over the batch (and pixels for `pixel`).

    `flatten` (RD4AD) takes one cosine per sample over its whole (C, h, w) map, so it tolerates
    small local errors; `pixel` takes one per position over the channels, weighting every
    location equally.
    """
    if cosine not in COSINE_MODES:
        raise ValueError(f"train.cosine must be one of {', '.join(COSINE_MODES)}, got {cosine!r}")
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


def _balanced_mean(error: Tensor, target: Tensor) -> Tensor:
    """Mean error over anomalous pixels and over normal pixels, averaged (each weighs half).

    With anomalies covering a few percent of the pixels, a plain mean is nearly minimised by
    predicting "no discrepancy" everywhere; balancing keeps the anomalous pixels' pull.
    `target` holds the fraction of each cell that is anomalous, used as the weight.
    """
    # Counted over the global batch, so that N processes of a torchrun job, each scaling its
    # part by N before DDP averages the gradients, train exactly as one process would.
    positive, negative = global_sum(target.sum()), global_sum((1 - target).sum())
    scale = world_size()
    normal_part = scale * ((1 - target) * error).sum() / negative.clamp_min(1e-12)
    if positive <= 0:
        return normal_part
    return 0.5 * (scale * (target * error).sum() / positive + normal_part)


def discrepancy_loss(
    restoration: Sequence[Tensor],
    identity: Sequence[Tensor],
    mask: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """sum_i reduce |M_RI,i - M_i| with M_RI,i = 1 - cos over channels of D_R_i and D_I_i.

    `reduction` is `mean` (over all pixels) or `balanced` (see `_balanced_mean`).
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"mask must have shape (B, 1, H, W), got {tuple(mask.shape)}; add the channel axis"
        )
    if reduction not in ("mean", "balanced"):
        raise ValueError(f"train.discrepancy_reduction: mean or balanced, got {reduction!r}")
    per_scale = []
    for r, i in _scale_pairs(restoration, identity):
        target = resize_mask(mask, r.shape[-2:])  # (B, h, w)
        error = (cosine_distance(r, i) - target).abs()  # (B, h, w)
        per_scale.append(error.mean() if reduction == "mean" else _balanced_mean(error, target))
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
    cosine: str,
    discrepancy_reduction: str = "mean",
) -> LossTerms:
    """All loss terms of one training step; a term with weight 0 is not computed (0 instead).

    `output` is the model's pass on x_a, `teacher_normal` is T(x_n), `mask` (B, 1, H, W) marks the
    synthetic anomaly and `class_ids` (B,) are the true classes for the memory loss.
    """
    if not any(
        w > 0 for w in (weights.restoration, weights.identity, weights.discrepancy, weights.memory)
    ):
        raise ValueError("train.loss_weights: every weight is 0; give at least one term a weight")
    has_identity = output.identity is not None
    _require(weights.identity, has_identity, "identity", "identity decoder")
    _require(weights.discrepancy, has_identity, "discrepancy", "identity decoder")
    _require(weights.memory, output.memory_logits is not None, "memory", "memory")
    zero = output.restoration[0].new_zeros((), dtype=torch.float32)
    restoration = identity = discrepancy = memory = zero
    if weights.restoration > 0:
        restoration = feature_cosine_loss(output.restoration, teacher_normal, cosine)
    if weights.identity > 0:
        identity = feature_cosine_loss(output.identity, output.teacher, cosine)
    if weights.discrepancy > 0:
        discrepancy = discrepancy_loss(
            output.restoration, output.identity, mask, discrepancy_reduction
        )
    if weights.memory > 0:
        memory = F.cross_entropy(output.memory_logits.float(), class_ids)
    total = (
        weights.restoration * restoration
        + weights.identity * identity
        + weights.discrepancy * discrepancy
        + weights.memory * memory
    )
    return LossTerms(total, restoration, identity, discrepancy, memory)
