"""Texture classes: random views of the grey photographs scikit-image ships, coloured.

Each normal image is a rotated, flipped crop of the photograph (brick, grass or gravel) at a
random place and scale, mapped through a colour ramp to a plausible material, with a little
brightness and white-balance jitter. scikit-image ships the photographs, so nothing is downloaded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import data as skdata

from mddnet.benchmark import portable
from mddnet.benchmark.canvas import Grid, Layer

__all__ = ["TextureView", "render_texture", "sample_texture"]

# Colour ramps (grey level -> RGB) that turn the grey photographs into plausible materials.
_TEXTURE_RAMPS: dict[str, tuple[tuple[float, ...], tuple[tuple[int, int, int], ...]]] = {
    "brick": (
        (0.0, 0.3, 0.55, 0.85),
        ((45, 18, 12), (128, 52, 36), (178, 92, 64), (214, 204, 186)),
    ),
    "grass": ((0.0, 0.35, 0.7, 1.0), ((10, 22, 6), (48, 92, 22), (112, 160, 58), (206, 222, 140))),
    "gravel": (
        (0.0, 0.35, 0.7, 1.0),
        ((28, 26, 24), (104, 98, 90), (170, 164, 152), (236, 232, 222)),
    ),
}


@functools.cache
def _texture_source(name: str) -> np.ndarray:
    """The grey photograph, (512, 512) float32 in [0, 1]; scikit-image ships it (no download)."""
    return getattr(skdata, name)().astype(np.float32) / 255.0


@functools.cache
def _texture_lut(name: str) -> np.ndarray:
    """The colour ramp tabulated at 1024 grey levels, (1024, 3); a look-up beats interpolation."""
    stops, colours = _TEXTURE_RAMPS[name]
    palette = np.array(colours, dtype=np.float32) / 255.0
    grey = np.linspace(0.0, 1.0, 1024)
    return np.stack([np.interp(grey, stops, palette[:, i]) for i in range(3)], axis=-1).astype(
        np.float32
    )


@dataclass(frozen=True)
class TextureView:
    """Where a normal texture image is cut from the photograph, and how it is lit."""

    name: str
    centre: tuple[float, float]  # (row, col) in photograph pixels
    side: float  # crop side in photograph pixels
    angle: float
    flip: tuple[float, float]  # +1 or -1 per axis
    gain: float  # brightness jitter
    tint: np.ndarray  # (3,) white-balance jitter


def sample_texture(name: str, rng: np.random.Generator, grid: Grid) -> TextureView:
    source = _texture_source(name)
    side = rng.uniform(0.42, 0.55) * min(source.shape)
    angle = rng.uniform(-0.14, 0.14)
    reach = (
        side / 2 * (abs(portable.cos(angle)) + abs(portable.sin(angle)))
    )  # half-extent of the crop
    centre = (
        rng.uniform(reach, source.shape[0] - reach),
        rng.uniform(reach, source.shape[1] - reach),
    )
    flip = (float(rng.choice([-1, 1])), float(rng.choice([-1, 1])))
    return TextureView(
        name=name,
        centre=centre,
        side=side,
        angle=angle,
        flip=flip,
        gain=rng.uniform(0.9, 1.1),
        tint=rng.uniform(0.985, 1.015, 3).astype(np.float32),
    )


def render_texture(grid: Grid, view: TextureView) -> Layer:
    half = view.side / 2
    sx, sy = grid.x * half * view.flip[0], grid.y * half * view.flip[1]
    c, s = portable.cos(view.angle), portable.sin(view.angle)
    rows = view.centre[0] + s * sx + c * sy
    cols = view.centre[1] + c * sx - s * sy
    grey = ndimage.map_coordinates(_texture_source(view.name), [rows, cols], order=1)
    grey = np.clip(grey * view.gain, 0.0, 1.0)
    rgb = _texture_lut(view.name)[np.round(grey * 1023).astype(np.intp)]  # (N, N, 3)
    rgb = np.clip(rgb * view.tint, 0.0, 1.0)
    return Layer(rgb=rgb, support=np.ones(grey.shape, dtype=np.float32))
