"""Training-time anomaly synthesis: a normal image x_n becomes an anomalous copy x_a with mask M.

Paper component: "each normal training image x_n gets a synthetic anomalous copy x_a with a pixel
mask M" [paper]; the restoration decoder learns to undo it, the identity decoder to keep it, and
the discrepancy loss pulls their disagreement onto M. How the anomaly is made is [ours]:

- `perlin` (DRAEM): a thresholded, randomly rotated Perlin-noise mask filled with a foreign
  texture, x_a = (1 - beta*M) * x_n + beta*M * texture, beta ~ U(strength). The texture is another
  training image (of another class; the caller passes it in) or procedural noise / stripes, since
  DTD is not at hand offline.
- `simplex` (RD++): smooth noise ADDED to the image inside a random box. RD++ uses simplex noise;
  numpy/scipy ship none, so the smooth field here is multi-octave Perlin (gradient) noise, which
  has the same role (band-limited, zero-mean, smooth) without a new dependency. Its octaves are
  the Perlin scales 2^0 .. 2^(perlin_max_scale-1) over the box, its amplitude beta ~ U(strength);
  texture_source does not apply.
- `cutpaste` (CutPaste, Li et al. 2021): a rectangle of the image itself, pasted elsewhere in
  it: a structural anomaly (misplaced or doubled parts) rather than a foreign texture.
- `perlin_cutpaste`: `perlin` or `cutpaste`, each with probability 1/2.
- `none`: x_a = x_n, M = 0 (the RD baseline).

M is exactly the set of pixels that changed: where a blend would change a pixel by less than
`MIN_CHANGE` (texture equal to the image there, or beta near 0), the pixel is nudged by
`MIN_CHANGE`, so the discrepancy target never marks an unchanged pixel as anomalous.
Pure numpy, so it is testable without torch and reusable by any data pipeline.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from skimage.draw import ellipse

from mddnet.config import SynthesisConfig

__all__ = [
    "MIN_CHANGE",
    "Synthesis",
    "fractal_noise",
    "perlin_mask",
    "perlin_noise",
    "procedural_texture",
    "synthesize",
]

logger = logging.getLogger(__name__)

MIN_CHANGE = 1.0 / 255.0  # one 8-bit grey level: the smallest change a synthesised pixel gets
MAX_MASK_TRIES = 10  # Perlin masks redrawn before falling back to a blob
MAX_ROTATION_DEGREES = 90.0  # DRAEM rotates the noise by U(-90, 90) degrees
FRACTAL_OCTAVES = 4  # octaves of the procedural noise texture
BOX_FRACTION = (0.125, 0.5)  # side range of the simplex box, as a fraction of the image side
CUTPASTE_AREA = (0.02, 0.15)  # area range of the cut rectangle, as a fraction of the image
CUTPASTE_ASPECT = (0.3, 3.3)  # its height / width range (log-uniform), as CutPaste draws it


class Synthesis(NamedTuple):
    """One synthesised training pair: x_a and the mask of the pixels that differ from x_n."""

    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    mask: np.ndarray  # (H, W) float32 in {0, 1}


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic 6t^5 - 15t^4 + 10t^3: zero first and second derivative at the lattice."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int], scale: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """2-D Perlin gradient noise with `scale` (rows, cols) lattice cells over the image.

    Returns float32 (H, W) in [-1, 1]: the sqrt(2) factor maps the 2-D gradient-noise range
    [-1/sqrt(2), 1/sqrt(2)] onto [-1, 1], so DRAEM's threshold of 0.5 means the same here.
    The noise is 0 at every lattice point (pixel (y, x) with y*sy/H and x*sx/W integers).
    """
    height, width = shape
    cells_y, cells_x = scale
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(cells_y + 1, cells_x + 1))
    # Unit gradient (y, x) components at the lattice points: (cy+1, cx+1) each.
    grad_y, grad_x = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
    pos_y = np.arange(height, dtype=np.float32) * np.float32(cells_y / height)  # (H,) in [0, cy)
    pos_x = np.arange(width, dtype=np.float32) * np.float32(cells_x / width)  # (W,)
    frac_y, frac_x = pos_y - np.floor(pos_y), pos_x - np.floor(pos_x)  # (H,), (W,) in [0, 1)
    cell_y, cell_x = pos_y.astype(int), pos_x.astype(int)

    def corner(dy: int, dx: int) -> np.ndarray:
        # Dot product of the corner's gradient with the offset from that corner: (H, W).
        rows, cols = cell_y + dy, cell_x + dx
        return (
            grad_y[rows][:, cols] * (frac_y - dy)[:, None]
            + grad_x[rows][:, cols] * (frac_x - dx)[None, :]
        )

    weight_y, weight_x = _fade(frac_y)[:, None], _fade(frac_x)[None, :]  # (H, 1), (1, W)
    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    top, bottom = n00 + weight_x * (n01 - n00), n10 + weight_x * (n11 - n10)  # (H, W)
    return np.float32(math.sqrt(2.0)) * (top + weight_y * (bottom - top))


def fractal_noise(
    shape: tuple[int, int], rng: np.random.Generator, octaves: int, base_scale: int = 1
) -> np.ndarray:
    """Sum of Perlin octaves at scales base*2^k with amplitudes 2^-k, rescaled to [-1, 1].

    Fine octaves add detail on top of the coarse shape, which a single octave lacks; the
    rescaling by the maximum makes the amplitude (beta) the only control of strength.
    """
    noise = sum(
        0.5**k * perlin_noise(shape, (base_scale * 2**k, base_scale * 2**k), rng)
        for k in range(octaves)
    )  # (H, W)
    peak = float(np.abs(noise).max())
    return (noise / peak if peak > 0 else noise).astype(np.float32)


def _blob(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A small random ellipse, the fallback that keeps an anomalous sample's mask non-empty.

    Its centre is a pixel of the image and both radii are >= 1, so that pixel is always inside.
    """
    height, width = shape
    mask = np.zeros(shape, dtype=bool)
    rows, cols = ellipse(
        int(rng.integers(height)),
        int(rng.integers(width)),
        rng.uniform(max(1.0, height / 16), max(1.0, height / 8)),
        rng.uniform(max(1.0, width / 16), max(1.0, width / 8)),
        shape=shape,
        rotation=rng.uniform(-math.pi, math.pi),
    )
    mask[rows, cols] = True
    return mask


