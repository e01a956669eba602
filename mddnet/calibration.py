"""Calibration of a trained model on held-out training normals, never on test images. [ours]

The paper fuses two discrepancy maps but states no scales or weights. Calibration is its own
step (`calibrate_checkpoint`, the pipeline's calibrate stage), so a change of how maps are scored
re-runs calibration and evaluation, not training:

1. Maps: the teacher-restoration (TR) and restoration-identity (RI) maps of every held-out normal
   image and of its synthetic *validation* anomalies, kept per teacher scale. The validation
   anomalies come from recipes the default training does not use (`VALIDATION_KINDS`: CutPaste, a
   structural anomaly, and RD++'s additive noise box), so the choice does not simply reward the RI
   map for recognising its own training anomalies. Each image gets a large copy (boxes 1/8-1/2
   of the side) and a small one (the same recipe inside a window of `SMALL_WINDOW` of the side):
   real defects are often small, and only small ones tell the fine scales' worth. The pipeline
   makes one such pair per image; `mddnet validate --copies K` scores a checkpoint on K pairs,
   without writing it: with one held-out normal per class, one pair allows a class only the
   image AUROCs 0, 0.5 and 1. Their settings
   are fixed (`VALIDATION_SYNTHESIS`), not read from `data.synthesis`: a screen of the training
   synthesis must be scored on the same validation images as the model it is compared with.
2. Choices: the paper's fusion (the plain sum over scales and of both maps, max-pooled) is the
   first candidate; then every per-scale weighting (`calibration.scale_weights`), RI weight
   (`calibration.restoration_identity`) and image score (`calibration.image_score`) on maps
   z-scored per class with the held-out normals' statistics (`scoring.fuse`): otherwise the map
   with the larger scale decides, and a class's raw scores mean nothing to a user. Each is scored
   on the validation images by the mean over classes of I-AUROC, P-AUROC and AUPRO, and a
   candidate replaces the current choice only if it scores more than `calibration.margin` higher:
   a few held-out images per class give noisy scores (on the offline default, picks within 0.01
   of each other moved I-AUROC by 10 points), so the paper's fusion stays unless the evidence is
   clear.
3. Decision: each class's threshold is the highest image score of its held-out normals under the
   chosen scoring, so `mddnet predict` can say anomalous or normal and why.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from mddnet.checkpoint import Calibration, load_trained_model
from mddnet.config import Config, ImageScore, SynthesisConfig
from mddnet.data.anomalies import synthesize
from mddnet.data.datasets import NormalDataset, normalize
from mddnet.data.layout import Sample, scan_dataset
from mddnet.device import autocast, memory_format, resolve_device
from mddnet.errors import MddnetError
from mddnet.io import load_checkpoint, save_checkpoint
from mddnet.metrics import compute_per_class
from mddnet.models.mddnet import MDDNet
from mddnet.scoring import (
    AnomalyMaps,
    MapStatistics,
    blur,
    fuse,
    image_scores,
    scale_maps,
    weigh_scales,
)

__all__ = [
    "SMALL_WINDOW",
    "VALIDATION_KINDS",
    "VALIDATION_SYNTHESIS",
    "calibrate",
    "calibrate_checkpoint",
    "candidates_table",
    "held_out_samples",
    "statistics_of",
    "validate_checkpoint",
    "validation_anomalies",
]

log = logging.getLogger(__name__)

VALIDATION_KINDS = ("cutpaste", "simplex")  # alternate over the held-out images
SMALL_WINDOW = 0.25  # side of the window a small validation anomaly is made in (of the image's)
VALIDATION_SEED = 104_729  # a fixed stream: every run validates on the same anomalies
CRITERION = ("image_auroc", "pixel_auroc", "pixel_aupro")  # averaged to rank the candidates
# the noise box's amplitude range and scales: params.yaml's data.synthesis, which every
# validation set had before it was fixed here (kind and probability are set per image)
VALIDATION_SYNTHESIS = SynthesisConfig(
    kind="simplex",
    probability=1.0,
    strength=(0.2, 1.0),
    texture_source="procedural",
    perlin_max_scale=6,
    threshold=0.5,
)


class _ScaleMaps(NamedTuple):
    """Blurred maps per teacher scale (N, S, H, W); `restoration_identity` None without D_I."""

    teacher_restoration: torch.Tensor
    restoration_identity: torch.Tensor | None

    def weighed(self, scale_weights: Sequence[float] | None) -> AnomalyMaps:
        return AnomalyMaps(*(None if m is None else weigh_scales(m, scale_weights) for m in self))


class _ValidationSet(NamedTuple):
    """Maps of the held-out normals (first `normals` rows) and of their anomalous copies."""

    maps: _ScaleMaps
    masks: torch.Tensor  # (N, H, W), all 0 for the normals
    labels: torch.Tensor  # (N,)
    class_ids: torch.Tensor  # (N,)
    normals: int


def _small(image: np.ndarray, recipe: Any, rng: np.random.Generator) -> tuple[Any, Any]:
    """The recipe applied inside a random window of SMALL_WINDOW of the side, pasted back."""
    height, width = image.shape[:2]
    h, w = max(2, round(SMALL_WINDOW * height)), max(2, round(SMALL_WINDOW * width))
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    window = synthesize(np.ascontiguousarray(image[y : y + h, x : x + w]), recipe, rng)
    anomalous, mask = image.copy(), np.zeros((height, width), dtype=np.float32)
    anomalous[y : y + h, x : x + w] = window.image
    mask[y : y + h, x : x + w] = window.mask
    return anomalous, mask


def validation_anomalies(pixels: torch.Tensor, index: int, copies: int = 1) -> list[Any]:
    """[(x_a normalised (3, S, S), mask (S, S))] of held-out image `index`: `copies` pairs of a
    large and a small anomaly by the image's validation recipe. Pair j comes from a stream fixed
    by `index` and j, pair 0 from that of `index` alone: more copies keep the first."""
    kind = VALIDATION_KINDS[index % len(VALIDATION_KINDS)]
    recipe = dataclasses.replace(VALIDATION_SYNTHESIS, kind=kind)
    image = pixels.numpy()
    made = []
    for copy in range(copies):
        rng = np.random.default_rng([VALIDATION_SEED, index, *([copy] if copy else [])])
        large = synthesize(image, recipe, rng)
        made += [(large.image, large.mask), _small(image, recipe, rng)]
    return [(normalize(a), torch.from_numpy(np.asarray(m))) for a, m in made]


@torch.no_grad()
def _maps(
    model: MDDNet, images: torch.Tensor, class_ids: torch.Tensor, config: Config
) -> _ScaleMaps:
    device = next(model.parameters()).device
    images = images.to(device, memory_format=memory_format(config.train.channels_last))
    with autocast(device, config.train.precision):
        output = model(images, class_ids.to(device) if model.memory is not None else None)
    size, sigma = images.shape[-2:], config.evaluate.blur_sigma

    def per_scale(a: Any, b: Any) -> torch.Tensor | None:
        if b is None:
            return None
        maps = scale_maps(a, b, size)  # (B, S, H, W)
        return blur(maps.flatten(0, 1), sigma).view_as(maps).float().cpu()

    return _ScaleMaps(
        per_scale(output.teacher, output.restoration),
        per_scale(output.restoration, output.identity),
    )


def _collect(
    model: MDDNet,
    config: Config,
    class_names: Sequence[str],
    samples: Sequence[Sample],
    copies: int,
) -> _ValidationSet:
    dataset = NormalDataset(samples, class_names, config.data.image_size)
    normal, anomalous, masks, class_ids, anomalous_ids = [], [], [], [], []
    for start, batch in enumerate(DataLoader(dataset, batch_size=config.evaluate.batch_size)):
        offset = start * config.evaluate.batch_size
        made = [
            pair
            for i, p in enumerate(batch["pixels"])
            for pair in validation_anomalies(p, offset + i, copies)
        ]
        made_ids = batch["class_id"].repeat_interleave(len(made) // len(batch["class_id"]))
        normal.append(_maps(model, batch["image"], batch["class_id"], config))
        chunk = 2 * config.evaluate.batch_size  # one forward pass per batch at one copy
        for first in range(0, len(made), chunk):
            images = torch.stack([m[0] for m in made[first : first + chunk]])
            anomalous.append(_maps(model, images, made_ids[first : first + chunk], config))
        masks.append(torch.stack([m[1] for m in made]))
        class_ids.append(batch["class_id"])
        anomalous_ids.append(made_ids)
    parts = normal + anomalous
    maps = _ScaleMaps(*(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True)))
    normals, masks = sum(len(c) for c in class_ids), torch.cat(masks).float()
    labels = torch.cat([torch.zeros(normals), torch.ones(len(masks))]).long()
    return _ValidationSet(
        maps,
        torch.cat([torch.zeros((normals, *masks.shape[1:])), masks]),
        labels,
        torch.cat(class_ids + anomalous_ids),
        normals,
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
    maps: AnomalyMaps,
    weight: float,
    image_score: ImageScore,
    statistics: MapStatistics | None,
    class_names: Sequence[str],
    config: Config,
) -> tuple[dict[str, float], torch.Tensor]:
    fused = fuse(maps, (1.0, weight), statistics, validation.class_ids)
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


class _Candidate(NamedTuple):
    normalise: bool
    scale_weights: tuple[float, ...] | None
    restoration_identity: float
    image_score: ImageScore


def _candidates(config: Config, has_identity: bool) -> list[_Candidate]:
    """The paper's plain sum first, then every z-scored weighting the params list."""
    weights = config.calibration.restoration_identity if has_identity else (0.0,)
    return [_Candidate(False, None, 1.0 if has_identity else 0.0, "max")] + [
        _Candidate(True, scales, w, score)
        for scales in config.calibration.scale_weights
        for w in weights
        for score in config.calibration.image_score
    ]


