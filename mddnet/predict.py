"""Use a trained MDD-Net on your own images: scores in a CSV and a heat-map overlay per image.

The class the memory reads comes from `--class` (as in the paper, where the category is known) or,
when it is not given, from the memory's own prediction. Unreadable images do not stop the run:
the others are scored and the bad ones are listed with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from tqdm import tqdm

from mddnet.data.datasets import transform_image
from mddnet.data.layout import IMAGE_EXTENSIONS, DatasetError, load_image
from mddnet.device import memory_format, resolve_device
from mddnet.evaluate import TrainedModel, load_trained_model, score_batch
from mddnet.io import atomic_open, write_csv

__all__ = ["PredictionRun", "collect_images", "predict_images", "save_overlay"]

log = logging.getLogger(__name__)

CSV_COLUMNS = ("image", "score", "class", "class_source", "overlay")
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
        raise ValueError(
            f"--class {class_name!r}: the checkpoint knows the classes "
            f"{', '.join(trained.class_names)}"
        )
    return torch.full((n,), trained.class_names.index(class_name), dtype=torch.long)


def save_overlay(path: Path, image: Image.Image, anomaly_map: np.ndarray, vmax: float) -> None:
    """The image with the anomaly map (jet colours, 0 .. vmax) blended over it, as PNG."""
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
    """Score every image with the checkpoint's own evaluate settings; write CSV and overlays.

    Overlays share one colour scale, 0 to the largest map value of the run, so their colours
    compare across images the way scores do.
    """
    out_dir = Path(out_dir)
    images = collect_images(inputs)
    torch_device = resolve_device(device or "auto")
    trained = load_trained_model(checkpoint, torch_device)
    settings, size = trained.config.evaluate, trained.config.data.image_size
    layout = memory_format(trained.config.train.channels_last)
    trained.model.to(memory_format=layout)
    failures: list[tuple[Path, str]] = []
    results: list[tuple[Path, np.ndarray, float, str, str]] = []  # maps kept, images re-read
    for start in tqdm(
        range(0, len(images), settings.batch_size), desc="predict", disable=not progress
    ):
        loaded = []
        for path in images[start : start + settings.batch_size]:
            try:
                loaded.append((path, load_image(path)))
            except DatasetError as err:
                failures.append((path, str(err)))
                log.warning("%s", err)
        if not loaded:
            continue
        batch = torch.stack([transform_image(image, size) for _, image in loaded]).to(
            torch_device, memory_format=layout
        )
        given = _class_ids(trained, class_name, len(loaded))
        given = None if given is None else given.to(torch_device)
        output, maps, scores = score_batch(trained.model, batch, given, trained.config)
        for i, (path, _) in enumerate(loaded):
            if output.class_ids is None:
                label, source = "", "not used (no memory)"
            else:
                label = trained.class_names[int(output.class_ids[i])]
                source = "given" if given is not None else "predicted by the memory"
            fused = maps.fused[i].float().cpu().numpy()
            results.append((path, fused, float(scores[i]), label, source))
    vmax = max((float(r[1].max()) for r in results), default=1.0)
    used: set[str] = set()
    rows = []
    for path, fused, score, label, source in results:
        overlay = out_dir / "overlays" / _unique_name(path.stem, used)
        save_overlay(overlay, load_image(path), fused, vmax)
        rows.append(
            {
                "image": str(path),
                "score": score,
                "class": label,
                "class_source": source,
                "overlay": str(overlay),
            }
        )
    scores_csv = out_dir / "scores.csv"
    write_csv(scores_csv, rows, CSV_COLUMNS)
    log.info("scored %d images into %s (%d unreadable)", len(rows), out_dir, len(failures))
    return PredictionRun(scores_csv, rows, failures)
