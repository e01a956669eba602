"""A trained model from its checkpoint, and the one inference path that scores images with it.

Evaluation, prediction on a user's images, export and the figures all load models here, so none
of them needs the others. `Scorer` applies the `evaluate` settings with the checkpoint's
calibration (`mddnet.calibration`) where the settings ask for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mddnet.config import Config, ImageScore, config_from_dict
from mddnet.device import autocast
from mddnet.errors import MddnetError
from mddnet.io import CheckpointError, load_checkpoint
from mddnet.models import build_model
from mddnet.models.mddnet import MDDNet, MDDNetOutput
from mddnet.scoring import AnomalyMaps, MapStatistics, anomaly_maps, fuse, image_scores

__all__ = ["Calibration", "Scored", "Scorer", "TrainedModel", "load_trained_model"]

INFO_KEYS = (
    "teacher_weights",
    "step",
    "train_wall_time_s",
    "train_cpus",
    "device",
    "mddnet_version",
)


@dataclass(frozen=True)
class Calibration:
    """What calibration (`mddnet.calibration`) chose and measured; a dict in the checkpoint."""

    statistics: dict[str, list[list[float]]]  # map -> [[mean per class], [std per class]]
    normalise: bool  # whether the chosen fusion z-scores the maps (False: the paper's plain sum)
    scale_weights: list[float] | None  # the chosen weight of each teacher scale (None: plain sum)
    restoration_identity: float  # the chosen fusion weight of the RI map
    image_score: ImageScore
    thresholds: list[float]  # per class: highest image score of its held-out normals
    candidates: list[dict[str, Any]]  # every candidate with its validation metrics
    images: int  # held-out normal images used

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        # Checkpoints calibrated before per-scale weights existed summed the scales.
        return cls(**({"scale_weights": None} | raw))

    def map_statistics(self) -> MapStatistics:
        def pair(key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
            if key not in self.statistics:
                return None
            mean, std = self.statistics[key]
            return torch.tensor(mean), torch.tensor(std)

        return MapStatistics(pair("teacher_restoration"), pair("restoration_identity"))


class TrainedModel(NamedTuple):
    """A model rebuilt from its checkpoint, with the config and classes it was trained on."""

    model: MDDNet
    config: Config
    class_names: tuple[str, ...]
    calibration: Calibration | None  # None until `mddnet.calibration` has calibrated it
    info: dict[str, Any]  # teacher weights, steps, wall time, CPUs, device, mddnet version


def load_trained_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the model a checkpoint was trained as and load its weights (teacher included)."""
    data = load_checkpoint(checkpoint, map_location=device)
    if not data.get("complete", False):
        raise CheckpointError(
            f"{checkpoint}: training did not finish; rerun `mddnet train` to resume"
        )
    config = config_from_dict(data["config"], source=str(checkpoint))
    class_names = tuple(data["class_names"])
    # The checkpoint holds the teacher's weights too, so the weight source is not needed here.
    model = build_model(config.model, len(class_names), pretrained=False)
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as err:
        # torch's first line is a header; the next names the first missing or mismatched keys.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(
            f"{checkpoint}: weights do not fit the model its config describes "
            f"(backbone {config.model.backbone}; {detail[:150]}...); the file was edited or "
            f"written by another mddnet version ({data.get('mddnet_version')}): retrain it with "
            f"`mddnet train`"
        ) from err
    calibration = data.get("calibration")
    calibration = Calibration.from_dict(calibration) if calibration else None
    info = {k: data.get(k) for k in INFO_KEYS}
    return TrainedModel(model.to(device).eval(), config, class_names, calibration, info)


class Scored(NamedTuple):
    """One batch scored: the model's output, both maps, the fused map and the image scores."""

    output: MDDNetOutput
    maps: AnomalyMaps
    fused: torch.Tensor  # (B, H, W)
    scores: torch.Tensor  # (B,)


def _tupled(weights: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if weights is None else tuple(float(w) for w in weights)


class Scorer(NamedTuple):
    """The scoring a config asks for, with the calibration's values filled in."""

    weights: tuple[float, float]  # (teacher-restoration, restoration-identity)
    statistics: MapStatistics | None  # per-class z-score of each map, or None (raw sum)
    image_score: ImageScore
    config: Config
    scale_weights: Sequence[float] | None = None  # per teacher scale; None: the plain sum

    @classmethod
    def of(cls, config: Config, calibration: Calibration | None) -> Scorer:
        """Resolve the `validated` settings of `evaluate` against the calibration."""
        evaluate, fusion = config.evaluate, config.evaluate.fusion
        chosen = (
            fusion.normalise,
            fusion.scale_weights,
            fusion.restoration_identity,
            evaluate.image_score,
        )
        if ("validated" in chosen or fusion.normalise is True) and calibration is None:
            raise CheckpointError(
                "evaluate.fusion.normalise or a `validated` setting needs the calibration of the "
                "checkpoint (`mddnet calibrate`, or `mddnet train`, which calibrates); this "
                "checkpoint has none"
            )

        def pick(value: Any, chosen: Any) -> Any:
            return chosen if value == "validated" else value

        scale_weights = pick(fusion.scale_weights, calibration and calibration.scale_weights)
        normalise = pick(fusion.normalise, calibration and calibration.normalise)
        if normalise and _tupled(calibration.scale_weights) != _tupled(scale_weights):
            raise CheckpointError(
                "evaluate.fusion.normalise z-scores the maps with the calibration's statistics, "
                f"which hold for its scale weights {calibration.scale_weights}, not for "
                f"{scale_weights}: set evaluate.fusion.scale_weights to validated, or normalise "
                f"to false"
            )
        weight = pick(
            fusion.restoration_identity, calibration and calibration.restoration_identity
        )
        score = pick(evaluate.image_score, calibration and calibration.image_score)
        statistics = calibration.map_statistics() if normalise else None
        return cls((fusion.teacher_restoration, weight), statistics, score, config, scale_weights)

    @classmethod
    def calibrated(cls, config: Config, calibration: Calibration | None) -> Scorer:
        """The calibration's own scoring (its fusion, weights and image score): the one its
        per-class thresholds were set with."""
        if calibration is None:
            raise CheckpointError(
                "this checkpoint has no calibration: run `mddnet calibrate` on it (or train it "
                "with `mddnet train`, which calibrates)"
            )
        statistics = calibration.map_statistics() if calibration.normalise else None
        return cls(
            (1.0, calibration.restoration_identity),
            statistics,
            calibration.image_score,
            config,
            calibration.scale_weights,
        )

    @torch.no_grad()
    def __call__(self, model: MDDNet, image: torch.Tensor, given: torch.Tensor | None) -> Scored:
        """The model's pass on a batch under `train.precision`, its maps and image scores."""
        with autocast(image.device, self.config.train.precision):
            output = model(image, given)
        maps = anomaly_maps(
            output, image.shape[-2:], self.config.evaluate.blur_sigma, self.scale_weights
        )
        class_ids = output.class_ids if output.class_ids is not None else given
        if self.statistics is not None and class_ids is None:
            raise MddnetError(
                "the maps are normalised per class, but this model has no memory to predict the "
                "class: give it (mddnet predict --class NAME)"
            )
        fused = fuse(maps, self.weights, self.statistics, class_ids)
        return Scored(
            output, maps, fused, image_scores(fused, self.image_score, self.config.evaluate.topk)
        )
