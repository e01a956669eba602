"""Training-time anomaly synthesis: masks are exactly the changed pixels, numbers are pinned."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import ndimage

from mddnet.config import SynthesisConfig
from mddnet.data.anomalies import (
    MIN_CHANGE,
    perlin_mask,
    perlin_noise,
    procedural_texture,
    synthesize,
)

SIZE = 32
BASE = SynthesisConfig(
    kind="perlin",
    probability=1.0,
    strength=(0.2, 1.0),
    texture_source="mixed",
    perlin_max_scale=4,
    threshold=0.5,
)
VARIANTS = [
    dataclasses.replace(BASE, texture_source="other_class"),
    dataclasses.replace(BASE, texture_source="procedural"),
    dataclasses.replace(BASE, texture_source="mixed"),
    dataclasses.replace(BASE, kind="simplex"),
    dataclasses.replace(BASE, kind="cutpaste"),
    dataclasses.replace(BASE, kind="perlin_cutpaste"),
]


def _image(seed: int, size: int = SIZE) -> np.ndarray:
    """Random image with saturated bands (0 and 1), where clipping could hide a change."""
    image = np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)
    image[: size // 4] = 0.0
    image[-size // 4 :] = 1.0
    return image


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.abs(a - b) > 1e-6).any(axis=-1)


class _FixedAngles:
    """Stands in for the generator so the lattice gradients are known: all angles 0 (+x)."""

    def uniform(self, low: float, high: float, size: tuple[int, int]) -> np.ndarray:
        return np.zeros(size)


def test_perlin_noise_matches_the_hand_computed_value_for_known_gradients() -> None:
    # All gradients (0, 1): noise = sqrt(2) * (fx - fade(fx)), the same on every row.
    noise = perlin_noise((4, 8), (1, 2), _FixedAngles())  # 4 px per cell along x
    fade = [0.0, 0.103515625, 0.5, 0.896484375]  # 6t^5 - 15t^4 + 10t^3 at t = 0, 1/4, 1/2, 3/4
    expected = [
        math.sqrt(2) * (t - f) for t, f in zip([0, 0.25, 0.5, 0.75], fade, strict=True)
    ] * 2
    np.testing.assert_allclose(noise, np.tile(expected, (4, 1)), atol=1e-6)


def test_perlin_noise_is_zero_on_the_lattice_and_within_minus_one_one() -> None:
    values = []
    for seed in range(20):
        noise = perlin_noise((64, 48), (4, 3), np.random.default_rng(seed))
        assert noise.shape == (64, 48) and noise.dtype == np.float32
        np.testing.assert_allclose(noise[::16, ::16], 0.0, atol=1e-6)  # cells of 16 px
        assert np.abs(np.diff(noise, axis=0)).max() < 0.2  # smooth: small steps between pixels
        values.append(noise)
    values = np.stack(values)
    assert values.min() >= -1.0 and values.max() <= 1.0
    assert np.abs(values).max() > 0.6  # the sqrt(2) scaling uses most of the range


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: f"{c.kind}-{c.texture_source}")
def test_mask_is_exactly_the_set_of_changed_pixels(config: SynthesisConfig) -> None:
    for seed in range(40):
        image = _image(seed)
        foreign = _image(seed + 1000)
        out = synthesize(image, config, np.random.default_rng(seed), foreign)
        assert out.image.dtype == np.float32 and out.mask.dtype == np.float32
        assert set(np.unique(out.mask)) <= {0.0, 1.0}
        assert out.mask.any()  # probability 1: every sample is anomalous
        np.testing.assert_array_equal(_changed(out.image, image), out.mask == 1)
        assert out.image.min() >= 0.0 and out.image.max() <= 1.0


@pytest.mark.parametrize("strength", [(0.0, 0.0), (1.0, 1.0)])
def test_a_texture_equal_to_the_image_still_changes_every_masked_pixel(strength) -> None:
    # beta = 0, or a texture identical to x_n, would leave x_a == x_n: the nudge must kick in.
    config = dataclasses.replace(BASE, texture_source="other_class", strength=strength)
    for seed in range(10):
        image = _image(seed)
        out = synthesize(image, config, np.random.default_rng(seed), foreign=image.copy())
        np.testing.assert_array_equal(_changed(out.image, image), out.mask == 1)
        masked = out.mask == 1
        np.testing.assert_allclose(
            np.abs(out.image - image)[masked], MIN_CHANGE, rtol=1e-5
        )  # exactly the minimum change, away from the nearer bound


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: f"{c.kind}-{c.texture_source}")
def test_probability_zero_never_changes_the_image(config: SynthesisConfig) -> None:
    config = dataclasses.replace(config, probability=0.0)
    for seed in range(10):
        image = _image(seed)
        out = synthesize(image, config, np.random.default_rng(seed), _image(seed + 1))
        np.testing.assert_array_equal(out.image, image)
        assert not out.mask.any()


def test_kind_none_returns_the_image_and_an_empty_mask() -> None:
    image = _image(0)
    out = synthesize(image, dataclasses.replace(BASE, kind="none"), np.random.default_rng(0))
    np.testing.assert_array_equal(out.image, image)
    np.testing.assert_array_equal(out.mask, np.zeros((SIZE, SIZE), np.float32))
    assert out.image is not image  # a copy: the caller may modify x_a without touching x_n


def test_probability_is_the_fraction_of_anomalous_samples() -> None:
    config = dataclasses.replace(BASE, probability=0.3, texture_source="procedural")
    image = _image(0, size=16)
    hits = [synthesize(image, config, np.random.default_rng(s)).mask.any() for s in range(400)]
    assert 0.24 < np.mean(hits) < 0.36  # binomial(400, 0.3): std 0.023


def test_full_strength_puts_the_foreign_texture_inside_the_mask() -> None:
    config = dataclasses.replace(BASE, texture_source="other_class", strength=(1.0, 1.0))
    image = np.full((SIZE, SIZE, 3), 0.2, np.float32)
    foreign = np.full((SIZE, SIZE, 3), 0.8, np.float32)
    foreign[:, :, 1] = np.linspace(0.5, 0.9, SIZE, dtype=np.float32)
    for seed in range(10):
        out = synthesize(image, config, np.random.default_rng(seed), foreign)
        inside = out.mask == 1
        np.testing.assert_array_equal(out.image[inside], foreign[inside])
        np.testing.assert_array_equal(out.image[~inside], image[~inside])


def test_blend_follows_beta_within_the_strength_range() -> None:
    # x_a = (1 - beta) x_n + beta t inside M: with x_n = 0 and t = 1, x_a is beta itself.
    config = dataclasses.replace(BASE, texture_source="other_class", strength=(0.3, 0.6))
    image, foreign = np.zeros((SIZE, SIZE, 3), np.float32), np.ones((SIZE, SIZE, 3), np.float32)
    betas = []
    for seed in range(30):
        out = synthesize(image, config, np.random.default_rng(seed), foreign)
        values = np.unique(out.image[out.mask == 1])
        assert len(values) == 1  # one beta per sample
        betas.append(float(values[0]))
    assert min(betas) >= 0.3 and max(betas) <= 0.6 and max(betas) - min(betas) > 0.15


def test_texture_source_decides_whether_the_foreign_image_is_used() -> None:
    config = dataclasses.replace(BASE, strength=(1.0, 1.0))
    image = np.zeros((SIZE, SIZE, 3), np.float32)
    foreign = np.full((SIZE, SIZE, 3), 0.5, np.float32)

    def used_foreign(source: str, seed: int, foreign: np.ndarray | None) -> bool:
        cfg = dataclasses.replace(config, texture_source=source)
        out = synthesize(image, cfg, np.random.default_rng(seed), foreign)
        return bool(np.all(out.image[out.mask == 1] == 0.5))

    assert all(used_foreign("other_class", s, foreign) for s in range(20))
    assert not any(used_foreign("procedural", s, foreign) for s in range(20))
    assert 0.3 < np.mean([used_foreign("mixed", s, foreign) for s in range(100)]) < 0.7
    # other_class without a foreign image (a one-class dataset) falls back to procedural
    assert not any(used_foreign("other_class", s, None) for s in range(20))


def test_same_seed_gives_identical_output_and_another_seed_differs() -> None:
    for config in VARIANTS:
        image, foreign = _image(0), _image(1)
        first = synthesize(image, config, np.random.default_rng(7), foreign)
        again = synthesize(image, config, np.random.default_rng(7), foreign)
        other = synthesize(image, config, np.random.default_rng(8), foreign)
        np.testing.assert_array_equal(first.image, again.image)
        np.testing.assert_array_equal(first.mask, again.mask)
        assert not np.array_equal(first.mask, other.mask)


def test_mean_perlin_mask_area_is_about_five_percent() -> None:
    # Measured: 4.3% at 64 px, 5.0% at 128 px, 5.3% at 256 px (threshold 0.5, max scale 6).
    areas = [
        perlin_mask((128, 128), 6, 0.5, np.random.default_rng(seed)).mean() for seed in range(100)
    ]
    assert 0.03 < np.mean(areas) < 0.08
    assert min(areas) > 0  # never empty
    assert max(areas) < 0.35


def test_simplex_box_is_one_filled_rectangle_of_sane_area() -> None:
    config = dataclasses.replace(BASE, kind="simplex")
    image = _image(0, size=64)
    areas = []
    for seed in range(100):
        mask = synthesize(image, config, np.random.default_rng(seed)).mask
        rows, cols = np.nonzero(mask)
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all()  # the whole bounding box changed, nothing outside it
        sides = (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
        assert all(8 <= side <= 32 for side in sides)  # sides in [1/8, 1/2] of 64 px
        areas.append(mask.mean())
    # E[area] = E[u]^2 with u ~ U(1/8, 1/2): 0.3125^2 = 0.098 (slightly less after flooring)
    assert 0.08 < np.mean(areas) < 0.11


def test_unreachable_threshold_falls_back_to_one_small_blob() -> None:
    # Perlin noise never exceeds 1, so every draw is empty and the blob must take over.
    for seed in range(20):
        mask = perlin_mask((64, 64), 4, 2.0, np.random.default_rng(seed))
        assert mask.any()
        assert ndimage.label(mask)[1] == 1
        assert mask.mean() <= math.pi / 64 + 0.01  # radii at most 1/8 of the side


def test_procedural_texture_is_a_non_constant_colour_image_in_range() -> None:
    for seed in range(20):
        texture = procedural_texture((32, 40), np.random.default_rng(seed))
        assert texture.shape == (32, 40, 3) and texture.dtype == np.float32
        assert texture.min() >= 0.0 and texture.max() <= 1.0
        assert texture.std(axis=(0, 1)).max() > 0.02


def test_wrong_shapes_raise_value_errors_naming_the_problem() -> None:
    # An unknown kind is refused by the config (test_config); synthesis trusts it.
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"`image` must have shape \(H, W, 3\)"):
        synthesize(np.zeros((8, 8)), BASE, rng)
    with pytest.raises(ValueError, match=r"`foreign` must have shape \(8, 8, 3\)"):
        synthesize(np.zeros((8, 8, 3)), BASE, rng, foreign=np.zeros((4, 4, 3)))


def _pasted_from(image: np.ndarray, out: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the masked rectangle of `out` is a same-size rectangle of `image` (other place),
    up to the MIN_CHANGE nudge of pixels the paste left unchanged."""
    rows, cols = np.nonzero(mask)
    top, left = rows.min(), cols.min()
    h, w = rows.max() - top + 1, cols.max() - left + 1
    patch = out[top : top + h, left : left + w]
    for y in range(image.shape[0] - h + 1):
        for x in range(image.shape[1] - w + 1):
            if (y, x) != (top, left) and np.abs(
                image[y : y + h, x : x + w] - patch
            ).max() <= MIN_CHANGE + 1e-6:
                return True
    return False


