"""Evaluation: run a trained MDD-Net over a test set, keep its maps, and compute the MUAD metrics.

`predict()` produces `Predictions` (scores, the teacher-restoration, restoration-identity and fused
maps, labels, masks, classes); maps are kept as float16 to bound memory (MVTec AD at 256 px: about
230 MB per map kind). `evaluate()` turns predictions into per-class and mean metrics through
`mddnet.metrics`, the one place where metrics are defined.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mddnet.config import Config, config_from_dict
from mddnet.data.datasets import TestDataset
from mddnet.data.layout import scan_dataset
from mddnet.device import autocast, memory_format, resolve_device
from mddnet.io import load_checkpoint, write_bytes
from mddnet.metrics import compute_per_class
from mddnet.models import build_model
from mddnet.models.mddnet import MDDNet, MDDNetOutput
from mddnet.scoring import AnomalyMaps, anomaly_maps, image_scores

__all__ = [
    "EvaluationRun",
    "Predictions",
    "TrainedModel",
    "check_compatible",
    "evaluate",
    "evaluate_checkpoint",
    "load_predictions",
    "load_predictions_of",
    "load_test_set",
    "load_trained_model",
    "predict",
    "save_predictions",
    "versions",
]

log = logging.getLogger(__name__)


class TrainedModel(NamedTuple):
    """A model rebuilt from its checkpoint, with the config and classes it was trained on."""

    model: MDDNet
    config: Config
    class_names: tuple[str, ...]
    info: dict[str, Any]  # teacher weights, training steps, wall time, device, mddnet version


@dataclass(frozen=True)
class Predictions:
    """Everything a test run produced, aligned by image (N images of H x W pixels)."""

    class_names: tuple[str, ...]
    paths: tuple[str, ...]
    class_ids: np.ndarray  # (N,) int64, the true class
    predicted_class_ids: np.ndarray  # (N,) int64, the memory's prediction; -1 without memory
    labels: np.ndarray  # (N,) int64, 1 = defective
    scores: np.ndarray  # (N,) float64 image scores
    masks: np.ndarray  # (N, H, W) bool ground truth
    maps: np.ndarray  # (N, H, W) float16 fused anomaly maps (what the scores come from)
    teacher_restoration: np.ndarray  # (N, H, W) float16; zeros when its weight is 0
    restoration_identity: np.ndarray  # (N, H, W) float16; zeros without identity decoder


def load_trained_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the model a checkpoint was trained as and load its weights (teacher included)."""
    data = load_checkpoint(checkpoint, map_location=device)
    if not data.get("complete", False):
        raise ValueError(f"{checkpoint}: training did not finish; rerun `mddnet train` to resume")
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
        raise ValueError(
            f"{checkpoint}: weights do not fit the model its config describes "
            f"(backbone {config.model.backbone}; {detail[:150]}...); the file was edited or "
            f"written by another mddnet version ({data.get('mddnet_version')}): retrain it with "
            f"`mddnet train`"
        ) from err
    info = {k: data.get(k) for k in _CHECKPOINT_INFO}
    return TrainedModel(model.to(device).eval(), config, class_names, info)


_CHECKPOINT_INFO = ("teacher_weights", "step", "train_wall_time_s", "device", "mddnet_version")


def check_compatible(trained: TrainedModel, config: Config, checkpoint: str | Path) -> None:
    """Refuse to evaluate a checkpoint under a config whose model or input size differs.

    Scoring variants evaluate another variant's checkpoint with other `evaluate` settings; the
    model and the image size must still be the ones it was trained with.
    """
    for key in ("model", "data.image_size"):
        section, *rest = key.split(".")
        ours, theirs = getattr(config, section), getattr(trained.config, section)
        if rest:
            ours, theirs = getattr(ours, rest[0]), getattr(theirs, rest[0])
        if ours != theirs:
            raise ValueError(
                f"{checkpoint}: trained with {key} = {theirs}, but variant "
                f"{config.variant!r} asks for {ours}; retrain (dvc repro) or fix the params"
            )


