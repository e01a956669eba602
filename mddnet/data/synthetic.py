"""Generated offline benchmark: textures and objects in MVTec AD layout with exact defect masks.

Not a box of the paper: MDD-Net is evaluated on MVTec AD, VisA and other real datasets [paper].
This generator stands in for them on a fresh clone without data [ours], so the whole pipeline (one
model trained on the normal images of all classes, then image and pixel metrics per class) runs
through the same code path as real data. Three texture classes are built on the real photographs
scikit-image ships (brick, grass, gravel); three object classes are drawn procedurally (washer,
gear, capsule) with anti-aliased shapes, shading, a lit backdrop and sensor noise.

The defects are deliberately NOT the training-time synthesis (Perlin masks filled with a foreign
texture, `anomalies.py`): cracks, scratches, holes, stains, contamination, rust, colour spots, a
chipped rim, a broken tooth, extra material and a misplaced part, over a range of sizes and
contrasts that includes subtle ones. Each defective sample is rendered twice from the same random
draws, once clean and once with the defect, and its mask is computed from the difference of the two
renderings, so the mask covers every pixel the defect changed by construction.

Every sample has its own random stream, `default_rng([seed, class, split, index])`, so a class's
images do not depend on which other classes are generated or on their counts.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata

from mddnet.config import BenchmarkConfig

__all__ = [
    "DEFECT_TYPES",
    "GENERATOR_VERSION",
    "KNOWN_CLASSES",
    "MASK_TOLERANCE",
    "MIN_DEFECT_AREA",
    "OBJECTS",
    "SPLITS",
    "TEXTURES",
    "BenchmarkSummary",
    "ClassSummary",
    "SampleRendering",
    "make_benchmark",
    "render_sample",
    "sample_path",
]

log = logging.getLogger(__name__)

GENERATOR = "mddnet.data.synthetic"
# Bump when a change alters any generated pixel, so that stale benchmarks can be told apart.
GENERATOR_VERSION = 1

TEXTURES = ("brick", "grass", "gravel")
OBJECTS = ("washer", "gear", "capsule")
# Append new classes at the end: a class's position seeds its random streams.
KNOWN_CLASSES = TEXTURES + OBJECTS
SPLITS = ("train", "test_good", "test_defect")

# A pixel is defective when some channel changed by more than this many grey levels (of 255):
# the faint fringe of a soft stain below it is invisible and left out of the mask.
MASK_TOLERANCE = 8
# A defect that changes less than this fraction of the image (e.g. a stain of the surface's own
# colour) is drawn again, so no defective image is indistinguishable from a normal one; 4 pixels
# at 128 px, at least one pixel at any size.
MIN_DEFECT_AREA = 4 / 128**2
_MAX_DEFECT_ATTEMPTS = 50

# Shapes are drawn at this multiple of the output size and box-downsampled (anti-aliasing).
_SUPERSAMPLING = 2
_NOISE_SIGMA = 1.5 / 255  # sensor noise, added identically to both renderings of a sample
_LIGHT_ANGLE = math.atan2(-0.8, -0.6)  # light from the upper left (image y points down)


# ---------------------------------------------------------------------------------------------
# Public results


class SampleRendering(NamedTuple):
    """One generated sample: its defect-free rendering and, for a defective sample, the rest.

    `defective` and `mask` are None for normal samples (splits train and test_good).
    """

    normal: np.ndarray  # (H, W, 3) uint8
    defective: np.ndarray | None  # (H, W, 3) uint8
    mask: np.ndarray | None  # (H, W) uint8, 0 or 255
    defect_type: str | None


@dataclass(frozen=True)
class ClassSummary:
    """Image counts of one generated class."""

    kind: str  # texture | object
    train_good: int
    test_good: int
    test_defects: Mapping[str, int]  # defect type -> number of images


@dataclass(frozen=True)
class BenchmarkSummary:
    """What `make_benchmark` wrote; `to_json()` is the content of `<root>/benchmark.json`."""

    root: Path
    seed: int
    image_size: int
    classes: Mapping[str, ClassSummary]

    def to_json(self) -> dict[str, Any]:
        return {
            "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION,
            "seed": self.seed,
            "image_size": self.image_size,
            "mask_tolerance": MASK_TOLERANCE,
            "classes": {name: dataclasses.asdict(c) for name, c in self.classes.items()},
        }


# ---------------------------------------------------------------------------------------------
# Drawing primitives


@dataclass(frozen=True)
class _Grid:
    """Pixel centres of the supersampled canvas, in units where the image spans [-1, 1]."""

    x: np.ndarray  # (N, N) float32, grows to the right
    y: np.ndarray  # (N, N) float32, grows downwards
    px: float  # width of one canvas pixel in those units

    @property
    def n(self) -> int:
        return self.x.shape[0]


def _make_grid(image_size: int) -> _Grid:
    n = image_size * _SUPERSAMPLING
    axis = ((np.arange(n, dtype=np.float32) + 0.5) * (2.0 / n) - 1.0).astype(np.float32)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return _Grid(x=x, y=y, px=2.0 / n)


class _Layer(NamedTuple):
    """A rendering on the canvas and where the product's surface is (defects go there)."""

    rgb: np.ndarray  # (N, N, 3) float in [0, 1]
    support: np.ndarray  # (N, N) float in [0, 1]: object coverage, all ones for a texture


