"""Inference scoring of MDD-Net: discrepancy maps, their fusion, blur and image scores.

[paper] Two complementary discrepancy signals are fused into the anomaly map. [ours] They are
teacher vs restoration (1 - cos(T(x)_i, D_R_i), the reverse-distillation map: where the decoder
could not restore normal features) and restoration vs identity (1 - cos(D_R_i, D_I_i): where the
restored and the reproduced features part ways); each is upsampled to image size, summed over
scales (with per-scale weights that calibration may choose) and blurred; the two are fused by a
weighted sum, optionally after a per-class z-score with statistics of held-out normal images
(`MapStatistics`, from `mddnet.calibration`), since the two maps live on different scales; the
image score pools the fused map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mddnet.config import ImageScore
from mddnet.losses import cosine_distance

if TYPE_CHECKING:
    from mddnet.models.mddnet import MDDNetOutput

__all__ = [
    "AnomalyMaps",
    "MapStatistics",
    "anomaly_maps",
    "fuse",
    "blur",
    "discrepancy_map",
    "image_scores",
    "scale_maps",
]


class AnomalyMaps(NamedTuple):
    """Pixel anomaly maps (B, H, W), blurred; `restoration_identity` is None without an identity
    decoder."""

    teacher_restoration: Tensor
    restoration_identity: Tensor | None


class MapStatistics(NamedTuple):
    """Per-class mean and standard deviation of each map over held-out normal pixels."""

    teacher_restoration: tuple[Tensor, Tensor]  # (C,), (C,)
    restoration_identity: tuple[Tensor, Tensor] | None


def scale_maps(a: Sequence[Tensor], b: Sequence[Tensor], size: Sequence[int]) -> Tensor:
    """Per-scale 1 - cos over channels, bilinearly upsampled to `size`: (B, S, H, W)."""
    if len(a) != len(b):
        raise ValueError(f"scale_maps needs as many scales in both lists, got {len(a)}, {len(b)}")
    maps = [
        F.interpolate(
            cosine_distance(x, y).unsqueeze(1),  # (B, 1, h_i, w_i)
            size=tuple(size),
            mode="bilinear",
            align_corners=False,
        )
        for x, y in zip(a, b, strict=True)
    ]
    return torch.cat(maps, dim=1)


def weigh_scales(maps: Tensor, scale_weights: Sequence[float] | None) -> Tensor:
    """sum_i w_i maps_i over the scale axis: (B, S, H, W) -> (B, H, W); None: the plain sum.

    [ours] The paper states three scales but not how their maps are combined; the plain sum is
    the default, and calibration may choose other weights on validation anomalies.
    """
    if scale_weights is None:
        return maps.sum(dim=1)
    if len(scale_weights) != maps.shape[1]:
        raise ValueError(
            f"evaluate.fusion.scale_weights has {len(scale_weights)} weights, but the model has "
            f"{maps.shape[1]} teacher scales (model.stages): give one weight per scale"
        )
    weights = torch.tensor(list(scale_weights), dtype=maps.dtype, device=maps.device)
    return (maps * weights[None, :, None, None]).sum(dim=1)


def discrepancy_map(
    a: Sequence[Tensor],
    b: Sequence[Tensor],
    size: Sequence[int],
    scale_weights: Sequence[float] | None = None,
) -> Tensor:
    """Per-scale 1 - cos, upsampled to `size` and summed with `scale_weights`: (B, H, W)."""
    return weigh_scales(scale_maps(a, b, size), scale_weights)


def _gaussian_kernel(sigma: float, radius: int) -> Tensor:
    """(k, k) normalised Gaussian weights, k = 2 radius + 1: the kernel torchvision builds.

    Computed from Python floats, so an ONNX trace records it as a constant; torchvision makes
    it from tensor ops whose shapes the ONNX exporter cannot infer for a convolution weight.
    """
    pdf = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-radius, radius + 1)]
    total = sum(pdf)
    line = [p / total for p in pdf]
    return torch.tensor([[a * b for b in line] for a in line])  # (k, k)


def blur(maps: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of (B, H, W) maps, kernel 2 * ceil(3 sigma) + 1; sigma 0 returns them as is.

    The blur smooths the blocky upsampled maps so that the image score is not one noisy pixel.
    Every map is blurred on its own, with reflected borders (torchvision's gaussian_blur).
    """
    if sigma < 0:
        raise ValueError(f"evaluate.blur_sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return maps
    radius = math.ceil(3 * sigma)
    kernel = _gaussian_kernel(sigma, radius).to(maps)[None, None]  # (1, 1, k, k)
    padded = F.pad(maps.unsqueeze(1), [radius] * 4, mode="reflect")  # (B, 1, H + 2r, W + 2r)
    return F.conv2d(padded, kernel).squeeze(1)  # (B, H, W)


def anomaly_maps(
    output: MDDNetOutput,
    size: Sequence[int],
    blur_sigma: float,
    scale_weights: Sequence[float] | None = None,
) -> AnomalyMaps:
    """The two discrepancy maps of one forward pass, upsampled to `size`, weighted over scales
    (None: summed) and blurred."""
    teacher_restoration = blur(
        discrepancy_map(output.teacher, output.restoration, size, scale_weights), blur_sigma
    )
    restoration_identity = None
    if output.identity is not None:
        restoration_identity = blur(
            discrepancy_map(output.restoration, output.identity, size, scale_weights),
            blur_sigma,
        )
    return AnomalyMaps(teacher_restoration, restoration_identity)


def _standardise(values: Tensor, stats: tuple[Tensor, Tensor], class_ids: Tensor) -> Tensor:
    mean, std = (s.to(values)[class_ids, None, None] for s in stats)  # (B, 1, 1)
    return (values - mean) / std.clamp_min(1e-8)


def fuse(
    maps: AnomalyMaps,
    weights: tuple[float, float],
    statistics: MapStatistics | None = None,
    class_ids: Tensor | None = None,
) -> Tensor:
    """w_TR * TR + w_RI * RI (B, H, W); with `statistics` each map is first z-scored with its
    class's held-out normal statistics (`class_ids` (B,) pick the class of each image)."""
    w_tr, w_ri = weights
    parts = []
    for weight, values, key in (
        (w_tr, maps.teacher_restoration, "teacher_restoration"),
        (w_ri, maps.restoration_identity, "restoration_identity"),
    ):
        if weight == 0:
            continue
        if values is None:
            raise ValueError(
                "evaluate.fusion.restoration_identity > 0 but the model has no identity decoder; "
                "set the weight to 0 or build the model with model.identity_decoder: true"
            )
        if statistics is not None:
            values = _standardise(values, getattr(statistics, key), class_ids)
        parts.append(weight * values)
    if not parts:
        raise ValueError("evaluate.fusion: at least one weight must be > 0")
    return torch.stack(parts).sum(0)


def image_scores(maps: Tensor, mode: ImageScore, topk: int) -> Tensor:
    """Image anomaly scores (B,) from maps (B, H, W): the max, or the mean of the top-k pixels."""
    flat = maps.flatten(1)  # (B, H*W)
    if mode == "max":
        return flat.amax(dim=1)
    if not 1 <= topk <= flat.shape[1]:
        raise ValueError(
            f"evaluate.topk must lie in [1, {flat.shape[1]}] (pixels per map), got {topk}"
        )
    return flat.topk(topk, dim=1).values.mean(dim=1)