def test_cutpaste_moves_a_rectangle_of_the_image_itself() -> None:
    config = dataclasses.replace(BASE, kind="cutpaste", texture_source="other_class")
    foreign = np.full((SIZE, SIZE, 3), 0.5, np.float32)  # never used by cutpaste
    areas = []
    for seed in range(20):
        image = np.random.default_rng(seed).random((SIZE, SIZE, 3)).astype(np.float32)
        out = synthesize(image, config, np.random.default_rng(seed), foreign)
        rows, cols = np.nonzero(out.mask)
        box = out.mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all()  # one filled rectangle
        assert _pasted_from(image, out.image, out.mask == 1)
        areas.append(out.mask.mean())
    # CUTPASTE_AREA: 2 % to 15 % of the image (rounding of the sides moves it a little)
    assert min(areas) > 0.01 and max(areas) < 0.2


def test_perlin_cutpaste_draws_each_recipe_about_half_the_time() -> None:
    config = dataclasses.replace(BASE, kind="perlin_cutpaste", texture_source="other_class")
    image = np.zeros((SIZE, SIZE, 3), np.float32)
    image[:, :, 0] = np.linspace(0, 1, SIZE, dtype=np.float32)  # columns differ, rows repeat
    foreign = np.full((SIZE, SIZE, 3), 0.5, np.float32)
    foreign_used = []
    for seed in range(60):
        out = synthesize(image, config, np.random.default_rng(seed), foreign)
        inside = out.image[out.mask == 1]
        # a perlin blend mixes in the foreign 0.5 in the blue channel; a paste keeps it 0 (or
        # the nudge MIN_CHANGE where the paste changed nothing)
        foreign_used.append(bool(inside[:, 2].max() > 2 * MIN_CHANGE))
    assert 0.3 < np.mean(foreign_used) < 0.7