def _rgb(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.float32) / 255.0


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _coverage(sdf: np.ndarray, px: float) -> np.ndarray:
    """Fraction of a pixel inside a shape, from its signed distance (negative inside)."""
    return np.clip(0.5 - sdf / px, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Value noise in about [-1, 1] with `cells` features across the canvas; (n, n).

    Random values on a coarse lattice, upsampled bicubically by PIL (fast, and free of the BLAS
    thread start-up that makes small matrix products slow on a busy machine).
    """
    coarse = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((n, n), Image.Resampling.BICUBIC))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A size spread evenly over scales, so small (subtle) defects are as common as big ones."""
    return float(np.exp(rng.uniform(math.log(low), math.log(high))))


def _blend(rgb: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Paint `colour` ((3,) or (N, N, 3)) over `rgb` with per-pixel opacity `alpha` (N, N)."""
    a = alpha[..., None]
    return rgb * (1.0 - a) + colour * a


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]  # (N, N)


def _random_point(
    grid: _Grid, support: np.ndarray, rng: np.random.Generator, inset: float = 0.85
) -> tuple[float, float]:
    """A point drawn uniformly on the product's surface, away from the image border."""
    inside = (support >= 0.999) & (np.abs(grid.x) < inset) & (np.abs(grid.y) < inset)
    index = rng.choice(np.flatnonzero(inside))
    return float(grid.x.flat[index]), float(grid.y.flat[index])


def _blob_sdf(
    grid: _Grid,
    centre: tuple[float, float],
    radius: float,
    rng: np.random.Generator,
    irregularity: float = 0.3,
) -> np.ndarray:
    """Approximate signed distance of a blob: a circle whose radius wobbles with the angle."""
    dx, dy = grid.x - centre[0], grid.y - centre[1]
    theta = np.arctan2(dy, dx)
    harmonics = np.arange(2, 6)
    amplitude = rng.uniform(0.0, irregularity, harmonics.size) / (harmonics - 1)
    phase = rng.uniform(0.0, 2 * np.pi, harmonics.size)
    wobble = sum(
        a * np.cos(k * theta + p) for k, a, p in zip(harmonics, amplitude, phase, strict=True)
    )
    return np.hypot(dx, dy) - radius * (1.0 + wobble)


def _random_curve(
    rng: np.random.Generator, start: tuple[float, float], length: float, bend: float, jitter: float
) -> np.ndarray:
    """A quadratic Bezier from `start` (optionally jagged, as a crack is); (K, 2) points."""
    heading = rng.uniform(0.0, 2 * np.pi)
    p0 = np.array(start)
    p2 = p0 + length * np.array([np.cos(heading), np.sin(heading)])
    normal = np.array([-np.sin(heading), np.cos(heading)])
    p1 = (p0 + p2) / 2 + normal * rng.uniform(-bend, bend) * length
    t = np.linspace(0.0, 1.0, 24)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    points[1:-1] += normal * rng.normal(0.0, jitter * length, (len(t) - 2, 1))
    return points


def _polyline_coverage(grid: _Grid, points: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased coverage of a polyline of the given width (image units); (N, N).

    Only the curve's bounding box is evaluated, since a scratch covers a small part of the canvas.
    """
    margin = width + 2 * grid.px
    lo, hi = points.min(axis=0) - margin, points.max(axis=0) + margin
    cols = np.flatnonzero((grid.x[0] >= lo[0]) & (grid.x[0] <= hi[0]))
    rows = np.flatnonzero((grid.y[:, 0] >= lo[1]) & (grid.y[:, 0] <= hi[1]))
    coverage = np.zeros((grid.n, grid.n), dtype=np.float32)
    if cols.size == 0 or rows.size == 0:
        return coverage
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    x, y = grid.x[box], grid.y[box]
    distance = np.full(x.shape, np.inf, dtype=np.float32)
    for a, b in zip(points[:-1], points[1:], strict=True):
        ab = b - a
        t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1]) / max(ab @ ab, 1e-12), 0.0, 1.0)
        distance = np.minimum(distance, np.hypot(x - a[0] - t * ab[0], y - a[1] - t * ab[1]))
    coverage[box] = _coverage(distance - width / 2, grid.px)
    return coverage


# ---------------------------------------------------------------------------------------------
# Textures: random views of scikit-image's photographs, coloured


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
class _TextureView:
    """Where a normal texture image is cut from the photograph, and how it is lit."""

    name: str
    centre: tuple[float, float]  # (row, col) in photograph pixels
    side: float  # crop side in photograph pixels
    angle: float
    flip: tuple[float, float]  # +1 or -1 per axis
    gain: float  # brightness jitter
    tint: np.ndarray  # (3,) white-balance jitter


def _sample_texture(name: str, rng: np.random.Generator, grid: _Grid) -> _TextureView:
    source = _texture_source(name)
    side = rng.uniform(0.42, 0.55) * min(source.shape)
    angle = rng.uniform(-0.14, 0.14)
    reach = side / 2 * (abs(math.cos(angle)) + abs(math.sin(angle)))  # half-extent of the crop
    centre = (
        rng.uniform(reach, source.shape[0] - reach),
        rng.uniform(reach, source.shape[1] - reach),
    )
    flip = (float(rng.choice([-1, 1])), float(rng.choice([-1, 1])))
    return _TextureView(
        name=name,
        centre=centre,
        side=side,
        angle=angle,
        flip=flip,
        gain=rng.uniform(0.9, 1.1),
        tint=rng.uniform(0.985, 1.015, 3).astype(np.float32),
    )


def _render_texture(grid: _Grid, view: _TextureView) -> _Layer:
    half = view.side / 2
    sx, sy = grid.x * half * view.flip[0], grid.y * half * view.flip[1]
    c, s = math.cos(view.angle), math.sin(view.angle)
    rows = view.centre[0] + s * sx + c * sy
    cols = view.centre[1] + c * sx - s * sy
    grey = ndimage.map_coordinates(_texture_source(view.name), [rows, cols], order=1)
    grey = np.clip(grey * view.gain, 0.0, 1.0)
    rgb = _texture_lut(view.name)[np.round(grey * 1023).astype(np.intp)]  # (N, N, 3)
    rgb = np.clip(rgb * view.tint, 0.0, 1.0)
    return _Layer(rgb=rgb, support=np.ones(grey.shape, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Objects: shared pose, backdrop, shadow and metal shading


@dataclass(frozen=True)
class _Pose:
    """Where an object lies: centre, rotation, size (image units) and light direction."""

    centre: tuple[float, float]
    angle: float
    scale: float
    light: tuple[float, float]  # unit vector towards the light, image coordinates


def _sample_pose(
    rng: np.random.Generator, scale: float, angle: tuple[float, float], shift: float = 0.06
) -> _Pose:
    light = _LIGHT_ANGLE + rng.uniform(-0.3, 0.3)
    return _Pose(
        centre=(rng.uniform(-shift, shift), rng.uniform(-shift, shift)),
        angle=rng.uniform(*angle),
        scale=scale * rng.uniform(0.95, 1.05),
        light=(math.cos(light), math.sin(light)),
    )


def _object_frame(grid: _Grid, pose: _Pose, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Canvas coordinates in the object's own frame.

    `offset` moves the object away from the light, which places its shadow.
    """
    dx = grid.x - pose.centre[0] + offset * pose.light[0]
    dy = grid.y - pose.centre[1] + offset * pose.light[1]
    c, s = math.cos(pose.angle), math.sin(pose.angle)
    return (c * dx + s * dy) / pose.scale, (-s * dx + c * dy) / pose.scale


def _backdrop(
    rng: np.random.Generator, grid: _Grid, colour: np.ndarray, pose: _Pose
) -> np.ndarray:
    """A matte surface lit unevenly from the light's side, with a faint grain; (N, N, 3)."""
    lighting = 1.0 + 0.1 * (grid.x * pose.light[0] + grid.y * pose.light[1])
    grain = 0.03 * _smooth_noise(rng, grid.n, 5) + 0.02 * _smooth_noise(rng, grid.n, 48)
    return (colour * rng.uniform(0.92, 1.08) * (lighting + grain)[..., None]).astype(np.float32)


def _composite(
    grid: _Grid,
    pose: _Pose,
    backdrop: np.ndarray,
    sdf: Callable[[np.ndarray, np.ndarray], np.ndarray],
    surface: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
) -> _Layer:
    """Lay an object (signed distance `sdf`, colours `surface(u, v, d)`) on its backdrop.

    The object casts a soft shadow away from the light; a missing or moved part moves its shadow
    too, and the mask includes that change like any other.
    """
    u, v = _object_frame(grid, pose)
    d = sdf(u, v)  # (N, N) object units
    cover = _coverage(d * pose.scale, grid.px)
    shadow = _smoothstep(0.5 - sdf(*_object_frame(grid, pose, 0.04)) * pose.scale / 0.08)
    background = backdrop * (1.0 - 0.4 * shadow)[..., None]
    rgb = _blend(background, surface(u, v, d), cover)
    return _Layer(rgb=np.clip(rgb, 0.0, 1.0).astype(np.float32), support=cover)


def _metal(
    colour: np.ndarray,
    turning: np.ndarray,
    pose: _Pose,
    grid: _Grid,
    u: np.ndarray,
    v: np.ndarray,
    d: np.ndarray,
) -> np.ndarray:
    """Turned metal: concentric tool marks, lit bevels along every edge, a broad highlight."""
    rho = np.hypot(u, v)
    marks = np.interp(rho, np.linspace(0.0, 1.2, turning.size), turning)
    gy, gx = np.gradient(d)  # points out of the material; canvas axes are image axes
    norm = np.maximum(np.hypot(gx, gy), 1e-9)
    facing = (gx * pose.light[0] + gy * pose.light[1]) / norm  # bevel normal . light
    bevel = np.clip(1.0 + d / 0.07, 0.0, 1.0)
    hx = pose.centre[0] + 0.4 * pose.scale * pose.light[0]
    hy = pose.centre[1] + 0.4 * pose.scale * pose.light[1]
    highlight = np.exp(-((grid.x - hx) ** 2 + (grid.y - hy) ** 2) / (2 * (0.3 * pose.scale) ** 2))
    shade = 0.78 + 0.05 * marks + 0.4 * bevel * facing + 0.3 * highlight
    return colour * shade[..., None]


def _turning_marks(rng: np.random.Generator) -> np.ndarray:
    marks = ndimage.gaussian_filter1d(rng.normal(0.0, 1.0, 300), 1.2)
    return (marks / marks.std()).astype(np.float32)


def _jitter(rng: np.random.Generator, colour: np.ndarray, brightness: float = 0.08) -> np.ndarray:
    """Sample-to-sample colour variation: overall brightness and a faint cast (+-1.5 %)."""
    cast = rng.uniform(0.985, 1.015, 3).astype(np.float32)
    return colour * rng.uniform(1 - brightness, 1 + brightness) * cast


# --- washer: a turned steel ring -------------------------------------------------------------

_WASHER_COLOUR = _rgb(176, 178, 184)
_WASHER_BACKDROP = _rgb(64, 70, 78)


@dataclass(frozen=True)
class _Washer:
    pose: _Pose
    inner: float  # hole radius / outer radius
    colour: np.ndarray
    turning: np.ndarray
    backdrop: np.ndarray
    chip: tuple[float, float, float] | None = None  # (u, v, radius) of a bite, object frame


def _sample_washer(rng: np.random.Generator, grid: _Grid) -> _Washer:
    pose = _sample_pose(rng, scale=0.6, angle=(0.0, 2 * np.pi))
    return _Washer(
        pose=pose,
        inner=rng.uniform(0.44, 0.48),
        colour=_jitter(rng, _WASHER_COLOUR),
        turning=_turning_marks(rng),
        backdrop=_backdrop(rng, grid, _WASHER_BACKDROP, pose),
    )


def _washer_sdf(washer: _Washer, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho = np.hypot(u, v)
    d = np.maximum(rho - 1.0, washer.inner - rho)
    if washer.chip is not None:
        cu, cv, radius = washer.chip
        d = np.maximum(d, radius - np.hypot(u - cu, v - cv))
    return d


def _render_washer(grid: _Grid, washer: _Washer) -> _Layer:
    return _composite(
        grid,
        washer.pose,
        washer.backdrop,
        functools.partial(_washer_sdf, washer),
        functools.partial(_metal, washer.colour, washer.turning, washer.pose, grid),
    )


def _chip_washer(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Missing part: a bite broken out of the outer (mostly) or inner rim."""
    washer = scene.params
    outer = rng.random() < 0.7
    radius = _log_uniform(rng, 0.05, 0.25)
    # Bites whose centre lies beyond the rim are shallow: the subtle end of the range.
    depth = rng.uniform(-0.3, 0.7) * radius
    at = 1.0 + depth if outer else washer.inner - depth
    phi = rng.uniform(0.0, 2 * np.pi)
    chipped = dataclasses.replace(washer, chip=(at * math.cos(phi), at * math.sin(phi), radius))
    return scene.render(scene.grid, chipped).rgb


# --- gear: a brass spur gear with a keyed bore and lightening holes ---------------------------

_GEAR_COLOUR = _rgb(204, 164, 92)
_GEAR_BACKDROP = _rgb(150, 156, 162)
_TEETH = 14
_ROOT, _TOOTH = 0.84, 0.16  # root radius and tooth height (tip radius 1)
_TIP_HALF, _ROOT_HALF = 0.17, 0.3  # tooth half-widths at tip and root, in tooth periods
_BORE = 0.17
_HOLES, _HOLE_AT, _HOLE_RADIUS = 5, 0.57, 0.1


@dataclass(frozen=True)
class _Gear:
    pose: _Pose
    colour: np.ndarray
    turning: np.ndarray
    backdrop: np.ndarray
    broken: tuple[int, float] | None = None  # (tooth, fraction of its height left)
    extra: tuple[int, float] | None = None  # (gap after tooth, fraction of the gap filled)


def _sample_gear(rng: np.random.Generator, grid: _Grid) -> _Gear:
    pose = _sample_pose(rng, scale=0.62, angle=(0.0, 2 * np.pi))
    return _Gear(
        pose=pose,
        colour=_jitter(rng, _GEAR_COLOUR),
        turning=_turning_marks(rng),
        backdrop=_backdrop(rng, grid, _GEAR_BACKDROP, pose),
    )


def _gear_sdf(gear: _Gear, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho = np.maximum(np.hypot(u, v), 1e-6)
    t = np.arctan2(v, u) * (_TEETH / (2 * np.pi))  # position in tooth periods
    nearest = np.round(t)
    tooth = nearest.astype(int) % _TEETH
    phase = t - nearest  # [-0.5, 0.5], 0 at a tooth's centre line
    ramp = _ROOT_HALF - _TIP_HALF
    height = np.clip((_ROOT_HALF - np.abs(phase)) / ramp, 0.0, 1.0)
    # d height / d angle on the flanks: it corrects the radial distance into a true distance.
    slope = np.where((height > 0) & (height < 1), -np.sign(phase) / ramp, 0.0)
    if gear.broken is not None:
        index, left = gear.broken
        hit = tooth == index
        height = np.where(hit, height * left, height)
        slope = np.where(hit, slope * left, slope)
    if gear.extra is not None:
        index, fill = gear.extra
        in_gap = (np.floor(t).astype(int) % _TEETH == index) & (height < fill)
        height = np.where(in_gap, fill, height)
        slope = np.where(in_gap, 0.0, slope)
    # Only in the teeth's ring: inside the root circle the nearest edge is not a flank.
    radial_slope = np.where(rho > _ROOT, _TOOTH * slope * _TEETH / (2 * np.pi) / rho, 0.0)
    d = (rho - _ROOT - _TOOTH * height) / np.sqrt(1.0 + radial_slope**2)
    d = np.maximum(d, _BORE - rho)
    keyway = np.maximum(np.abs(u - _BORE) - 0.06, np.abs(v) - 0.04)
    d = np.maximum(d, -keyway)
    angles = np.arange(_HOLES) * (2 * np.pi / _HOLES) + np.pi / _HOLES
    for a in angles:
        hole = np.hypot(u - _HOLE_AT * math.cos(a), v - _HOLE_AT * math.sin(a)) - _HOLE_RADIUS
        d = np.maximum(d, -hole)
    return d


def _gear_surface(
    gear: _Gear, grid: _Grid, u: np.ndarray, v: np.ndarray, d: np.ndarray
) -> np.ndarray:
    metal = _metal(gear.colour, gear.turning, gear.pose, grid, u, v, d)
    groove = 1.0 - 0.18 * np.exp(-(((np.hypot(u, v) - 0.33) / 0.015) ** 2))  # hub step
    return metal * groove[..., None]


def _render_gear(grid: _Grid, gear: _Gear) -> _Layer:
    return _composite(
        grid,
        gear.pose,
        gear.backdrop,
        functools.partial(_gear_sdf, gear),
        functools.partial(_gear_surface, gear, grid),
    )


def _break_tooth(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Missing part: a tooth broken off, from its root (gone) to its tip (worn, subtle)."""
    left = rng.uniform(0.0, 0.7)
    broken = dataclasses.replace(scene.params, broken=(int(rng.integers(_TEETH)), left))
    return scene.render(scene.grid, broken).rgb


def _fill_gap(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Extra part: casting flash filling the gap between two teeth, low (subtle) to full."""
    extra = dataclasses.replace(
        scene.params, extra=(int(rng.integers(_TEETH)), rng.uniform(0.3, 1.0))
    )
    return scene.render(scene.grid, extra).rgb


# --- capsule: a two-colour hard gelatine capsule --------------------------------------------

_CAP_COLOUR = _rgb(176, 38, 40)
_BODY_COLOUR = _rgb(236, 228, 206)
_CAPSULE_BACKDROP = _rgb(196, 198, 194)
_CAPSULE_RADIUS, _CAP_RADIUS = 0.31, 0.325
_SEAM = -0.1  # where the cap ends along the capsule's axis (tip at -1, other tip at +1)


@dataclass(frozen=True)
class _Capsule:
    pose: _Pose
    cap_colour: np.ndarray
    body_colour: np.ndarray
    backdrop: np.ndarray
    cap_shift: float = 0.0  # how far the cap is pulled off along the axis (object units)
    cap_tilt: float = 0.0  # cap rotated about the seam (radians)


def _sample_capsule(rng: np.random.Generator, grid: _Grid) -> _Capsule:
    pose = _sample_pose(rng, scale=0.66, angle=(-0.1, 0.1), shift=0.05)
    return _Capsule(
        pose=pose,
        cap_colour=_jitter(rng, _CAP_COLOUR, 0.06),
        body_colour=_jitter(rng, _BODY_COLOUR, 0.04),
        backdrop=_backdrop(rng, grid, _CAPSULE_BACKDROP, pose),
    )


def _cap_frame(capsule: _Capsule, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(capsule.cap_tilt), math.sin(capsule.cap_tilt)
    du = u - _SEAM
    return c * du + s * v + _SEAM + capsule.cap_shift, -s * du + c * v


def _tube(
    u: np.ndarray, v: np.ndarray, start: float, end: float, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance of a round-ended tube along u, and its 3-D surface normal; (N, N, 3)."""
    du = u - np.clip(u, start, end)
    dist = np.hypot(du, v)
    nz = np.sqrt(np.clip(1.0 - (dist / radius) ** 2, 0.0, 1.0))
    normal = np.stack([np.clip(du / radius, -1, 1), np.clip(v / radius, -1, 1), nz], axis=-1)
    return dist - radius, normal


def _gloss(colour: np.ndarray, normal: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Glossy gelatine: diffuse term plus a sharp specular highlight (Blinn-Phong)."""
    half = light + np.array([0.0, 0.0, 1.0], dtype=np.float32)
    half /= np.linalg.norm(half)
    diffuse = np.clip((normal * light).sum(axis=-1), 0.0, None)  # (N, N)
    specular = np.clip((normal * half).sum(axis=-1), 0.0, None) ** 40
    return colour * (0.42 + 0.62 * diffuse)[..., None] + 0.45 * specular[..., None]


class _CapsuleParts(NamedTuple):
    body: np.ndarray  # (N, N) signed distance
    body_normal: np.ndarray  # (N, N, 3)
    cap: np.ndarray  # (N, N) signed distance
    cap_normal: np.ndarray  # (N, N, 3)
    cap_axis: np.ndarray  # (N, N) axis coordinate in the cap's own frame


def _capsule_parts(capsule: _Capsule, u: np.ndarray, v: np.ndarray) -> _CapsuleParts:
    """The body (it reaches under the cap) and the cap, which may be moved off its seat."""
    cu, cv = _cap_frame(capsule, u, v)
    body, body_normal = _tube(u, v, _SEAM - 0.4, 1.0 - _CAPSULE_RADIUS, _CAPSULE_RADIUS)
    cap, cap_normal = _tube(cu, cv, -1.0 + _CAP_RADIUS, _SEAM, _CAP_RADIUS)
    cap = np.maximum(cap, cu - _SEAM)  # the cap is a sleeve cut flat at the seam
    return _CapsuleParts(body, body_normal, cap, cap_normal, cu)


def _capsule_sdf(capsule: _Capsule, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    parts = _capsule_parts(capsule, u, v)
    return np.minimum(parts.body, parts.cap)


def _capsule_surface(
    capsule: _Capsule, grid: _Grid, u: np.ndarray, v: np.ndarray, d: np.ndarray
) -> np.ndarray:
    pose = capsule.pose
    c, s = math.cos(pose.angle), math.sin(pose.angle)
    light = np.array(
        [c * pose.light[0] + s * pose.light[1], -s * pose.light[0] + c * pose.light[1], 1.1],
        dtype=np.float32,
    )
    light /= np.linalg.norm(light)
    parts = _capsule_parts(capsule, u, v)
    body_rgb = _gloss(capsule.body_colour, parts.body_normal, light)
    # The cap's rim casts a thin shadow on the body just past the seam.
    past_seam = parts.cap_axis - _SEAM
    rim = np.exp(-(((past_seam - 0.02) / 0.03) ** 2)) * (past_seam > 0)
    body_rgb = body_rgb * (1.0 - 0.3 * rim)[..., None]
    cap_rgb = _gloss(capsule.cap_colour, parts.cap_normal, light)
    return _blend(body_rgb, cap_rgb, _coverage(parts.cap * pose.scale, grid.px))


def _render_capsule(grid: _Grid, capsule: _Capsule) -> _Layer:
    return _composite(
        grid,
        capsule.pose,
        capsule.backdrop,
        functools.partial(_capsule_sdf, capsule),
        functools.partial(_capsule_surface, capsule, grid),
    )


def _misplace_cap(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Misplaced part: the cap pulled partly off its body and/or tilted on it."""
    shift = rng.uniform(0.03, 0.2)
    tilt = rng.uniform(-0.12, 0.12) if rng.random() < 0.5 else 0.0
    moved = dataclasses.replace(scene.params, cap_shift=shift, cap_tilt=tilt)
    return scene.render(scene.grid, moved).rgb


# ---------------------------------------------------------------------------------------------
# Surface defects: painted on the defect-free rendering, only where the product is


@dataclass(frozen=True)
class _Scene:
    """A defect-free sample, as the defect functions need it."""

    grid: _Grid
    params: Any  # the class's frozen parameter dataclass
    render: Callable[[_Grid, Any], _Layer]
    layer: _Layer


def _line(
    scene: _Scene,
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
    points = _random_curve(rng, start, _log_uniform(rng, *length), bend=0.3, jitter=jitter)
    width = rng.uniform(*width_px) * _SUPERSAMPLING * grid.px
    alpha = _polyline_coverage(grid, points, width) * layer.support * rng.uniform(*strength)
    target = np.ones(3, dtype=np.float32) if lighter else np.zeros(3, dtype=np.float32)
    return _blend(layer.rgb, target, alpha)


def _stain(
    scene: _Scene,
    rng: np.random.Generator,
    *,
    colours: tuple[np.ndarray, ...],
    radius: tuple[float, float],
    opacity: tuple[float, float],
    softness: float,
) -> np.ndarray:
    """A soft-edged, mottled blot (oil, dried patch, rust, dye) that keeps the surface's grain."""
    grid, layer = scene.grid, scene.layer
    r = _log_uniform(rng, *radius)
    d = _blob_sdf(grid, _random_point(grid, layer.support, rng), r, rng)
    mottle = 0.75 + 0.25 * _smooth_noise(rng, grid.n, 12)
    alpha = _smoothstep(-d / (softness * r)) * mottle * layer.support * rng.uniform(*opacity)
    colour = colours[rng.integers(len(colours))]
    # Tinted by the surface's own brightness, so texture detail stays visible through the stain.
    target = colour * (0.55 + 0.9 * _luminance(layer.rgb))[..., None]
    return _blend(layer.rgb, np.clip(target, 0.0, 1.0), alpha)


def _hole(
    scene: _Scene, rng: np.random.Generator, *, radius: tuple[float, float] = (0.02, 0.15)
) -> np.ndarray:
    """A pit: a dark cavity whose far wall catches the light, with a lit rim on the near side."""
    grid, layer = scene.grid, scene.layer
    r = _log_uniform(rng, *radius)
    cx, cy = _random_point(grid, layer.support, rng)
    d = _blob_sdf(grid, (cx, cy), r, rng, irregularity=0.4)
    light_x, light_y = math.cos(_LIGHT_ANGLE), math.sin(_LIGHT_ANGLE)
    towards_light = ((grid.x - cx) * light_x + (grid.y - cy) * light_y) / r  # about [-1, 1]
    depth = rng.uniform(0.15, 0.5)
    cavity = layer.rgb * (depth * (1.0 - 0.5 * np.clip(towards_light, -1, 1)))[..., None]
    rim = np.exp(-((d / (0.25 * r)) ** 2)) * np.clip(-towards_light, 0.0, 1.0) * (d > 0)
    rgb = _blend(layer.rgb, np.ones(3, dtype=np.float32), 0.35 * rim * layer.support)
    return _blend(rgb, cavity, _coverage(d, grid.px) * layer.support)


_FOREIGN_COLOURS = (_rgb(245, 245, 240), _rgb(18, 18, 20), _rgb(40, 90, 210), _rgb(230, 120, 20))


def _contamination(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Foreign particles: a few specks and fibres of a colour foreign to the product."""
    grid, layer = scene.grid, scene.layer
    cx, cy = _random_point(grid, layer.support, rng, inset=0.75)
    spread = _log_uniform(rng, 0.02, 0.15)
    rgb = layer.rgb
    for _ in range(int(rng.integers(1, 9))):
        at = (cx + rng.normal(0.0, spread), cy + rng.normal(0.0, spread))
        colour = _FOREIGN_COLOURS[rng.integers(len(_FOREIGN_COLOURS))]
        if rng.random() < 0.3:  # a fibre
            points = _random_curve(rng, at, rng.uniform(0.05, 0.18), bend=0.5, jitter=0.0)
            cover = _polyline_coverage(grid, points, rng.uniform(0.6, 1.2) * 2 * grid.px)
        else:  # a speck
            r = _log_uniform(rng, 0.006, 0.035)
            cover = _coverage(_blob_sdf(grid, at, r, rng, irregularity=0.5), grid.px)
        rgb = _blend(rgb, colour, cover * layer.support * rng.uniform(0.7, 1.0))
    return rgb


# ---------------------------------------------------------------------------------------------
# The classes


_DefectFn = Callable[[_Scene, np.random.Generator], np.ndarray]


class _ClassSpec(NamedTuple):
    kind: str  # texture | object
    sample: Callable[[np.random.Generator, _Grid], Any]  # random parameters of a normal
    render: Callable[[_Grid, Any], _Layer]
    defects: Mapping[str, _DefectFn]  # defect type -> (scene, rng) -> defective canvas


_scratch = functools.partial(
    _line, lighter=True, length=(0.12, 1.0), width_px=(0.6, 2.2), strength=(0.2, 0.7), jitter=0.0
)
_crack = functools.partial(
    _line, lighter=False, length=(0.1, 0.9), width_px=(0.6, 2.5), strength=(0.3, 0.85), jitter=0.02
)

_CLASSES: dict[str, _ClassSpec] = {
    "brick": _ClassSpec(
        "texture",
        functools.partial(_sample_texture, "brick"),
        _render_texture,
        {
            "crack": _crack,
            "hole": _hole,
            "stain": functools.partial(
                _stain,
                colours=(_rgb(30, 24, 20), _rgb(232, 226, 212)),  # oil, efflorescence
                radius=(0.05, 0.3),
                opacity=(0.15, 0.7),
                softness=0.5,
            ),
        },
    ),
    "grass": _ClassSpec(
        "texture",
        functools.partial(_sample_texture, "grass"),
        _render_texture,
        {
            "stain": functools.partial(
                _stain,
                colours=(_rgb(176, 150, 72), _rgb(120, 86, 40)),  # dry patch, bare soil
                radius=(0.06, 0.32),
                opacity=(0.2, 0.8),
                softness=0.6,
            ),
            "contamination": _contamination,
            "hole": _hole,
        },
    ),
    "gravel": _ClassSpec(
        "texture",
        functools.partial(_sample_texture, "gravel"),
        _render_texture,
        {
            "hole": _hole,
            "contamination": _contamination,
            "stain": functools.partial(
                _stain,
                colours=(_rgb(20, 18, 16), _rgb(150, 70, 30)),  # oil, rust
                radius=(0.05, 0.28),
                opacity=(0.15, 0.7),
                softness=0.5,
            ),
        },
    ),
    "washer": _ClassSpec(
        "object",
        _sample_washer,
        _render_washer,
        {
            "chip": _chip_washer,
            "scratch": _scratch,
            "rust": functools.partial(
                _stain,
                colours=(_rgb(150, 74, 32), _rgb(110, 60, 30)),
                radius=(0.02, 0.18),
                opacity=(0.25, 0.9),
                softness=0.4,
            ),
        },
    ),
    "gear": _ClassSpec(
        "object",
        _sample_gear,
        _render_gear,
        {"broken_tooth": _break_tooth, "extra_material": _fill_gap, "scratch": _scratch},
    ),
    "capsule": _ClassSpec(
        "object",
        _sample_capsule,
        _render_capsule,
        {
            "misplaced_cap": _misplace_cap,
            "spot": functools.partial(
                _stain,
                colours=(_rgb(60, 36, 24), _rgb(120, 130, 40)),
                radius=(0.015, 0.1),
                opacity=(0.3, 0.9),
                softness=0.4,
            ),
            "crack": _crack,
        },
    ),
}

DEFECT_TYPES: Mapping[str, tuple[str, ...]] = {
    name: tuple(spec.defects) for name, spec in _CLASSES.items()
}


def _spec(class_name: str) -> _ClassSpec:
    if class_name not in _CLASSES:
        raise ValueError(
            f"data.benchmark.classes: unknown class {class_name!r}; the generator knows "
            f"{', '.join(KNOWN_CLASSES)} (fix the list in params.yaml)"
        )
    return _CLASSES[class_name]


# ---------------------------------------------------------------------------------------------
# Samples


def _downsample(canvas: np.ndarray) -> np.ndarray:
    """Box filter from the supersampled canvas to the output size (the anti-aliasing step)."""
    k = _SUPERSAMPLING
    return sum(canvas[i::k, j::k] for i in range(k) for j in range(k)) / k**2


def _finish(canvas: np.ndarray, noise: np.ndarray) -> np.ndarray:
    image = _downsample(canvas) + noise
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _defect_slot(class_name: str, index: int) -> tuple[str, int]:
    """Defect types take turns, so each type gets an equal share (+-1) of the defective images."""
    types = DEFECT_TYPES[class_name]
    return types[index % len(types)], index // len(types)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def sample_path(class_name: str, split: str, index: int) -> str:
    """Relative path of a sample's image in the benchmark (MVTec layout)."""
    _spec(class_name)
    _check_split(split)
    if split == "train":
        return f"{class_name}/train/good/{index:03d}.png"
    if split == "test_good":
        return f"{class_name}/test/good/{index:03d}.png"
    defect_type, number = _defect_slot(class_name, index)
    return f"{class_name}/test/{defect_type}/{number:03d}.png"


def _mask_path(class_name: str, index: int) -> str:
    defect_type, number = _defect_slot(class_name, index)
    return f"{class_name}/ground_truth/{defect_type}/{number:03d}_mask.png"


def render_sample(
    class_name: str, image_size: int, seed: int, split: str, index: int
) -> SampleRendering:
    """Render one sample: the defect-free image and, for split test_defect, its defect and mask.

    Both renderings of a defective sample come from the same random draws (scene, noise), so they
    differ exactly where the defect is; the mask is every pixel that changed by more than
    `MASK_TOLERANCE` grey levels, with enclosed holes filled (a pixel inside a stain that happens
    to keep its value still belongs to the defect).
    """
    spec = _spec(class_name)
    _check_split(split)
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng(
        [seed, KNOWN_CLASSES.index(class_name), SPLITS.index(split), index]
    )
    grid = _make_grid(image_size)
    params = spec.sample(rng, grid)
    layer = spec.render(grid, params)
    noise = rng.normal(0.0, _NOISE_SIGMA, (image_size, image_size, 3))
    normal = _finish(layer.rgb, noise)
    if split != "test_defect":
        return SampleRendering(normal, None, None, None)
    defect_type, _ = _defect_slot(class_name, index)
    scene = _Scene(grid=grid, params=params, render=spec.render, layer=layer)
    min_pixels = max(1, round(MIN_DEFECT_AREA * image_size**2))
    for _ in range(_MAX_DEFECT_ATTEMPTS):
        defective = _finish(spec.defects[defect_type](scene, rng), noise)
        change = np.abs(defective.astype(np.int16) - normal.astype(np.int16)).max(axis=-1)
        changed = change > MASK_TOLERANCE
        if changed.sum() >= min_pixels:
            mask = ndimage.binary_fill_holes(changed).astype(np.uint8) * 255
            return SampleRendering(normal, defective, mask, defect_type)
    raise RuntimeError(  # a bug in a defect function, not a user error
        f"{class_name} {defect_type} #{index}: no visible defect in {_MAX_DEFECT_ATTEMPTS} draws"
    )


# ---------------------------------------------------------------------------------------------
# Writing the benchmark


def _png(array: np.ndarray) -> bytes:
    """PNG bytes with fixed options and no metadata, so equal arrays give equal files."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _is_generated_benchmark(path: Path) -> bool:
    marker = path / "benchmark.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (ValueError, AttributeError):
        return False


def _check_replaceable(out: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier generated benchmark."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; remove it or choose another path")
    if any(out.iterdir()) and not _is_generated_benchmark(out):
        raise ValueError(
            f"{out}: exists and is not a generated benchmark (no benchmark.json written by "
            f"{GENERATOR}); it is left untouched: remove it yourself or choose another path"
        )


def make_benchmark(out: str | Path, config: BenchmarkConfig, seed: int) -> BenchmarkSummary:
    """Write the generated benchmark to `out` in MVTec layout, plus `out/benchmark.json`.

    Files are written into a hidden temporary folder next to `out` that is renamed to `out` only
    when complete, so an interrupted run never leaves a benchmark that looks whole. An existing
    `out` is replaced if it is empty or an earlier generated benchmark; anything else is refused.
    """
    out = Path(out)
    if seed < 0:
        raise ValueError(
            f"seed must be >= 0, got {seed} (pass --seed with a non-negative integer)"
        )
    if len(set(config.classes)) != len(config.classes) or not config.classes:
        raise ValueError(
            f"data.benchmark.classes: need distinct class names, got {list(config.classes)}"
        )
    for name in config.classes:
        _spec(name)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        classes = _write_classes(tmp, config, seed)
        summary = BenchmarkSummary(
            root=out, seed=seed, image_size=config.image_size, classes=classes
        )
        # Plain json, not mddnet.io: the folder rename below is the atomic step, and mddnet.io
        # would import torch (1.5 s) into a command that needs none of it.
        _write_file(
            tmp / "benchmark.json", (json.dumps(summary.to_json(), indent=2) + "\n").encode()
        )
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote the generated benchmark (%d classes, seed %d) to %s", len(classes), seed, out)
    return summary


def _write_classes(root: Path, config: BenchmarkConfig, seed: int) -> dict[str, ClassSummary]:
    """Write all classes in parallel threads.

    Classes are independent (own random streams, own folders), and numpy and PIL release the GIL
    in their loops, so threads use the cores without the start-up cost of processes.
    """
    pool = ThreadPoolExecutor(max_workers=min(len(config.classes), os.cpu_count() or 1))
    try:
        written = pool.map(lambda name: _write_class(root, name, config, seed), config.classes)
        return dict(zip(config.classes, written, strict=True))
    finally:
        # After an error or Ctrl-C, the classes not yet started are dropped, not written.
        pool.shutdown(wait=True, cancel_futures=True)


def _write_class(root: Path, name: str, config: BenchmarkConfig, seed: int) -> ClassSummary:
    """Render and write one class's images and masks under `root`; return its counts."""
    counts = {
        "train": config.train_per_class,
        "test_good": config.test_good_per_class,
        "test_defect": config.test_defect_per_class,
    }
    defects: Counter[str] = Counter()
    for split, count in counts.items():
        for index in range(count):
            sample = render_sample(name, config.image_size, seed, split, index)
            image = sample.normal if sample.defective is None else sample.defective
            _write_file(root / sample_path(name, split, index), _png(image))
            if sample.mask is not None:
                _write_file(root / _mask_path(name, index), _png(sample.mask))
                defects[sample.defect_type] += 1
    log.debug("%s: %s images, defects %s", name, counts, dict(defects))
    return ClassSummary(
        kind=_CLASSES[name].kind,
        train_good=config.train_per_class,
        test_good=config.test_good_per_class,
        test_defects=dict(defects),
    )


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`, moving an old benchmark aside first."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old)
