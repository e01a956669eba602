"""The drawing surface of the generated benchmark, and the primitives every renderer shares.

A sample is drawn on a canvas `SUPERSAMPLING` times the output size, in coordinates where the
image spans [-1, 1], and box-downsampled at the end; that is the whole anti-aliasing. Shapes are
signed distances turned into pixel coverage, colours are painted with per-pixel opacity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from mddnet.benchmark import portable

__all__ = [
    "LIGHT_ANGLE",
    "SUPERSAMPLING",
    "Grid",
    "Layer",
    "Scene",
    "blend",
    "coverage",
    "downsample",
    "log_uniform",
    "make_grid",
    "rgb255",
    "smooth_noise",
    "smoothstep",
]

# Shapes are drawn at this multiple of the output size and box-downsampled (anti-aliasing).
SUPERSAMPLING = 2
LIGHT_ANGLE = portable.arctan2(-0.8, -0.6)  # light from the upper left (image y points down)


@dataclass(frozen=True)
class Grid:
    """Pixel centres of the supersampled canvas, in units where the image spans [-1, 1]."""

    x: np.ndarray  # (N, N) float32, grows to the right
    y: np.ndarray  # (N, N) float32, grows downwards
    px: float  # width of one canvas pixel in those units

    @property
    def n(self) -> int:
        return self.x.shape[0]


def make_grid(image_size: int) -> Grid:
    n = image_size * SUPERSAMPLING
    axis = ((np.arange(n, dtype=np.float32) + 0.5) * (2.0 / n) - 1.0).astype(np.float32)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return Grid(x=x, y=y, px=2.0 / n)


class Layer(NamedTuple):
    """A rendering on the canvas and where the product's surface is (defects go there)."""

    rgb: np.ndarray  # (N, N, 3) float in [0, 1]
    support: np.ndarray  # (N, N) float in [0, 1]: object coverage, all ones for a texture


@dataclass(frozen=True)
class Scene:
    """A defect-free sample, as the defect functions need it."""

    grid: Grid
    params: Any  # the class's frozen parameter dataclass
    render: Callable[[Grid, Any], Layer]
    layer: Layer


def downsample(canvas: np.ndarray) -> np.ndarray:
    """Box filter from the supersampled canvas to the output size (the anti-aliasing step)."""
    k = SUPERSAMPLING
    return sum(canvas[i::k, j::k] for i in range(k) for j in range(k)) / k**2


def rgb255(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.float32) / 255.0


def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def coverage(sdf: np.ndarray, px: float) -> np.ndarray:
    """Fraction of a pixel inside a shape, from its signed distance (negative inside)."""
    return np.clip(0.5 - sdf / px, 0.0, 1.0)


def blend(rgb: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Paint `colour` ((3,) or (N, N, 3)) over `rgb` with per-pixel opacity `alpha` (N, N)."""
    a = alpha[..., None]
    return rgb * (1.0 - a) + colour * a


def smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Value noise in about [-1, 1] with `cells` features across the canvas; (n, n).

    Random values on a coarse lattice, upsampled bicubically by PIL (fast, and free of the BLAS
    thread start-up that makes small matrix products slow on a busy machine).
    """
    coarse = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((n, n), Image.Resampling.BICUBIC))


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A size spread evenly over scales, so small (subtle) defects are as common as big ones."""
    return float(portable.exp(rng.uniform(portable.log(low), portable.log(high))))