def load_test_set(config: Config, class_names: tuple[str, ...], root: Path | None = None):
    """The test split of the configured dataset, restricted to the classes the model knows."""
    root = Path(root) if root is not None else config.data.root_path()
    samples = [s for s in scan_dataset(root, class_names) if s.split == "test"]
    return TestDataset(samples, class_names, config.data.image_size)


def _half(maps: torch.Tensor | None, like: torch.Tensor) -> np.ndarray:
    if maps is None:
        return np.zeros(tuple(like.shape), dtype=np.float16)
    return maps.float().cpu().numpy().astype(np.float16)


@torch.no_grad()
def score_batch(
    model: MDDNet, image: torch.Tensor, given: torch.Tensor | None, config: Config
) -> tuple[MDDNetOutput, AnomalyMaps, torch.Tensor]:
    """The model's pass on a batch under `train.precision`, its anomaly maps and image scores
    (B,) with the `evaluate` settings: the one inference path of evaluation and prediction."""
    settings = config.evaluate
    with autocast(image.device, config.train.precision):
        output = model(image, given)
    maps = anomaly_maps(output, image.shape[-2:], settings.fusion, settings.blur_sigma)
    return output, maps, image_scores(maps.fused, settings.image_score, settings.topk)


@torch.no_grad()
def predict(
    model: MDDNet,
    dataset: TestDataset,
    config: Config,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Predictions:
    """Score every test image with the evaluate settings of `config` (fusion, blur, pooling).

    With `evaluate.class_source: label` the memory reads the true class (the paper's setting);
    with `predicted` it reads the class it predicts itself (label-free).
    """
    layout = memory_format(config.train.channels_last)
    model.eval().to(device, memory_format=layout)
    settings = config.evaluate
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False)
    parts: dict[str, list[Any]] = {k: [] for k in Predictions.__dataclass_fields__}
    for batch in tqdm(loader, desc="predict", disable=not progress, unit="batch"):
        image = batch["image"].to(device, memory_format=layout)
        class_ids = batch["class_id"].to(device)
        given = class_ids if settings.class_source == "label" else None
        output, maps, scores = score_batch(model, image, given, config)
        parts["scores"].append(scores.double().cpu().numpy())
        parts["maps"].append(_half(maps.fused, maps.fused))
        parts["teacher_restoration"].append(_half(maps.teacher_restoration, maps.fused))
        parts["restoration_identity"].append(_half(maps.restoration_identity, maps.fused))
        # The memory's own guess is recorded in both modes, to report its class accuracy.
        parts["predicted_class_ids"].append(
            np.full(len(image), -1)
            if output.memory_logits is None
            else output.memory_logits.argmax(dim=1).cpu().numpy()
        )
        parts["masks"].append(batch["mask"][:, 0].cpu().numpy() > 0.5)
        parts["labels"].append(batch["label"].cpu().numpy())
        parts["class_ids"].append(batch["class_id"].cpu().numpy())
        parts["paths"].extend(batch["path"])
    return Predictions(
        class_names=tuple(dataset.class_names),
        paths=tuple(parts["paths"]),
        class_ids=np.concatenate(parts["class_ids"]).astype(np.int64),
        predicted_class_ids=np.concatenate(parts["predicted_class_ids"]).astype(np.int64),
        labels=np.concatenate(parts["labels"]).astype(np.int64),
        scores=np.concatenate(parts["scores"]),
        masks=np.concatenate(parts["masks"]),
        maps=np.concatenate(parts["maps"]),
        teacher_restoration=np.concatenate(parts["teacher_restoration"]),
        restoration_identity=np.concatenate(parts["restoration_identity"]),
    )


