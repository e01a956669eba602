"""What an evaluated run produced, image by image, and its file: numpy only, so that figures and
tables read predictions without importing torch or the model."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mddnet.io import write_bytes

__all__ = ["Predictions", "load_predictions", "save_predictions"]


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
    fused: np.ndarray  # (N, H, W) float16 fused anomaly maps (what the scores come from)
    teacher_restoration: np.ndarray  # (N, H, W) float16, blurred, not normalised
    restoration_identity: np.ndarray  # (N, H, W) float16; zeros without identity decoder


def save_predictions(path: str | Path, predictions: Predictions) -> None:
    """Write predictions as one compressed .npz, atomically."""
    buffer = io.BytesIO()
    arrays = {
        f.name: np.asarray(getattr(predictions, f.name)) for f in dataclasses.fields(Predictions)
    }
    np.savez_compressed(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def load_predictions(path: str | Path) -> Predictions:
    """Read predictions written by `save_predictions`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions not found (run the evaluate stage first)")
    with np.load(path, allow_pickle=False) as data:
        values = {name: data[name] for name in data.files}
    values["class_names"] = tuple(str(c) for c in values["class_names"])
    values["paths"] = tuple(str(p) for p in values["paths"])
    return Predictions(**values)
