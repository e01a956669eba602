"""Use a trained MDD-Net on your own images: a verdict per image in a CSV, and heat-map overlays.

Images are scored the way the checkpoint was calibrated (`mddnet.calibration`): each map is
z-scored with its class's held-out normal statistics, so a score means the same for every class,
and the verdict compares it with the class's threshold, the highest score of that class's
held-out normal training images. The class comes from `--class` (as in the paper, where the
category is known) or, when it is not given, from the memory's own prediction. Unreadable images
do not stop the run: the others are scored and the bad ones are listed with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from tqdm import tqdm

from mddnet.checkpoint import Scorer, TrainedModel, load_trained_model
from mddnet.data.datasets import transform_image
from mddnet.data.layout import IMAGE_EXTENSIONS, DatasetError, load_image
from mddnet.device import memory_format, resolve_device
from mddnet.errors import MddnetError
from mddnet.io import atomic_open, write_csv

__all__ = ["PredictionRun", "collect_images", "predict_images", "save_overlay"]

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "image",
    "verdict",
    "score",
    "threshold",
    "class",
    "class_source",
    "threshold_source",
    "overlay",
)
OVERLAY_ALPHA = 0.5


@dataclass(frozen=True)
class PredictionRun:
    """What `predict_images` wrote and what it could not read."""

    scores_csv: Path
    rows: list[dict[str, object]]
    failures: list[tuple[Path, str]]


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files given directly or found (recursively, sorted) in the given folders."""
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                log.warning(
                    "%s: no image files (%s) in this folder", item, ", ".join(IMAGE_EXTENSIONS)
                )
            images += found
        elif item.is_file():
            images.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder (pass images or folders)")
    if not images:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    return images


def _class_ids(trained: TrainedModel, class_name: str | None, n: int) -> torch.Tensor | None:
    """The class the memory reads: the given one, or None (predicted, or there is no memory)."""
    if class_name is None:
        return None
    if class_name not in trained.class_names:
        raise MddnetError(
            f"--class {class_name!r}: the checkpoint knows the classes "
            f"{', '.join(trained.class_names)}"
        )
    return torch.full((n,), trained.class_names.index(class_name), dtype=torch.long)


def save_overlay(path: Path, image: Image.Image, anomaly_map: np.ndarray, vmax: float) -> None:
    """The image with the anomaly map (jet colours, 0 .. vmax) blended over it, as PNG.

    0 is a typical normal pixel of the class (the maps are z-scored), so normal regions stay blue.
    """
    size = image.size
    scaled = np.clip(anomaly_map / max(vmax, 1e-12), 0.0, 1.0)
    heat = (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)
    heat_image = Image.fromarray(heat).resize(size, Image.Resampling.BILINEAR)
    blended = Image.blend(image.convert("RGB"), heat_image, OVERLAY_ALPHA)
    with atomic_open(path, "wb") as handle:
        blended.save(handle, format="PNG")


def _unique_name(stem: str, used: set[str]) -> str:
    name, index = f"{stem}.png", 1
    while name in used:
        name, index = f"{stem}_{index}.png", index + 1
    used.add(name)
    return name


class _Scored(NamedTuple):
    """One image's result, kept until every overlay can share one colour scale."""

    path: Path
    fused: np.ndarray  # (S, S) z-scored anomaly map
    score: float
    class_id: int
    source: str  # where the class came from


def _load_batch(paths: Sequence[Path], failures: list[tuple[Path, str]]) -> list[tuple[Path, Any]]:
    loaded = []
    for path in paths:
        try:
            loaded.append((path, load_image(path)))
        except DatasetError as err:
            failures.append((path, str(err)))
            log.warning("%s", err)
    return loaded


def _score_images(
    trained: TrainedModel,
    images: Sequence[Path],
    class_name: str | None,
    device: torch.device,
    progress: bool,
) -> tuple[list[_Scored], list[tuple[Path, str]]]:
    scorer = Scorer.calibrated(trained.config, trained.calibration)
    size, batch_size = trained.config.data.image_size, trained.config.evaluate.batch_size
    layout = memory_format(trained.config.train.channels_last)
    trained.model.to(memory_format=layout)
    failures: list[tuple[Path, str]] = []
    results: list[_Scored] = []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", disable=not progress):
        loaded = _load_batch(images[start : start + batch_size], failures)
        if not loaded:
            continue
        batch = torch.stack([transform_image(image, size) for _, image in loaded])
        given = _class_ids(trained, class_name, len(loaded))
        given = None if given is None else given.to(device)
        scored = scorer(trained.model, batch.to(device, memory_format=layout), given)
        class_ids = scored.output.class_ids if scored.output.class_ids is not None else given
        source = "given" if given is not None else "predicted by the memory"
        for i, (path, _) in enumerate(loaded):
            fused = scored.fused[i].float().cpu().numpy()
            results.append(
                _Scored(path, fused, float(scored.scores[i]), int(class_ids[i]), source)
            )
    return results, failures


def _row(trained: TrainedModel, result: _Scored, overlay: Path) -> dict[str, object]:
    calibration = trained.calibration
    threshold = calibration.thresholds[result.class_id]
    name = trained.class_names[result.class_id]
    return {
        "image": str(result.path),
        "verdict": "anomalous" if result.score > threshold else "normal",
        "score": result.score,
        "threshold": threshold,
        "class": name,
        "class_source": result.source,
        "threshold_source": (
            f"highest score of the {calibration.images} held-out normal training images "
            f"({name}: its own)"
        ),
        "overlay": str(overlay),
    }


@torch.no_grad()
def predict_images(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    class_name: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> PredictionRun:
    """Score every image with the checkpoint's calibrated scoring; write the CSV and overlays.

    Overlays share one colour scale, 0 (a typical normal pixel) to the largest map value of the
    run, so their colours compare across images the way scores do.
    """
    out_dir = Path(out_dir)
    images = collect_images(inputs)
    torch_device = resolve_device(device or "auto")
    trained = load_trained_model(checkpoint, torch_device)
    results, failures = _score_images(trained, images, class_name, torch_device, progress)
    vmax = max((float(r.fused.max()) for r in results), default=1.0)
    used: set[str] = set()
    rows = []
    for result in results:
        overlay = out_dir / "overlays" / _unique_name(result.path.stem, used)
        save_overlay(overlay, load_image(result.path), result.fused, vmax)
        rows.append(_row(trained, result, overlay))
    scores_csv = out_dir / "scores.csv"
    write_csv(scores_csv, rows, CSV_COLUMNS)
    log.info("scored %d images into %s (%d unreadable)", len(rows), out_dir, len(failures))
    return PredictionRun(scores_csv, rows, failures)