def perlin_mask(
    shape: tuple[int, int], max_scale: int, threshold: float, rng: np.random.Generator
) -> np.ndarray:
    """DRAEM's mask: rotated Perlin noise at scales 2^U{0..max-1} per axis, above `threshold`.

    An empty mask is redrawn up to MAX_MASK_TRIES times, then replaced by a small blob, so that a
    sample chosen to be anomalous always has anomalous pixels. Returns bool (H, W).
    """
    for _ in range(MAX_MASK_TRIES):
        scale = tuple(int(s) for s in 2 ** rng.integers(0, max_scale, size=2))
        noise = perlin_noise(shape, scale, rng)  # (H, W)
        angle = rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)
        noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="reflect")
        mask = noise > threshold
        if mask.any():
            return mask
    logger.debug("Perlin mask empty after %d tries; using a blob", MAX_MASK_TRIES)
    return _blob(shape, rng)


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A foreign texture without external data: coloured multi-octave noise or random stripes.

    Returns float32 (H, W, 3) in [0, 1].
    """
    height, width = shape
    if rng.random() < 0.5:
        base = int(2 ** rng.integers(0, 3))
        channels = [fractal_noise(shape, rng, FRACTAL_OCTAVES, base) for _ in range(3)]
        return (0.5 + 0.5 * np.stack(channels, axis=-1)).astype(np.float32)  # (H, W, 3)
    colours = rng.random((2, 3))  # two random RGB colours
    angle = rng.uniform(0.0, math.pi)
    cycles = rng.uniform(2.0, 16.0)  # stripes per image side
    ys, xs = np.mgrid[0:height, 0:width]
    along = (ys / height) * math.sin(angle) + (xs / width) * math.cos(angle)  # (H, W)
    weight = 0.5 + 0.5 * np.sin(2 * math.pi * cycles * along + rng.uniform(0, 2 * math.pi))
    texture = colours[0] * (1 - weight[..., None]) + colours[1] * weight[..., None]  # (H, W, 3)
    return texture.astype(np.float32)


def _texture(
    shape: tuple[int, int], source: str, rng: np.random.Generator, foreign: np.ndarray | None
) -> np.ndarray:
    """Pick the foreign texture; without a foreign image (one class only) use procedural noise."""
    use_foreign = source == "other_class" or (source == "mixed" and rng.random() < 0.5)
    if use_foreign and foreign is not None:
        return foreign
    return procedural_texture(shape, rng)


def _random_box(shape: tuple[int, int], rng: np.random.Generator) -> tuple[slice, slice]:
    """RD++'s box: sides U(BOX_FRACTION) of the image side, placed uniformly inside the image."""
    sides = [max(1, int(rng.uniform(*BOX_FRACTION) * size)) for size in shape]
    starts = [
        int(rng.integers(0, size - side + 1)) for size, side in zip(shape, sides, strict=True)
    ]
    return slice(starts[0], starts[0] + sides[0]), slice(starts[1], starts[1] + sides[1])