def calibrate(
    model: MDDNet,
    config: Config,
    class_names: Sequence[str],
    samples: Sequence[Sample],
    copies: int = 1,
) -> Calibration:
    """Statistics, choices and thresholds of `model` on the held-out normals `samples` and
    `copies` pairs of validation anomalies of each."""
    if copies < 1:
        raise MddnetError(f"copies: {copies} validation pairs per held-out normal; use 1 or more")
    model.eval()
    validation = _collect(model, config, class_names, samples, copies)
    normals, classes = validation.normals, len(class_names)
    normal_ids = validation.class_ids[:normals]
    candidates, best = [], None
    for candidate in _candidates(config, validation.maps.restoration_identity is not None):
        maps = validation.maps.weighed(candidate.scale_weights)
        statistics = statistics_of(
            AnomalyMaps(*(None if m is None else m[:normals] for m in maps)), normal_ids, classes
        )
        used = statistics if candidate.normalise else None
        measured, scores = _score(
            validation, maps, candidate.restoration_identity, candidate.image_score, used,
            class_names, config,
        )  # fmt: skip
        scales = None if candidate.scale_weights is None else list(candidate.scale_weights)
        candidates.append(candidate._asdict() | {"scale_weights": scales} | measured)
        if best is None or measured["score"] > best[0]["score"] + config.calibration.margin:
            best = (candidates[-1], scores, statistics)
    chosen, scores, statistics = best
    thresholds = [float(scores[:normals][normal_ids == c].max()) for c in range(classes)]
    log.info(
        "calibrated on %d held-out normals: %s, scale weights %s, RI weight %s, image score %s "
        "(validation %.3f)",
        normals,
        "z-scored maps" if chosen["normalise"] else "plain sum",
        chosen["scale_weights"],
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
        scale_weights=chosen["scale_weights"],
        restoration_identity=chosen["restoration_identity"],
        image_score=chosen["image_score"],
        thresholds=thresholds,
        candidates=candidates,
        images=normals,
    )


