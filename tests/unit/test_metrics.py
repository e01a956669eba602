"""Metrics against scikit-learn, brute-force loops and hand-derived values."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from mddnet.metrics import (
    METRIC_NAMES,
    compute_all,
    compute_per_class,
    image_ap,
    image_auroc,
    image_f1_max,
    pixel_ap,
    pixel_aupro,
    pixel_auroc,
    pixel_f1_max,
)

FPR_LIMITS = (0.3, 0.05, 0.123, 0.5, 1.0)


# ---------------------------------------------------------------------------------------------
# Independent references: one threshold at a time, as the definitions read


def brute_force_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    labels, scores = labels.ravel().astype(bool), scores.ravel()
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = np.sum(predicted & labels)
        fp = np.sum(predicted & ~labels)
        fn = np.sum(~predicted & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Label each image's 8-connected regions, then walk every distinct threshold downwards."""
    regions = []  # (image index, (H, W) bool region)
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == k) for k in range(1, count + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        above = maps >= threshold
        fpr = np.sum(above & normal) / np.sum(normal)
        pro = np.mean([above[index][region].mean() for index, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


# ---------------------------------------------------------------------------------------------
# Random small cases


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) masks mixing empty images, speckle (many 8-connected regions) and blobs, and
    float32 maps with few levels (heavy ties) or many, shifted up inside the masks, half of
    them partly negative."""
    n, h, w = rng.integers(1, 5), rng.integers(3, 9), rng.integers(3, 9)
    masks = np.zeros((n, h, w), dtype=bool)
    for mask in masks:
        kind = rng.integers(3)
        if kind == 1:
            mask[:] = rng.random((h, w)) < 0.2
        elif kind == 2:
            mask[:] = ndimage.gaussian_filter(rng.random((h, w)), 1.0) > 0.55
    if not masks.any():
        masks[0, rng.integers(h), rng.integers(w)] = True
    if masks.all():
        masks[0, 0, 0] = False
    levels = int(rng.choice([2, 3, 5, 16, 1_000_000]))
    maps = rng.integers(0, levels, size=masks.shape) + rng.integers(0, 3) * masks
    return masks, (maps / levels - rng.integers(0, 2) / 2).astype(np.float32)


CASES = [random_case(np.random.default_rng(seed)) for seed in range(60)]


def test_random_cases_cover_ties_multiple_regions_and_empty_images() -> None:
    """The comparisons below only prove something if the cases contain the hard situations."""
    full = np.ones((3, 3))
    ties = sum(np.unique(maps).size < maps.size for _, maps in CASES)
    empty = sum((~masks.any(axis=(1, 2))).any() for masks, _ in CASES)
    multi = sum(any(ndimage.label(m, full)[1] > 1 for m in masks) for masks, _ in CASES)
    tied_across = sum(np.intersect1d(maps[masks], maps[~masks]).size > 0 for masks, maps in CASES)
    negative = sum((maps < 0).any() for _, maps in CASES)
    assert min(ties, empty, multi, tied_across, negative) >= 10


@pytest.mark.parametrize("case", range(len(CASES)))
def test_pixel_auroc_and_ap_equal_scikit_learn(case: int) -> None:
    masks, maps = CASES[case]
    assert pixel_auroc(masks, maps) == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9
    )
    assert pixel_ap(masks, maps) == pytest.approx(
        average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9
    )


@pytest.mark.parametrize("case", range(len(CASES)))
def test_pixel_f1_max_equals_brute_force_threshold_loop(case: int) -> None:
    masks, maps = CASES[case]
    assert pixel_f1_max(masks, maps) == pytest.approx(brute_force_f1_max(masks, maps), abs=1e-9)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_pixel_aupro_equals_brute_force_at_several_fpr_limits(case: int) -> None:
    masks, maps = CASES[case]
    for limit in FPR_LIMITS:
        expected = brute_force_aupro(masks, maps, limit)
        assert pixel_aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_image_metrics_equal_scikit_learn_and_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=int(rng.integers(4, 40)))
    labels[:2] = [0, 1]
    scores = rng.integers(0, int(rng.choice([3, 10, 1000])), size=labels.size) + labels
    assert image_auroc(labels, scores) == roc_auc_score(labels, scores)
    assert image_ap(labels, scores) == average_precision_score(labels, scores)
    assert image_f1_max(labels, scores) == pytest.approx(
        brute_force_f1_max(labels, scores), abs=1e-12
    )


# ---------------------------------------------------------------------------------------------
# Hand-derived values


def test_image_metrics_match_hand_derived_values() -> None:
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # ROC: 3 of the 4 (anomalous, normal) pairs are ordered correctly.
    assert image_auroc(labels, scores) == pytest.approx(0.75)
    # AP: recall 1/2 at precision 1 (t=0.8), recall 1 at precision 2/3 (t=0.35).
    assert image_ap(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # F1 at t=0.35: TP 2, FP 1, FN 0 -> 4/5, better than 2/3 at t=0.8.
    assert image_f1_max(labels, scores) == pytest.approx(0.8)


def test_pixel_metrics_count_ties_as_half_and_group_them() -> None:
    masks = np.array([[[True, False, False, True]]])
    maps = np.array([[[0.5, 0.5, 0.2, 0.9]]], dtype=np.float32)
    # Pairs (a, n): (0.5, 0.5) tie -> 1/2, (0.5, 0.2) 1, (0.9, .) 2 -> 3.5 / 4.
    assert pixel_auroc(masks, maps) == pytest.approx(3.5 / 4)
    # t=0.9: P 1, R 1/2; t=0.5 (one group, not two thresholds): P 2/3, R 1.
    assert pixel_ap(masks, maps) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert pixel_f1_max(masks, maps) == pytest.approx(0.8)


# One row: regions {0, 1} and {5}; normals at 0.7, 0.5, 0.2. The PRO curve is
# (0,0) (0,1/4) (1/3,1/4) (1/3,3/4) (2/3,3/4) (2/3,1) (1,1).
ROW_MASK = np.array([[[1, 1, 0, 0, 0, 1]]], dtype=bool)
ROW_MAP = np.array([[[0.8, 0.4, 0.7, 0.5, 0.2, 0.6]]], dtype=np.float32)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (1.0, (1 / 3 * 1 / 4 + 1 / 3 * 3 / 4 + 1 / 3 * 1) / 1.0),
        (0.5, (1 / 3 * 1 / 4 + (0.5 - 1 / 3) * 3 / 4) / 0.5),  # cut in a flat segment
        (0.25, (0.25 * 1 / 4) / 0.25),
    ],
)
def test_aupro_matches_hand_derived_curve(limit: float, expected: float) -> None:
    assert pixel_aupro(ROW_MASK, ROW_MAP, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


def test_aupro_interpolates_a_tie_between_normal_and_anomalous_pixels() -> None:
    maps = ROW_MAP.copy()
    maps[0, 0, 3] = 0.6  # a normal pixel ties the one-pixel region: one diagonal segment
    # (1/3, 1/4) -> (2/3, 3/4), cut at 0.5 where PRO = 1/2.
    expected = (1 / 3 * 1 / 4 + (0.5 - 1 / 3) * (1 / 4 + 1 / 2) / 2) / 0.5
    assert pixel_aupro(ROW_MASK, maps, fpr_limit=0.5) == pytest.approx(expected, abs=1e-12)


def test_aupro_regions_are_8_connected_within_an_image() -> None:
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True  # (0,1)-(1,2) touch diagonally
    maps = np.full((1, 3, 3), 0.5, dtype=np.float32)
    maps[masks] = 0.0
    maps[0, 1, 2] = 1.0
    # One region of 3 pixels, 1 above every normal one: PRO 1/3 over the whole FPR range
    # (two 4-connected regions would give 1/2).
    assert pixel_aupro(masks, maps, fpr_limit=1.0) == pytest.approx(1 / 3)


def test_aupro_regions_do_not_connect_across_images() -> None:
    masks = np.array([[[1, 1, 0]], [[1, 0, 0]]], dtype=bool)
    maps = np.array([[[1.0, 1.0, 0.5]], [[0.0, 0.5, 0.5]]], dtype=np.float32)
    # Two regions, fractions 1 and 0 above the normals: 1/2 (one merged region would be 2/3).
    assert pixel_aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("limit", FPR_LIMITS)
def test_aupro_is_one_for_a_perfect_map_and_zero_for_an_inverted_one(limit: float) -> None:
    masks, _ = CASES[0]
    perfect = pixel_aupro(masks, masks.astype(np.float32), fpr_limit=limit)
    assert perfect == pytest.approx(1.0, abs=1e-12) and perfect <= 1.0
    assert pixel_aupro(masks, (~masks).astype(np.float32), fpr_limit=limit) == 0.0


def test_aupro_ranks_signed_zeros_and_extreme_floats_by_value() -> None:
    big, tiny = np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal
    masks = np.array([[[1, 0, 1, 0, 0, 0, 1, 0, 0, 1]]], dtype=bool)
    maps = np.array([[[-0.0, 0.0, -big, big, -tiny, tiny, tiny, -1.0, 0.0, 0.0]]], np.float32)
    for limit in FPR_LIMITS:
        expected = brute_force_aupro(masks, maps, limit)
        assert pixel_aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Dtypes


def test_float16_maps_give_the_float32_results() -> None:
    masks, maps = CASES[5]
    half = maps.astype(np.float16)
    single = half.astype(np.float32)
    assert pixel_auroc(masks, half) == pixel_auroc(masks, single)
    assert pixel_aupro(masks, half) == pixel_aupro(masks, single)


def test_float64_maps_are_ranked_as_their_float32_rounding() -> None:
    masks = np.array([[[True, False]]])
    maps = np.array([[[1.0, 1.0 + 1e-12]]])  # distinct in float64, tied in float32
    assert pixel_auroc(masks, maps) == 0.5
    assert roc_auc_score(masks.ravel(), maps.ravel()) == 0.0


# ---------------------------------------------------------------------------------------------
# compute_all and per-class means


def image_level_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels consistent with the masks (at least one normal and one anomalous image)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 8, 8), dtype=bool)
    for mask in masks[3:]:
        top, left = rng.integers(0, 5, size=2)
        mask[top : top + 3, left : left + rng.integers(1, 4)] = True
    maps = (rng.random(masks.shape) + masks).astype(np.float32)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2)) + rng.normal(0, 0.3, size=labels.size)
    return labels, scores, masks, maps


def test_compute_all_equals_the_single_metrics_and_mad_is_their_mean() -> None:
    labels, scores, masks, maps = image_level_case(0)
    result = compute_all(labels, scores, masks, maps, fpr_limit=0.2)
    expected = {
        "image_auroc": image_auroc(labels, scores),
        "image_ap": image_ap(labels, scores),
        "image_f1_max": image_f1_max(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "pixel_ap": pixel_ap(masks, maps),
        "pixel_f1_max": pixel_f1_max(masks, maps),
        "pixel_aupro": pixel_aupro(masks, maps, fpr_limit=0.2),
    }
    assert list(result) == list(METRIC_NAMES)
    for name, value in expected.items():
        assert result[name] == value
    assert result["mad"] == pytest.approx(sum(expected.values()) / 7)
    assert all(0 <= v <= 1 for v in result.values())


def test_compute_all_warns_when_labels_disagree_with_masks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    labels, scores, masks, maps = image_level_case(1)
    labels[3] = 0  # an image with anomalous pixels labelled normal
    with caplog.at_level(logging.WARNING, logger="mddnet.metrics"):
        compute_all(labels, scores, masks, maps)
    assert "1 of 6 images" in caplog.text


def test_per_class_mean_is_the_mean_of_class_metrics_not_the_pooled_metrics() -> None:
    parts = [image_level_case(seed) for seed in (2, 3)]
    parts[1] = (parts[1][0], parts[1][1] + 5.0, parts[1][2], parts[1][3] * 3)  # other scale
    labels, scores, masks, maps = (np.concatenate(p) for p in zip(*parts, strict=True))
    class_ids = np.repeat([1, 0], 6)  # the second half is class 0
    per_class, mean = compute_per_class(["b", "a"], class_ids, labels, scores, masks, maps)
    # Only the order of summing tied PRO weights may differ: equal to rounding.
    assert per_class["a"] == pytest.approx(compute_all(*parts[1]), abs=1e-12)
    assert per_class["b"] == pytest.approx(compute_all(*parts[0]), abs=1e-12)
    for name in METRIC_NAMES:
        assert mean[name] == pytest.approx((per_class["a"][name] + per_class["b"][name]) / 2)
    pooled = compute_all(labels, scores, masks, maps)
    assert pooled["image_auroc"] != pytest.approx(mean["image_auroc"])


def test_per_class_refuses_a_class_without_images_and_out_of_range_ids() -> None:
    labels, scores, masks, maps = image_level_case(4)
    with pytest.raises(ValueError, match="class 'empty' has no test images"):
        compute_per_class(["a", "empty"], np.zeros(6, int), labels, scores, masks, maps)
    with pytest.raises(ValueError, match=r"class_ids must lie in \[0, 1\)"):
        compute_per_class(["a"], np.arange(6), labels, scores, masks, maps)


def test_per_class_error_names_the_class() -> None:
    labels, scores, masks, maps = image_level_case(5)
    class_ids = np.array([0, 0, 0, 1, 1, 1])  # class 'a' has only normal images
    with pytest.raises(ValueError, match="class 'a': labels: no anomalous sample"):
        compute_per_class(["a", "b"], class_ids, labels, scores, masks, maps)


# ---------------------------------------------------------------------------------------------
# Validation


def test_nan_or_inf_is_refused_with_the_count() -> None:
    masks, maps = CASES[0]
    maps = maps.copy()
    maps.flat[:2] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=f"maps: 2 of {maps.size} values are NaN or infinite"):
        pixel_auroc(masks, maps)
    with pytest.raises(ValueError, match="scores: 1 of 3 values are NaN or infinite"):
        image_auroc([0, 1, 1], [0.1, np.nan, 0.3])


@pytest.mark.parametrize(
    "metric", [pixel_auroc, pixel_ap, pixel_f1_max, pixel_aupro], ids=lambda f: f.__name__
)
def test_pixel_inputs_are_validated(metric) -> None:
    masks, maps = CASES[0]
    with pytest.raises(ValueError, match="must both be \\(N, H, W\\)"):
        metric(masks, maps[:, :, :-1])
    with pytest.raises(ValueError, match="not 0 or 1.*masks > 0"):
        metric(masks * 255, maps)
    with pytest.raises(ValueError, match="masks: no anomalous sample"):
        metric(np.zeros_like(masks), maps)


def test_metrics_that_need_normal_samples_refuse_their_absence() -> None:
    masks = np.ones((1, 2, 2), dtype=bool)
    maps = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    for metric in (pixel_auroc, pixel_aupro):
        with pytest.raises(ValueError, match="masks: no normal sample"):
            metric(masks, maps)
    assert pixel_ap(masks, maps) == 1.0  # precision is 1 at every threshold
    with pytest.raises(ValueError, match="labels: no normal sample"):
        image_auroc([1, 1], [0.2, 0.4])
    assert image_ap([1, 1], [0.2, 0.4]) == 1.0


def test_image_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match=r"labels shape \(3,\) and scores shape \(2,\)"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels: 1 of 3 values are not 0 or 1"):
        image_ap([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels: no anomalous sample"):
        image_f1_max([0, 0], [0.1, 0.2])


@pytest.mark.parametrize("limit", [0.0, -0.1, 1.5])
def test_fpr_limit_outside_zero_one_is_refused(limit: float) -> None:
    masks, maps = CASES[0]
    with pytest.raises(ValueError, match="fpr_limit must be in \\(0, 1\\]"):
        pixel_aupro(masks, maps, fpr_limit=limit)


def test_compute_all_refuses_labels_that_do_not_match_the_masks() -> None:
    labels, scores, masks, maps = image_level_case(6)
    with pytest.raises(ValueError, match="5 labels but masks of shape \\(6, 8, 8\\)"):
        compute_all(labels[:5], scores[:5], masks, maps)


# ---------------------------------------------------------------------------------------------
# Packaging and real masks


@pytest.mark.slow
def test_importing_metrics_does_not_import_torch() -> None:
    probe = "import sys, mddnet.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


@pytest.mark.real_data
def test_aupro_on_real_mvtec_masks_equals_brute_force(real_data: Path) -> None:
    """Real defect shapes (bottle, 256 px, downsampled to 64 px to keep the loop short)."""
    paths = sorted((real_data / "mvtec_ad_bottle" / "bottle" / "ground_truth").glob("*/*.png"))
    assert len(paths) == 63
    masks = np.stack([np.asarray(Image.open(p))[::4, ::4] > 0 for p in paths[::3]])
    masks = np.concatenate([masks, np.zeros((5, 64, 64), dtype=bool)])  # good images
    rng = np.random.default_rng(0)
    blurred = ndimage.gaussian_filter(masks.astype(float), (0, 3, 3))
    maps = np.round((blurred + rng.random(masks.shape)) * 20).astype(np.float32)  # ~40 levels
    regions = sum(ndimage.label(mask, np.ones((3, 3)))[1] for mask in masks)
    assert regions > len(masks) - 5  # some images hold several regions
    assert pixel_aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps, 0.3), abs=1e-9)
