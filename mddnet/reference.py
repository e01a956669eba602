"""[reference] A training-free row for every ablation table: PatchCore-style nearest neighbours.

Not part of MDD-Net: it shows at a glance where a learned model stands. For each class, the
teacher's patch features of the normal training images (the `reference.stages` maps, each
averaged over a `neighbourhood` x `neighbourhood` window and brought to the first map's
resolution) form a memory bank, thinned to a `coreset` fraction by greedy k-center selection
(PatchCore, Roth et al. 2022). A test patch's anomaly score is its distance to the nearest bank
patch of its class; the map is upsampled, blurred and max-pooled exactly as MDD-Net's maps are,
and scored by the same metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mddnet.config import Config
from mddnet.data.datasets import NormalDataset, TestDataset
from mddnet.data.layout import scan_dataset
from mddnet.metrics import compute_per_class
from mddnet.models.encoder import Teacher, build_teacher
from mddnet.scoring import blur, image_scores

__all__ = ["LABEL", "greedy_coreset", "patch_features", "reference_metrics"]

log = logging.getLogger(__name__)

LABEL = "[reference] per-class nearest neighbour of teacher patches (PatchCore-style)"
DISTANCE_CHUNK = 4096  # test patches per distance computation (bounds memory)
CANDIDATES = 20_000  # patches the greedy selection draws from (a seeded random subset)


@torch.no_grad()
def patch_features(teacher: Teacher, images: torch.Tensor, neighbourhood: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C, h, w): locally averaged teacher maps at the first map's size."""
    maps = teacher(images)
    size = maps[0].shape[-2:]
    pooled = [
        F.avg_pool2d(
            m, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False
        )
        for m in maps
    ]
    resized = [
        p
        if p.shape[-2:] == size
        else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
        for p in pooled
    ]
    return torch.cat(resized, dim=1)


def greedy_coreset(points: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `count` points chosen by greedy k-center (each next point the farthest from
    those chosen), from a seeded random start: a bank that covers every kind of patch."""
    count = min(count, len(points))
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    nearest = torch.cdist(points, points[chosen[0]][None]).squeeze(1)  # (N,)
    for _ in range(count - 1):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, torch.cdist(points, points[chosen[-1]][None]).squeeze(1))
    return torch.tensor(chosen)


def _features(teacher: Teacher, dataset: Any, config: Config) -> dict[str, torch.Tensor]:
    """Patch features (N, C, h, w), class ids (N,) and, for test images, masks (N, H, W) and
    labels (N,) of every image of `dataset`."""
    parts: dict[str, list[torch.Tensor]] = {
        "features": [],
        "class_id": [],
        "mask": [],
        "label": [],
    }
    for batch in DataLoader(dataset, batch_size=config.evaluate.batch_size):
        image = batch["image"]
        parts["features"].append(patch_features(teacher, image, config.reference.neighbourhood))
        parts["class_id"].append(torch.as_tensor(batch["class_id"]))
        if "mask" in batch:
            parts["mask"].append(batch["mask"][:, 0] > 0.5)
            parts["label"].append(torch.as_tensor(batch["label"]))
    return {key: torch.cat(values) for key, values in parts.items() if values}


def _bank(features: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """`fraction` of a class's patches, chosen greedily from at most CANDIDATES of them (a
    random subset first keeps the selection to seconds on a CPU; PatchCore projects instead)."""
    points = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # (N*h*w, C)
    count = math.ceil(fraction * len(points))
    if len(points) > CANDIDATES:
        points = points[torch.randperm(len(points), generator=generator)[:CANDIDATES]]
    return points[greedy_coreset(points, count, generator)]


def _distance_maps(features: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h, w): each patch's distance to its nearest bank patch."""
    b, c, h, w = features.shape
    points = features.permute(0, 2, 3, 1).reshape(-1, c)
    nearest = torch.cat(
        [torch.cdist(chunk, bank).amin(dim=1) for chunk in points.split(DISTANCE_CHUNK)]
    )
    return nearest.reshape(b, h, w)


def reference_metrics(config: Config, roots: Sequence[Path]) -> dict[str, Any]:
    """The reference row's metrics file: per-class and mean metrics on the test split."""
    samples = scan_dataset(list(roots), config.data.classes)
    class_names = tuple(sorted({s.class_name for s in samples}))
    teacher = build_teacher(dataclasses.replace(config.model, stages=config.reference.stages))
    size = config.data.image_size
    train = NormalDataset([s for s in samples if s.split == "train"], class_names, size)
    test = TestDataset([s for s in samples if s.split == "test"], class_names, size)
    train_set, test_set = _features(teacher, train, config), _features(teacher, test, config)
    train_features, train_ids = train_set["features"], train_set["class_id"]
    test_features, test_ids = test_set["features"], test_set["class_id"]
    generator = torch.Generator().manual_seed(config.seed)
    maps = torch.zeros(len(test), size, size)
    for class_id, name in enumerate(class_names):
        bank = _bank(train_features[train_ids == class_id], config.reference.coreset, generator)
        rows = test_ids == class_id
        distances = _distance_maps(test_features[rows], bank)[:, None]  # (b, 1, h, w)
        upsampled = F.interpolate(
            distances, size=(size, size), mode="bilinear", align_corners=False
        )
        maps[rows] = blur(upsampled[:, 0], config.evaluate.blur_sigma)
        log.info("%s: bank of %d patches", name, len(bank))
    scores = image_scores(maps, "max", config.evaluate.topk).double().numpy()
    per_class, mean = compute_per_class(
        class_names,
        test_ids.numpy(),
        test_set["label"].numpy(),
        scores,
        test_set["mask"].numpy(),
        maps.numpy(),
        fpr_limit=config.evaluate.aupro_fpr_limit,
    )
    return {
        "dataset": config.data.dataset,
        "variant": "reference",
        "label": LABEL,
        "seed": config.seed,
        "settings": dataclasses.asdict(config.reference),
        "mean": mean,
        "per_class": per_class,
    }