def _cutpaste(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(target, region): a rectangle of `image` copied to another place of it."""
    height, width = image.shape[:2]
    area = rng.uniform(*CUTPASTE_AREA) * height * width
    aspect = math.exp(rng.uniform(math.log(CUTPASTE_ASPECT[0]), math.log(CUTPASTE_ASPECT[1])))
    h = min(height - 1, max(1, int(round(math.sqrt(area * aspect)))))
    w = min(width - 1, max(1, int(round(math.sqrt(area / aspect)))))
    (y0, x0), (y1, x1) = [
        (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))) for _ in "ft"
    ]
    target = image.copy()
    target[y1 : y1 + h, x1 : x1 + w] = image[y0 : y0 + h, x0 : x0 + w]
    region = np.zeros((height, width), dtype=bool)
    region[y1 : y1 + h, x1 : x1 + w] = True
    return target, region


def _apply(image: np.ndarray, target: np.ndarray, region: np.ndarray) -> Synthesis:
    """x_a = target inside `region`, x_n outside; pixels the target leaves (nearly) unchanged
    are nudged by MIN_CHANGE away from the nearer bound, so the mask is exactly the change."""
    anomalous = np.where(region[..., None], target, image)  # (H, W, 3)
    too_small = region & (np.abs(anomalous - image).max(axis=-1) < MIN_CHANGE)  # (H, W)
    nudge = np.where(image < 0.5, MIN_CHANGE, -MIN_CHANGE)  # (H, W, 3), stays inside [0, 1]
    anomalous[too_small] = image[too_small] + nudge[too_small]
    return Synthesis(anomalous.astype(np.float32), region.astype(np.float32))


def _check_image(array: np.ndarray, name: str, shape: tuple[int, ...] | None = None) -> None:
    if array.ndim != 3 or array.shape[-1] != 3 or (shape is not None and array.shape != shape):
        expected = f"{shape}" if shape is not None else "(H, W, 3)"
        raise ValueError(f"synthesize: `{name}` must have shape {expected}, got {array.shape}")


def synthesize(
    image: np.ndarray,
    config: SynthesisConfig,
    rng: np.random.Generator,
    foreign: np.ndarray | None = None,
) -> Synthesis:
    """Turn a normal image (H, W, 3) float32 in [0, 1] into (x_a, M) as `config` says.

    With probability 1 - `config.probability` (and always for kind `none`) the image comes back
    unchanged with an all-zero mask: RD-style clean pairs keep the decoders faithful to normals.
    `foreign` (same shape, [0, 1]) is the other-class texture for `texture_source` other_class or
    mixed; None falls back to a procedural texture (a dataset with one class has no other class).
    """
    _check_image(image, "image")
    if foreign is not None:
        _check_image(foreign, "foreign", image.shape)
    shape = image.shape[:2]
    if config.kind == "none" or rng.random() >= config.probability:
        return Synthesis(image.astype(np.float32, copy=True), np.zeros(shape, dtype=np.float32))
    beta = rng.uniform(*config.strength)
    kind = config.kind
    if kind == "perlin_cutpaste":
        kind = "perlin" if rng.random() < 0.5 else "cutpaste"
    if kind == "cutpaste":
        return _apply(image, *_cutpaste(image, rng))
    if kind == "perlin":
        region = perlin_mask(shape, config.perlin_max_scale, config.threshold, rng)  # (H, W)
        texture = _texture(shape, config.texture_source, rng, foreign)  # (H, W, 3)
        return _apply(image, (1.0 - beta) * image + beta * texture, region)
    if kind == "simplex":
        rows, cols = _random_box(shape, rng)
        region = np.zeros(shape, dtype=bool)
        region[rows, cols] = True
        box_shape = region[rows, cols].shape
        noise = np.stack(
            [fractal_noise(box_shape, rng, config.perlin_max_scale) for _ in range(3)], axis=-1
        )  # (h, w, 3) in [-1, 1]
        target = image.copy()
        target[rows, cols] = np.clip(image[rows, cols] + beta * noise, 0.0, 1.0)
        return _apply(image, target, region)
    raise AssertionError(f"unhandled synthesis kind {kind!r}")  # config.py declares the kinds
