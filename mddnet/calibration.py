"""Calibration of a trained model on held-out training normals, never on test images. [ours]

The paper fuses two discrepancy maps but states no scales or weights. Here, after training:

1. Statistics: the teacher-restoration (TR) and restoration-identity (RI) maps of every held-out
   normal image give each class's mean and standard deviation of each map, so the maps can be
   z-scored per class before they are summed (`scoring.fuse`): otherwise the map with the larger
   scale decides, and a class's raw scores mean nothing to a user.
2. Choices: each held-out normal also gets a synthetic *validation* anomaly made by recipes the
   default training does not use (`VALIDATION_KINDS`: CutPaste, a structural anomaly, and RD++'s
   additive noise box), so the choice does not simply reward the RI map for recognising its own
   training anomalies. The paper's fusion (the plain sum of both maps, max-pooled) is the first
   candidate; then every candidate RI weight (`calibration.restoration_identity`) and image score
   (`calibration.image_score`) on the z-scored maps. Each is scored on these images by the mean
   over classes of I-AUROC, P-AUROC and AUPRO, and a candidate replaces the current choice only
   if it scores more than `calibration.margin` higher: a few held-out images per class give
   noisy scores (on the offline default, picks within 0.01 of each other moved I-AUROC by 10
   points), so the paper's fusion stays unless the evidence is clear.
3. Decision: each class's threshold is the highest image score of its held-out normals under the
   chosen scoring, so `mddnet predict` can say anomalous or normal and why.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mddnet.config import Config, ImageScore
from mddnet.data.anomalies import synthesize
from mddnet.data.datasets import NormalDataset, normalize
from mddnet.data.layout import Sample
from mddnet.device import autocast, memory_format
from mddnet.metrics import compute_per_class
from mddnet.models.mddnet import MDDNet
from mddnet.scoring import AnomalyMaps, MapStatistics, anomaly_maps, fuse, image_scores

__all__ = ["VALIDATION_KINDS", "Calibration", "calibrate", "statistics_of"]

log = logging.getLogger(__name__)

VALIDATION_KINDS = ("cutpaste", "simplex")  # alternate over the held-out images
VALIDATION_SEED = 104_729  # a fixed stream: every run validates on the same anomalies
CRITERION = ("image_auroc", "pixel_auroc", "pixel_aupro")  # averaged to rank the candidates


@dataclass(frozen=True)
class Calibration:
    """What calibration chose and measured; stored in the checkpoint as a plain dict."""

    statistics: dict[str, list[list[float]]]  # map -> [[mean per class], [std per class]]
    normalise: bool  # whether the chosen fusion z-scores the maps (False: the paper's plain sum)
    restoration_identity: float  # the chosen fusion weight of the RI map
    image_score: ImageScore
    thresholds: list[float]  # per class: highest image score of its held-out normals
    candidates: list[dict[str, Any]]  # every candidate with its validation metrics
    images: int  # held-out normal images used

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        return cls(**raw)

    def map_statistics(self) -> MapStatistics:
        def pair(key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
            if key not in self.statistics:
                return None
            mean, std = self.statistics[key]
            return torch.tensor(mean), torch.tensor(std)

        return MapStatistics(pair("teacher_restoration"), pair("restoration_identity"))


class _ValidationSet:
    """Maps of the held-out normals and of their synthetic anomalous copies, on the CPU."""

    def __init__(
        self,
        normal: AnomalyMaps,
        anomalous: AnomalyMaps,
        masks: torch.Tensor,
        class_ids: torch.Tensor,
    ) -> None:
        self.maps = AnomalyMaps(
            *(
                None if n is None else torch.cat([n, a])
                for n, a in zip(normal, anomalous, strict=True)
            )
        )
        self.masks = torch.cat([torch.zeros_like(masks), masks])  # (2N, H, W)
        self.labels = torch.cat([torch.zeros(len(masks)), torch.ones(len(masks))]).long()
        self.class_ids = torch.cat([class_ids, class_ids])
        self.normals = len(masks)


def _validation_anomaly(pixels: torch.Tensor, index: int, config: Config) -> tuple[Any, Any]:
    """(x_a normalised (3, S, S), mask (S, S)) of one held-out image by a validation recipe."""
    kind = VALIDATION_KINDS[index % len(VALIDATION_KINDS)]
    recipe = dataclasses.replace(config.data.synthesis, kind=kind, probability=1.0)
    rng = np.random.default_rng([VALIDATION_SEED, index])
    anomalous, mask = synthesize(pixels.numpy(), recipe, rng)
    return normalize(anomalous), torch.from_numpy(mask)


@torch.no_grad()
def _maps(
    model: MDDNet,
    images: torch.Tensor,
    class_ids: torch.Tensor,
    config: Config,
    device: torch.device,
) -> AnomalyMaps:
    images = images.to(device, memory_format=memory_format(config.train.channels_last))
    with autocast(device, config.train.precision):
        output = model(images, class_ids.to(device) if model.memory is not None else None)
    maps = anomaly_maps(output, images.shape[-2:], config.evaluate.blur_sigma)
    return AnomalyMaps(*(None if m is None else m.float().cpu() for m in maps))


def _collect(
    model: MDDNet,
    config: Config,
    class_names: Sequence[str],
    samples: Sequence[Sample],
    device: torch.device,
) -> _ValidationSet:
    dataset = NormalDataset(samples, class_names, config.data.image_size)
    normal, anomalous, masks, class_ids = [], [], [], []
    for start, batch in enumerate(DataLoader(dataset, batch_size=config.evaluate.batch_size)):
        offset = start * config.evaluate.batch_size
        made = [_validation_anomaly(p, offset + i, config) for i, p in enumerate(batch["pixels"])]
        normal.append(_maps(model, batch["image"], batch["class_id"], config, device))
        anomalous.append(
            _maps(model, torch.stack([m[0] for m in made]), batch["class_id"], config, device)
        )
        masks.append(torch.stack([m[1] for m in made]))
        class_ids.append(batch["class_id"])

    def joined(parts: list[AnomalyMaps]) -> AnomalyMaps:
        return AnomalyMaps(
            *(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True))
        )

    return _ValidationSet(
        joined(normal), joined(anomalous), torch.cat(masks), torch.cat(class_ids)
    )


def statistics_of(maps: AnomalyMaps, class_ids: torch.Tensor, classes: int) -> MapStatistics:
    """Per-class mean and std of each map (N, H, W) over all pixels of the images given."""

    def per_class(values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if values is None:
            return None
        flat = values.double().flatten(1)  # (N, H*W)
        mean = torch.stack([flat[class_ids == c].mean() for c in range(classes)])
        std = torch.stack([flat[class_ids == c].std() for c in range(classes)])
        return mean.float(), std.float()

    return MapStatistics(per_class(maps.teacher_restoration), per_class(maps.restoration_identity))


def _score(
    validation: _ValidationSet,
    weight: float,
    image_score: ImageScore,
    statistics: MapStatistics | None,
    class_names: Sequence[str],
    config: Config,
) -> tuple[dict[str, float], torch.Tensor]:
    fused = fuse(validation.maps, (1.0, weight), statistics, validation.class_ids)
    scores = image_scores(fused, image_score, config.evaluate.topk)
    metrics = compute_per_class(
        class_names,
        validation.class_ids.numpy(),
        validation.labels.numpy(),
        scores.double().numpy(),
        validation.masks.numpy() > 0.5,
        fused.numpy(),
        fpr_limit=config.evaluate.aupro_fpr_limit,
    ).mean
    result = {key: metrics[key] for key in CRITERION}
    return result | {"score": float(np.mean(list(result.values())))}, scores


def calibrate(
    model: MDDNet,
    config: Config,
    class_names: Sequence[str],
    samples: Sequence[Sample],
    device: torch.device,
) -> Calibration:
    """Statistics, choices and thresholds of `model` on the held-out normals `samples`."""
    model.eval()
    validation = _collect(model, config, class_names, samples, device)
    normals = validation.normals
    normal_maps = AnomalyMaps(*(None if m is None else m[:normals] for m in validation.maps))
    statistics = statistics_of(normal_maps, validation.class_ids[:normals], len(class_names))
    has_identity = validation.maps.restoration_identity is not None
    weights = config.calibration.restoration_identity if has_identity else (0.0,)
    options = [(False, 1.0 if has_identity else 0.0, "max")]  # the paper's plain sum first
    options += [(True, w, score) for w in weights for score in config.calibration.image_score]
    candidates, best = [], None
    for normalise, weight, image_score in options:
        used = statistics if normalise else None
        measured, scores = _score(validation, weight, image_score, used, class_names, config)
        choice = {
            "normalise": normalise,
            "restoration_identity": weight,
            "image_score": image_score,
        }
        candidates.append(choice | measured)
        if best is None or measured["score"] > best[0]["score"] + config.calibration.margin:
            best = (candidates[-1], scores)
    chosen, scores = best
    thresholds = [
        float(scores[:normals][validation.class_ids[:normals] == c].max())
        for c in range(len(class_names))
    ]
    log.info(
        "calibrated on %d held-out normals: %s, RI weight %s, image score %s (validation %.3f)",
        normals,
        "z-scored maps" if chosen["normalise"] else "plain sum",
        chosen["restoration_identity"],
        chosen["image_score"],
        chosen["score"],
    )
    return Calibration(
        statistics={
            key: [value[0].tolist(), value[1].tolist()]
            for key, value in statistics._asdict().items()
            if value is not None
        },
        normalise=chosen["normalise"],
        restoration_identity=chosen["restoration_identity"],
        image_score=chosen["image_score"],
        thresholds=thresholds,
        candidates=candidates,
        images=normals,
    )
