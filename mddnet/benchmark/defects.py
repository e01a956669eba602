"""Surface defects of the generated benchmark, painted on a defect-free rendering.

Scratches, cracks, stains (oil, rust, dye, dry patches), holes and foreign particles, over a range
of sizes and contrasts that includes subtle ones, and only where the product's surface is. They
are deliberately NOT the training-time synthesis (Perlin masks filled with a foreign texture,
`mddnet.data.anomalies`), so the benchmark does not reward learning that synthesis. Defects that
change an object's shape live with the object (`objects.py`).

Each defect function takes the `Scene` and the sample's random stream and returns the defective
canvas (N, N, 3); `classes.py` derives the mask from it.
"""

from __future__ import annotations

import functools

import numpy as np

from mddnet.benchmark import portable
from mddnet.benchmark.canvas import (
    LIGHT_ANGLE,
    SUPERSAMPLING,
    Grid,
    Scene,
    blend,
    coverage,
    log_uniform,
    rgb255,
    smooth_noise,
    smoothstep,
)

__all__ = ["contamination", "crack", "hole", "scratch", "stain"]


# ---------------------------------------------------------------------------------------------
# Shapes


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]  # (N, N)


def _random_point(
    grid: Grid, support: np.ndarray, rng: np.random.Generator, inset: float = 0.85
) -> tuple[float, float]:
    """A point drawn uniformly on the product's surface, away from the image border."""
    inside = (support >= 0.999) & (np.abs(grid.x) < inset) & (np.abs(grid.y) < inset)
    index = rng.choice(np.flatnonzero(inside))
    return float(grid.x.flat[index]), float(grid.y.flat[index])


def _blob_sdf(
    grid: Grid,
    centre: tuple[float, float],
    radius: float,
    rng: np.random.Generator,
    irregularity: float = 0.3,
) -> np.ndarray:
    """Approximate signed distance of a blob: a circle whose radius wobbles with the angle."""
    dx, dy = grid.x - centre[0], grid.y - centre[1]
    theta = portable.arctan2(dy, dx)
    harmonics = np.arange(2, 6)
    amplitude = rng.uniform(0.0, irregularity, harmonics.size) / (harmonics - 1)
    phase = rng.uniform(0.0, 2 * np.pi, harmonics.size)
    wobble = sum(
        a * portable.cos(k * theta + p)
        for k, a, p in zip(harmonics, amplitude, phase, strict=True)
    )
    return portable.hypot(dx, dy) - radius * (1.0 + wobble)


def _random_curve(
    rng: np.random.Generator, start: tuple[float, float], length: float, bend: float, jitter: float
) -> np.ndarray:
    """A quadratic Bezier from `start` (optionally jagged, as a crack is); (K, 2) points."""
    heading = rng.uniform(0.0, 2 * np.pi)
    p0 = np.array(start)
    p2 = p0 + length * np.array([portable.cos(heading), portable.sin(heading)])
    normal = np.array([-portable.sin(heading), portable.cos(heading)])
    p1 = (p0 + p2) / 2 + normal * rng.uniform(-bend, bend) * length
    t = np.linspace(0.0, 1.0, 24)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    points[1:-1] += normal * rng.normal(0.0, jitter * length, (len(t) - 2, 1))
    return points


