"""A trained model from its checkpoint, and the one inference path that scores images with it.

Evaluation, prediction on a user's images, export and the figures all load models here, so none
of them needs the others. `Scorer` applies the `evaluate` settings with the checkpoint's
calibration (`mddnet.calibration`) where the settings ask for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from mddnet.calibration import Calibration
from mddnet.config import Config, ImageScore, config_from_dict
from mddnet.device import autocast
from mddnet.errors import MddnetError
from mddnet.io import CheckpointError, load_checkpoint
from mddnet.models import build_model
from mddnet.models.mddnet import MDDNet, MDDNetOutput
from mddnet.scoring import AnomalyMaps, MapStatistics, anomaly_maps, fuse, image_scores

__all__ = ["Scored", "Scorer", "TrainedModel", "load_trained_model"]

INFO_KEYS = ("teacher_weights", "step", "train_wall_time_s", "device", "mddnet_version")


class TrainedModel(NamedTuple):
    """A model rebuilt from its checkpoint, with the config and classes it was trained on."""

    model: MDDNet
    config: Config
    class_names: tuple[str, ...]
    calibration: Calibration | None  # None for checkpoints written before calibration existed
    info: dict[str, Any]  # teacher weights, training steps, wall time, device, mddnet version


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


class Scorer(NamedTuple):
    """The scoring a config asks for, with the calibration's values filled in."""

    weights: tuple[float, float]  # (teacher-restoration, restoration-identity)
    statistics: MapStatistics | None  # per-class z-score of each map, or None (raw sum)
    image_score: ImageScore
    config: Config

    @classmethod
    def of(cls, config: Config, calibration: Calibration | None) -> Scorer:
        """Resolve the `validated` settings of `evaluate` against the calibration."""
        evaluate, fusion = config.evaluate, config.evaluate.fusion
        chosen = (fusion.normalise, fusion.restoration_identity, evaluate.image_score)
        if ("validated" in chosen or fusion.normalise is True) and calibration is None:
            raise CheckpointError(
                "evaluate.fusion.normalise or a `validated` setting needs the calibration a "
                "checkpoint gets at the end of training; this checkpoint has none: retrain it"
            )

        def pick(value: Any, chosen: Any) -> Any:
            return chosen if value == "validated" else value

        normalise = pick(fusion.normalise, calibration and calibration.normalise)
        weight = pick(
            fusion.restoration_identity, calibration and calibration.restoration_identity
        )
        score = pick(evaluate.image_score, calibration and calibration.image_score)
        statistics = calibration.map_statistics() if normalise else None
        return cls((fusion.teacher_restoration, weight), statistics, score, config)

    @classmethod
    def calibrated(cls, config: Config, calibration: Calibration | None) -> Scorer:
        """The calibration's own scoring (its fusion, weight and image score): the one its
        per-class thresholds were set with."""
        if calibration is None:
            raise CheckpointError(
                "this checkpoint has no calibration (written before mddnet 0.2): retrain it"
            )
        statistics = calibration.map_statistics() if calibration.normalise else None
        return cls(
            (1.0, calibration.restoration_identity), statistics, calibration.image_score, config
        )

    @torch.no_grad()
    def __call__(self, model: MDDNet, image: torch.Tensor, given: torch.Tensor | None) -> Scored:
        """The model's pass on a batch under `train.precision`, its maps and image scores."""
        with autocast(image.device, self.config.train.precision):
            output = model(image, given)
        maps = anomaly_maps(output, image.shape[-2:], self.config.evaluate.blur_sigma)
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