def held_out_samples(
    recorded: Sequence[str], config: Config, roots: Sequence[Path], source: str
) -> list[Sample]:
    """The training normals a checkpoint's training held out (`class/file` names it recorded);
    all of them when it held none out (`calibration.holdout: 0`)."""
    samples = [s for s in scan_dataset(roots, config.data.classes) if s.split == "train"]
    if not recorded:
        return samples
    by_name = {f"{s.class_name}/{s.image_path.name}": s for s in samples}
    missing = [name for name in recorded if name not in by_name]
    if missing:
        raise MddnetError(
            f"{source}: {len(missing)} held-out training images it records are not in "
            f"{', '.join(map(str, roots))} (first: {missing[0]}); calibrate it on the data it "
            f"was trained on"
        )
    return [by_name[name] for name in recorded]


def _calibrated(
    config: Config,
    checkpoint: str | Path,
    roots: Sequence[str | Path] | None,
    device: str | torch.device | None,
    copies: int,
) -> tuple[Calibration, dict[str, Any]]:
    """A checkpoint's calibration on the normals its training held out, and its payload."""
    device = device or resolve_device(config.train.device)
    trained = load_trained_model(checkpoint, device)
    payload = load_checkpoint(checkpoint)
    roots = [Path(r) for r in roots] if roots is not None else list(config.data.root_paths())
    samples = held_out_samples(payload.get("held_out", []), config, roots, str(checkpoint))
    return calibrate(trained.model, config, trained.class_names, samples, copies), payload


def validate_checkpoint(
    config: Config,
    checkpoint: str | Path,
    copies: int,
    roots: Sequence[str | Path] | None = None,
    *,
    device: str | torch.device | None = None,
) -> Calibration:
    """The calibration a checkpoint would get on `copies` validation pairs per held-out normal,
    written nowhere [ours]: a finer validation for screens on sets with few held-out normals."""
    return _calibrated(config, checkpoint, roots, device, copies)[0]


def calibrate_checkpoint(
    config: Config,
    checkpoint: str | Path,
    out: str | Path,
    roots: Sequence[str | Path] | None = None,
    *,
    device: str | torch.device | None = None,
) -> Calibration:
    """Calibrate a trained checkpoint on the normals its training held out; write it with its
    calibration to `out` (which may be `checkpoint` itself), atomically.

    `config` gives the calibration and scoring settings (a variant's); the model is the
    checkpoint's own.
    """
    calibration, payload = _calibrated(config, checkpoint, roots, device, copies=1)
    save_checkpoint(out, payload | {"calibration": dataclasses.asdict(calibration)})
    return calibration


def candidates_table(calibration: Calibration, decimals: int = 2) -> pd.DataFrame:
    """Every candidate with its validation metrics in percent; `chosen` marks the pick."""
    rows = pd.DataFrame(calibration.candidates)
    picked = {
        "normalise": calibration.normalise,
        "scale_weights": calibration.scale_weights,
        "restoration_identity": calibration.restoration_identity,
        "image_score": calibration.image_score,
    }
    rows["chosen"] = [
        all(row[k] == v for k, v in picked.items()) for row in calibration.candidates
    ]
    rows["scale_weights"] = rows["scale_weights"].map(
        lambda w: "sum" if w is None else " / ".join(f"{x:g}" for x in w)
    )
    measured = [*CRITERION, "score"]
    rows[measured] = (100 * rows[measured]).round(decimals)
    return rows.rename(columns={"restoration_identity": "RI weight"})
