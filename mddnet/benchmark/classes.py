"""The benchmark's classes, their defect types, and the rendering of one sample.

Each defective sample is rendered twice from the same random draws, once clean and once with the
defect, and its mask is computed from the difference of the two renderings, so the mask covers
every pixel the defect changed by construction. Every sample has its own random stream,
`default_rng([seed, class, split, index])`, so a class's images do not depend on which other
classes are generated or on their counts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from mddnet.benchmark.canvas import Grid, Layer, Scene, downsample, make_grid, rgb255
from mddnet.benchmark.defects import contamination, crack, hole, scratch, stain
from mddnet.benchmark.objects import (
    Capsule,
    Gear,
    Washer,
    break_tooth,
    chip_washer,
    fill_gap,
    misplace_cap,
    render_object,
)
from mddnet.benchmark.textures import render_texture, sample_texture

__all__ = [
    "DEFECT_TYPES",
    "KNOWN_CLASSES",
    "MASK_TOLERANCE",
    "MIN_DEFECT_AREA",
    "OBJECTS",
    "SPLITS",
    "TEXTURES",
    "ClassSpec",
    "SampleRendering",
    "class_spec",
    "mask_path",
    "render_sample",
    "sample_path",
]

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
_NOISE_SIGMA = 1.5 / 255  # sensor noise, added identically to both renderings of a sample


class SampleRendering(NamedTuple):
    """One generated sample: its defect-free rendering and, for a defective sample, the rest.

    `defective` and `mask` are None for normal samples (splits train and test_good).
    """

    normal: np.ndarray  # (H, W, 3) uint8
    defective: np.ndarray | None  # (H, W, 3) uint8
    mask: np.ndarray | None  # (H, W) uint8, 0 or 255
    defect_type: str | None


# ---------------------------------------------------------------------------------------------
# The class table


_DefectFn = Callable[[Scene, np.random.Generator], np.ndarray]


class ClassSpec(NamedTuple):
    kind: str  # texture | object
    sample: Callable[[np.random.Generator, Grid], Any]  # random parameters of a normal
    render: Callable[[Grid, Any], Layer]
    defects: Mapping[str, _DefectFn]  # defect type -> (scene, rng) -> defective canvas


_CLASSES: dict[str, ClassSpec] = {
    "brick": ClassSpec(
        "texture",
        functools.partial(sample_texture, "brick"),
        render_texture,
        {
            "crack": crack,
            "hole": hole,
            "stain": functools.partial(
                stain,
                colours=(rgb255(30, 24, 20), rgb255(232, 226, 212)),  # oil, efflorescence
                radius=(0.05, 0.3),
                opacity=(0.15, 0.7),
                softness=0.5,
            ),
        },
    ),
    "grass": ClassSpec(
        "texture",
        functools.partial(sample_texture, "grass"),
        render_texture,
        {
            "stain": functools.partial(
                stain,
                colours=(rgb255(176, 150, 72), rgb255(120, 86, 40)),  # dry patch, bare soil
                radius=(0.06, 0.32),
                opacity=(0.2, 0.8),
                softness=0.6,
            ),
            "contamination": contamination,
            "hole": hole,
        },
    ),
    "gravel": ClassSpec(
        "texture",
        functools.partial(sample_texture, "gravel"),
        render_texture,
        {
            "hole": hole,
            "contamination": contamination,
            "stain": functools.partial(
                stain,
                colours=(rgb255(20, 18, 16), rgb255(150, 70, 30)),  # oil, rust
                radius=(0.05, 0.28),
                opacity=(0.15, 0.7),
                softness=0.5,
            ),
        },
    ),
    "washer": ClassSpec(
        "object",
        Washer.sample,
        render_object,
        {
            "chip": chip_washer,
            "scratch": scratch,
            "rust": functools.partial(
                stain,
                colours=(rgb255(150, 74, 32), rgb255(110, 60, 30)),
                radius=(0.02, 0.18),
                opacity=(0.25, 0.9),
                softness=0.4,
            ),
        },
    ),
    "gear": ClassSpec(
        "object",
        Gear.sample,
        render_object,
        {"broken_tooth": break_tooth, "extra_material": fill_gap, "scratch": scratch},
    ),
    "capsule": ClassSpec(
        "object",
        Capsule.sample,
        render_object,
        {
            "misplaced_cap": misplace_cap,
            "spot": functools.partial(
                stain,
                colours=(rgb255(60, 36, 24), rgb255(120, 130, 40)),
                radius=(0.015, 0.1),
                opacity=(0.3, 0.9),
                softness=0.4,
            ),
            "crack": crack,
        },
    ),
}

DEFECT_TYPES: Mapping[str, tuple[str, ...]] = {
    name: tuple(spec.defects) for name, spec in _CLASSES.items()
}


def class_spec(class_name: str) -> ClassSpec:
    """The class's entry in the table; a ValueError naming the known classes if there is none."""
    if class_name not in _CLASSES:
        raise ValueError(
            f"data.benchmark.classes: unknown class {class_name!r}; the generator knows "
            f"{', '.join(KNOWN_CLASSES)} (fix the list in params.yaml)"
        )
    return _CLASSES[class_name]


# ---------------------------------------------------------------------------------------------
# Samples


def _defect_slot(class_name: str, index: int) -> tuple[str, int]:
    """Defect types take turns, so each type gets an equal share (+-1) of the defective images."""
    types = DEFECT_TYPES[class_name]
    return types[index % len(types)], index // len(types)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def sample_path(class_name: str, split: str, index: int) -> str:
    """Relative path of a sample's image in the benchmark (MVTec layout)."""
    class_spec(class_name)
    _check_split(split)
    if split == "train":
        return f"{class_name}/train/good/{index:03d}.png"
    if split == "test_good":
        return f"{class_name}/test/good/{index:03d}.png"
    defect_type, number = _defect_slot(class_name, index)
    return f"{class_name}/test/{defect_type}/{number:03d}.png"


def mask_path(class_name: str, index: int) -> str:
    """Relative path of the mask of defective sample `index` (MVTec layout)."""
    defect_type, number = _defect_slot(class_name, index)
    return f"{class_name}/ground_truth/{defect_type}/{number:03d}_mask.png"


def _finish(canvas: np.ndarray, noise: np.ndarray) -> np.ndarray:
    image = downsample(canvas) + noise
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def render_sample(
    class_name: str, image_size: int, seed: int, split: str, index: int
) -> SampleRendering:
    """Render one sample: the defect-free image and, for split test_defect, its defect and mask.

    Both renderings of a defective sample come from the same random draws (scene, noise), so they
    differ exactly where the defect is; the mask is every pixel that changed by more than
    `MASK_TOLERANCE` grey levels, with enclosed holes filled (a pixel inside a stain that happens
    to keep its value still belongs to the defect).
    """
    spec = class_spec(class_name)
    _check_split(split)
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng(
        [seed, KNOWN_CLASSES.index(class_name), SPLITS.index(split), index]
    )
    grid = make_grid(image_size)
    params = spec.sample(rng, grid)
    layer = spec.render(grid, params)
    noise = rng.normal(0.0, _NOISE_SIGMA, (image_size, image_size, 3))
    normal = _finish(layer.rgb, noise)
    if split != "test_defect":
        return SampleRendering(normal, None, None, None)
    defect_type, _ = _defect_slot(class_name, index)
    scene = Scene(grid=grid, params=params, render=spec.render, layer=layer)
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