def save_predictions(path: str | Path, predictions: Predictions) -> None:
    """Write predictions as one compressed .npz, atomically."""
    buffer = io.BytesIO()
    arrays = {
        f.name: np.asarray(getattr(predictions, f.name)) for f in dataclasses.fields(Predictions)
    }
    np.savez_compressed(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def load_predictions(path: str | Path) -> Predictions:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions not found (run the evaluate stage first)")
    with np.load(path, allow_pickle=False) as data:
        values = {name: data[name] for name in data.files}
    values["class_names"] = tuple(str(c) for c in values["class_names"])
    values["paths"] = tuple(str(p) for p in values["paths"])
    return Predictions(**values)


def load_predictions_of(paths: Mapping[str, str | Path]) -> dict[str, Predictions]:
    """`{variant: Predictions}` from `{variant: path}` (see `report.variant_paths`)."""
    return {name: load_predictions(path) for name, path in paths.items()}


def evaluate(predictions: Predictions, config: Config) -> dict[str, Any]:
    """Per-class and mean metrics (fractions, full precision) plus the memory's class accuracy."""
    started = time.perf_counter()
    per_class, mean = compute_per_class(
        predictions.class_names,
        predictions.class_ids,
        predictions.labels,
        predictions.scores,
        predictions.masks,
        predictions.maps,
        fpr_limit=config.evaluate.aupro_fpr_limit,
    )
    result: dict[str, Any] = {"mean": mean, "per_class": per_class}
    if (predictions.predicted_class_ids >= 0).all():
        result["memory_class_accuracy"] = float(
            (predictions.predicted_class_ids == predictions.class_ids).mean()
        )
    log.info("metrics computed in %.1f s: mAD %.4f", time.perf_counter() - started, mean["mad"])
    return result


class EvaluationRun(NamedTuple):
    """The three products of the evaluate stage."""

    predictions: Predictions
    metrics: dict[str, Any]  # the metrics JSON: identity of the run + per-class and mean
    provenance: dict[str, Any]  # what produced it: data, teacher, seed, versions, device, times


def evaluate_checkpoint(
    config: Config,
    checkpoint: str | Path,
    root: str | Path,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> EvaluationRun:
    """Load a checkpoint, predict the test set of `root` and compute the metrics.

    `config` is the evaluated variant's (its `evaluate` section decides scoring), which may
    differ from the checkpoint's own only outside the model and the image size.
    """
    started = time.perf_counter()
    device = device or resolve_device(config.train.device)
    trained = load_trained_model(checkpoint, device)
    check_compatible(trained, config, checkpoint)
    dataset = load_test_set(config, trained.class_names, Path(root))
    predictions = predict(trained.model, dataset, config, device=device, progress=progress)
    result = evaluate(predictions, config)
    metrics = {
        "dataset": config.data.dataset,
        "variant": config.variant,
        "label": config.variants[config.variant].label if config.variant else None,
        "checkpoint": config.checkpoint_variant,
        **result,
    }
    provenance = {
        "dataset": config.data.dataset,
        "data_root": str(config.data.root),
        "test_images": len(dataset),
        "classes": list(trained.class_names),
        "image_size": config.data.image_size,
        "backbone": config.model.backbone,
        "stages": list(config.model.stages),
        "teacher_weights": trained.info["teacher_weights"],
        "seed": config.seed,
        "variant": config.variant,
        "checkpoint": str(checkpoint),
        "train_steps": trained.info["step"],
        "train_device": trained.info["device"],
        "train_wall_time_s": trained.info["train_wall_time_s"],
        "evaluate_device": str(device),
        "evaluate_wall_time_s": time.perf_counter() - started,
        "versions": versions(),
    }
    return EvaluationRun(predictions, metrics, provenance)


def versions() -> dict[str, str]:
    """Versions of what the numbers depend on (python, torch, timm, numpy, sklearn, mddnet)."""
    import platform

    import sklearn
    import timm

    from mddnet import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "mddnet": __version__,
        "platform": platform.platform(),
    }