def _polyline_coverage(grid: Grid, points: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased coverage of a polyline of the given width (image units); (N, N).

    Only the curve's bounding box is evaluated, since a scratch covers a small part of the canvas.
    """
    margin = width + 2 * grid.px
    lo, hi = points.min(axis=0) - margin, points.max(axis=0) + margin
    cols = np.flatnonzero((grid.x[0] >= lo[0]) & (grid.x[0] <= hi[0]))
    rows = np.flatnonzero((grid.y[:, 0] >= lo[1]) & (grid.y[:, 0] <= hi[1]))
    cover = np.zeros((grid.n, grid.n), dtype=np.float32)
    if cols.size == 0 or rows.size == 0:
        return cover
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    x, y = grid.x[box], grid.y[box]
    distance = np.full(x.shape, np.inf, dtype=np.float32)
    for a, b in zip(points[:-1], points[1:], strict=True):
        ab = b - a
        t = np.clip(
            ((x - a[0]) * ab[0] + (y - a[1]) * ab[1]) / max(portable.dot(ab, ab), 1e-12), 0.0, 1.0
        )
        distance = np.minimum(distance, portable.hypot(x - a[0] - t * ab[0], y - a[1] - t * ab[1]))
    cover[box] = coverage(distance - width / 2, grid.px)
    return cover


# ---------------------------------------------------------------------------------------------
# Defects


def _line(
    scene: Scene,
    rng: np.random.Generator,
    *,
    lighter: bool,
    length: tuple[float, float],
    width_px: tuple[float, float],
    strength: tuple[float, float],
    jitter: float,
) -> np.ndarray:
    """A scratch (lighter: bare material shows) or a crack (darker, jagged) on the surface."""
    grid, layer = scene.grid, scene.layer
    start = _random_point(grid, layer.support, rng)
    points = _random_curve(rng, start, log_uniform(rng, *length), bend=0.3, jitter=jitter)
    width = rng.uniform(*width_px) * SUPERSAMPLING * grid.px
    alpha = _polyline_coverage(grid, points, width) * layer.support * rng.uniform(*strength)
    target = np.ones(3, dtype=np.float32) if lighter else np.zeros(3, dtype=np.float32)
    return blend(layer.rgb, target, alpha)


scratch = functools.partial(
    _line, lighter=True, length=(0.12, 1.0), width_px=(0.6, 2.2), strength=(0.2, 0.7), jitter=0.0
)
crack = functools.partial(
    _line, lighter=False, length=(0.1, 0.9), width_px=(0.6, 2.5), strength=(0.3, 0.85), jitter=0.02
)


def stain(
    scene: Scene,
    rng: np.random.Generator,
    *,
    colours: tuple[np.ndarray, ...],
    radius: tuple[float, float],
    opacity: tuple[float, float],
    softness: float,
) -> np.ndarray:
    """A soft-edged, mottled blot (oil, dried patch, rust, dye) that keeps the surface's grain."""
    grid, layer = scene.grid, scene.layer
    r = log_uniform(rng, *radius)
    d = _blob_sdf(grid, _random_point(grid, layer.support, rng), r, rng)
    mottle = 0.75 + 0.25 * smooth_noise(rng, grid.n, 12)
    alpha = smoothstep(-d / (softness * r)) * mottle * layer.support * rng.uniform(*opacity)
    colour = colours[rng.integers(len(colours))]
    # Tinted by the surface's own brightness, so texture detail stays visible through the stain.
    target = colour * (0.55 + 0.9 * _luminance(layer.rgb))[..., None]
    return blend(layer.rgb, np.clip(target, 0.0, 1.0), alpha)


def hole(
    scene: Scene, rng: np.random.Generator, *, radius: tuple[float, float] = (0.02, 0.15)
) -> np.ndarray:
    """A pit: a dark cavity whose far wall catches the light, with a lit rim on the near side."""
    grid, layer = scene.grid, scene.layer
    r = log_uniform(rng, *radius)
    cx, cy = _random_point(grid, layer.support, rng)
    d = _blob_sdf(grid, (cx, cy), r, rng, irregularity=0.4)
    light_x, light_y = portable.cos(LIGHT_ANGLE), portable.sin(LIGHT_ANGLE)
    towards_light = ((grid.x - cx) * light_x + (grid.y - cy) * light_y) / r  # about [-1, 1]
    depth = rng.uniform(0.15, 0.5)
    cavity = layer.rgb * (depth * (1.0 - 0.5 * np.clip(towards_light, -1, 1)))[..., None]
    rim = portable.exp(-((d / (0.25 * r)) ** 2)) * np.clip(-towards_light, 0.0, 1.0) * (d > 0)
    rgb = blend(layer.rgb, np.ones(3, dtype=np.float32), 0.35 * rim * layer.support)
    return blend(rgb, cavity, coverage(d, grid.px) * layer.support)


_FOREIGN_COLOURS = (
    rgb255(245, 245, 240),
    rgb255(18, 18, 20),
    rgb255(40, 90, 210),
    rgb255(230, 120, 20),
)


def contamination(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Foreign particles: a few specks and fibres of a colour foreign to the product."""
    grid, layer = scene.grid, scene.layer
    cx, cy = _random_point(grid, layer.support, rng, inset=0.75)
    spread = log_uniform(rng, 0.02, 0.15)
    rgb = layer.rgb
    for _ in range(int(rng.integers(1, 9))):
        at = (cx + rng.normal(0.0, spread), cy + rng.normal(0.0, spread))
        colour = _FOREIGN_COLOURS[rng.integers(len(_FOREIGN_COLOURS))]
        if rng.random() < 0.3:  # a fibre
            points = _random_curve(rng, at, rng.uniform(0.05, 0.18), bend=0.5, jitter=0.0)
            cover = _polyline_coverage(grid, points, rng.uniform(0.6, 1.2) * 2 * grid.px)
        else:  # a speck
            r = log_uniform(rng, 0.006, 0.035)
            cover = coverage(_blob_sdf(grid, at, r, rng, irregularity=0.5), grid.px)
        rgb = blend(rgb, colour, cover * layer.support * rng.uniform(0.7, 1.0))
    return rgb
