"""Evaluation metrics of MDD-Net's MUAD protocol: image/pixel AUROC, AP, F1-max, AUPRO and mAD.

Papers in this field disagree mostly because metrics are computed differently, so every definition
here is the reference one and is pinned by tests:

- AUROC and AP as scikit-learn defines them (image level: scikit-learn itself; pixel level: the
  same numbers derived from the sorted scores, proved equal to scikit-learn in the tests, because
  scikit-learn takes about 16 s per 11 M pixels, minutes for MVTec AD's 113 M).
- F1-max: the maximum F1 over every threshold of the precision-recall curve.
- AUPRO, the MVTec AD definition: regions are the 8-connected components of each mask; at each
  threshold (every distinct score, pixel above when score >= threshold) FPR is over all normal
  pixels and PRO is the mean over all regions of the fraction of the region above; the curve from
  (0, 0) is integrated with the trapezoid rule up to `fpr_limit` (interpolated there) and divided
  by `fpr_limit`.

Every distinct score is a threshold. Instead of one global argsort, the normal and the anomalous
pixel scores are sorted separately (several times faster) and binary search in each sorted group
gives the confusion counts at any threshold: the same curves, ties grouped, computed once and
shared by all pixel metrics in `compute_all`.

Pixel maps are converted to float32 (float16 exactly; float64 rounded): maps come from float32
networks, and float32 halves the memory and time of the sorts. Image scores are float64.
Only numpy, scipy and scikit-learn are used, so metrics never import torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

__all__ = [
    "loss_plateau",
    "METRIC_NAMES",
    "PerClassMetrics",
    "compute_all",
    "compute_per_class",
    "image_ap",
    "image_auroc",
    "image_f1_max",
    "pixel_ap",
    "pixel_aupro",
    "pixel_auroc",
    "pixel_f1_max",
]

log = logging.getLogger(__name__)

METRIC_NAMES = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
    "mad",
)
"""Keys of `compute_all`'s dict, in table order; `mad` is the mean of the seven before it."""

# 8-connectivity inside each image and none across images, so one `ndimage.label` call on the
# (N, H, W) stack labels every image's regions with ids unique over the whole stack.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


class PerClassMetrics(NamedTuple):
    """Metrics of each class and their mean over classes (the number papers report)."""

    per_class: dict[str, dict[str, float]]
    mean: dict[str, float]


class _PixelRanking(NamedTuple):
    """Pixel scores split by ground truth and sorted once, shared by all pixel metrics.

    Sorting the two groups separately (np.sort of the normal pixels, argsort of the few anomalous
    ones) is about ten times faster than one argsort of all pixels and gives the same curves:
    the confusion counts at any threshold are found by binary search in each group.
    """

    normal: np.ndarray  # (num_normal,) float32 scores of normal pixels, ascending
    anomalous: np.ndarray  # (num_anomalous,) float32 scores of anomalous pixels, ascending
    pro_weight: np.ndarray | None  # (num_anomalous,) float64 1 / (regions * own region size)


class _CountsAtPositives(NamedTuple):
    """Confusion counts at each distinct anomalous score v (threshold: score >= v)."""

    count: np.ndarray  # (D,) int64 anomalous pixels scoring exactly v
    tp: np.ndarray  # (D,) int64 anomalous pixels scoring >= v
    fp: np.ndarray  # (D,) int64 normal pixels scoring >= v
    normal_below: np.ndarray  # (D,) int64 normal pixels scoring < v
    normal_tied: np.ndarray  # (D,) int64 normal pixels scoring == v


# ---------------------------------------------------------------------------------------------
# Validation


def _binary(name: str, values: ArrayLike) -> np.ndarray:
    """Ground truth as bool; anything but 0/1 is refused (a 0/255 mask would count as all ones)."""
    array = np.asarray(values)
    if array.dtype == bool:
        return array
    bad = array.size - np.count_nonzero((array == 0) | (array == 1))
    if bad:
        raise ValueError(
            f"{name}: {bad} of {array.size} values are not 0 or 1; pass binary ground truth "
            f"(e.g. `{name} > 0` for 0/255 masks)"
        )
    return array.astype(bool)


def _check_finite(name: str, array: np.ndarray) -> None:
    """Refuse NaN and inf: they would silently reorder the ranking."""
    if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name}: expected real numbers, got dtype {array.dtype}")
    bad = array.size - np.count_nonzero(np.isfinite(array))
    if bad:
        raise ValueError(
            f"{name}: {bad} of {array.size} values are NaN or infinite; fix the scoring step "
            f"that produced them before computing metrics"
        )


def _require_classes(name: str, positives: int, negatives: int, need_negative: bool) -> None:
    if positives == 0:
        raise ValueError(f"{name}: no anomalous sample; the metric needs at least one")
    if need_negative and negatives == 0:
        raise ValueError(f"{name}: no normal sample; the metric needs at least one")


def _image_inputs(
    labels: ArrayLike, scores: ArrayLike, need_negative: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Validated (N,) bool labels and (N,) float64 scores."""
    labels = _binary("labels", labels)
    scores = np.asarray(scores)
    _check_finite("scores", scores)
    scores = scores.astype(np.float64, copy=False)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"labels shape {labels.shape} and scores shape {scores.shape} must both be (N,); "
            f"pass one label and one score per image"
        )
    positives = int(np.count_nonzero(labels))
    _require_classes("labels", positives, labels.size - positives, need_negative)
    return labels, scores


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        raise ValueError(
            f"fpr_limit must be in (0, 1], got {fpr_limit!r} (evaluate.aupro_fpr_limit; "
            f"MVTec AD uses 0.3)"
        )


# ---------------------------------------------------------------------------------------------
# Image level: scikit-learn itself


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image AUROC (scikit-learn's `roc_auc_score`); labels (N,) in {0, 1}, scores (N,)."""
    labels, scores = _image_inputs(labels, scores, need_negative=True)
    return float(roc_auc_score(labels, scores))


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image average precision (scikit-learn's `average_precision_score`)."""
    labels, scores = _image_inputs(labels, scores, need_negative=False)
    return float(average_precision_score(labels, scores))


def image_f1_max(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image F1-max: the best F1 over all thresholds of scikit-learn's precision-recall curve."""
    labels, scores = _image_inputs(labels, scores, need_negative=False)
    precision, recall, _ = precision_recall_curve(labels, scores)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return float(f1.max())


# ---------------------------------------------------------------------------------------------
# Pixel level: one sort shared by every metric


def _rank_pixels(
    masks: ArrayLike, maps: ArrayLike, need_negative: bool, with_regions: bool
) -> _PixelRanking:
    """Validate (N, H, W) masks and maps and sort the pixel scores of each ground-truth group.

    `with_regions` also labels the regions and weights each anomalous pixel for PRO (AUPRO only).
    """
    masks = _binary("masks", masks)
    maps = np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"masks shape {masks.shape} and maps shape {maps.shape} must both be (N, H, W); "
            f"pass one map per mask at the mask's resolution"
        )
    _check_finite("maps", maps)  # each group is converted to float32 after the split
    is_anomalous = masks.reshape(-1)  # (P,) bool, a view
    scores = maps.reshape(-1)  # (P,) a view
    normal = scores[~is_anomalous].astype(np.float32, copy=False)  # (num_normal,)
    normal.sort()
    anomalous = scores[is_anomalous].astype(np.float32, copy=False)  # (num_anomalous,)
    _require_classes("masks", anomalous.size, normal.size, need_negative)
    if not with_regions:
        anomalous.sort()
        return _PixelRanking(normal, anomalous, None)
    regions, num_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)  # (N, H, W) int32
    region_of = regions.reshape(-1)[is_anomalous]  # (num_anomalous,) ids in 1..num_regions
    del regions
    region_weight = 1.0 / (num_regions * np.bincount(region_of)[1:])  # (num_regions,)
    anomalous, region_of = _sort_with_ids(anomalous, region_of)
    log.debug(
        "pixel ranking: %d normal, %d anomalous pixels, %d regions",
        normal.size,
        anomalous.size,
        num_regions,
    )
    return _PixelRanking(normal, anomalous, region_weight[region_of - 1])


def _sort_with_ids(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort float32 `scores` ascending, carrying non-negative int32 `ids` along.

    np.argsort has no SIMD path and is 3-10 times slower than np.sort of int64 (1.4-5 s against
    0.5 s for 10 M values on 2 shared cores), so each pair is packed into one int64 key that sorts
    like the score: the high 32 bits are the float's bits made monotonic (for negative floats the
    magnitude bits are reversed), the low 32 bits the id.
    """
    bits = scores.view(np.int32).astype(np.int64)  # (A,) sign-extended
    flip = np.int64(0x7FFFFFFF)
    keys = np.where(bits < 0, bits ^ flip, bits) * 2**32 + ids  # (A,) int64
    keys.sort()
    high = keys >> 32  # (A,) arithmetic shift: back to the monotonic bits
    sorted_scores = np.where(high < 0, high ^ flip, high).astype(np.int32).view(np.float32)
    return sorted_scores, (keys & 0xFFFFFFFF).astype(np.int32)


def _counts_at_positives(ranking: _PixelRanking) -> _CountsAtPositives:
    """Counts at every distinct anomalous score: the only thresholds where recall changes."""
    anomalous, normal = ranking.anomalous, ranking.normal
    starts = np.flatnonzero(np.r_[True, anomalous[1:] != anomalous[:-1]])  # (D,)
    values = anomalous[starts]  # (D,) ascending distinct scores
    below = np.searchsorted(normal, values, side="left")
    tied = np.searchsorted(normal, values, side="right") - below
    return _CountsAtPositives(
        count=np.diff(np.r_[starts, anomalous.size]),
        tp=anomalous.size - starts,
        fp=normal.size - below,
        normal_below=below,
        normal_tied=tied,
    )


def _auroc(counts: _CountsAtPositives, num_normal: int) -> float:
    """Mann-Whitney form of the ROC area, ties counted one half (what the ROC trapezoid gives).

    Summed in int64 as twice the value, so the only rounding is the final division.
    """
    doubled = np.sum(counts.count * (2 * counts.normal_below + counts.normal_tied))
    return float(doubled / (2 * int(counts.count.sum()) * num_normal))


def _ap(counts: _CountsAtPositives) -> float:
    """Sum over thresholds of (recall step) x precision, as scikit-learn's AP."""
    precision = counts.tp / (counts.tp + counts.fp)
    return float(np.sum(counts.count * precision) / counts.count.sum())


def _f1_max(counts: _CountsAtPositives) -> float:
    """F1 = 2 TP / (TP + FP + P). Lowering the threshold past normal pixels only adds FP, so the
    maximum over all thresholds is reached at a distinct anomalous score."""
    return float(np.max(2 * counts.tp / (counts.tp + counts.fp + counts.count.sum())))


def _aupro(ranking: _PixelRanking, fpr_limit: float) -> float:
    """Exact normalised area under the PRO curve up to `fpr_limit`.

    The curve is vertical while only anomalous pixels cross the threshold, so its area is the sum,
    over distinct normal scores v, of a trapezoid from (FPR(> v), PRO(> v)) to (FPR(>= v),
    PRO(>= v)). Only the highest `fpr_limit` fraction of normal scores starts a segment before
    the limit, so only those are visited.
    """
    normal, anomalous = ranking.normal, ranking.anomalous
    # (num_anomalous + 1,) PRO of the pixels at sorted index >= i, i.e. of those scoring >= v for
    # i = searchsorted(anomalous, v, "left"); the last entry is 0 (nothing above).
    pro_from = np.r_[np.cumsum(ranking.pro_weight[::-1])[::-1], 0.0]
    # The highest normal scores: every normal pixel down to rank ceil(limit * num_normal) and the
    # rest of its group of ties (one extra rank guards the float product).
    needed = min(normal.size, math.ceil(fpr_limit * normal.size) + 1)
    top = normal[np.searchsorted(normal, normal[normal.size - needed], side="left") :]  # (T,)
    starts = np.flatnonzero(np.r_[True, top[1:] != top[:-1]])  # (G,) one per distinct score
    values = top[starts]  # (G,) ascending
    fpr_high = (top.size - starts) / normal.size  # normal pixels scoring >= v
    fpr_low = (top.size - np.r_[starts[1:], top.size]) / normal.size  # scoring > v
    pro_high = pro_from[np.searchsorted(anomalous, values, side="left")]
    pro_low = pro_from[np.searchsorted(anomalous, values, side="right")]
    inside = fpr_low < fpr_limit  # segments that start before the limit
    fpr_low, fpr_high = fpr_low[inside], fpr_high[inside]
    pro_low, pro_high = pro_low[inside], pro_high[inside]
    # At most one segment crosses the limit: cut it there, interpolating PRO linearly.
    cut = np.minimum(fpr_high, fpr_limit)
    pro_cut = pro_low + (pro_high - pro_low) * (cut - fpr_low) / (fpr_high - fpr_low)
    area = np.sum((cut - fpr_low) * (pro_low + pro_cut)) / 2 / fpr_limit
    return float(np.clip(area, 0.0, 1.0))  # summed weights can overshoot 1 by a few ulps


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel AUROC over all pixels of all images; masks (N, H, W) binary, maps (N, H, W)."""
    ranking = _rank_pixels(masks, maps, need_negative=True, with_regions=False)
    return _auroc(_counts_at_positives(ranking), ranking.normal.size)


def pixel_ap(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel average precision over all pixels of all images."""
    ranking = _rank_pixels(masks, maps, need_negative=False, with_regions=False)
    return _ap(_counts_at_positives(ranking))


def pixel_f1_max(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel F1-max over all pixels of all images."""
    ranking = _rank_pixels(masks, maps, need_negative=False, with_regions=False)
    return _f1_max(_counts_at_positives(ranking))


def pixel_aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """AUPRO (MVTec AD definition) up to `fpr_limit` in (0, 1], normalised by `fpr_limit`."""
    _check_fpr_limit(fpr_limit)
    return _aupro(_rank_pixels(masks, maps, need_negative=True, with_regions=True), fpr_limit)


# ---------------------------------------------------------------------------------------------
# All metrics, per class


def compute_all(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: ArrayLike,
    maps: ArrayLike,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All seven metrics and their mean `mad`, as fractions, keyed by `METRIC_NAMES`.

    The pixel metrics share one sort. An image labelled normal with anomalous pixels (or the
    reverse) is logged as a warning: it usually means labels and masks are misaligned.
    """
    _check_fpr_limit(fpr_limit)
    values = {
        "image_auroc": image_auroc(labels, scores),
        "image_ap": image_ap(labels, scores),
        "image_f1_max": image_f1_max(labels, scores),
    }
    labels, masks = np.asarray(labels), _binary("masks", masks)
    if masks.ndim != 3 or masks.shape[0] != labels.size:
        raise ValueError(
            f"{labels.size} labels but masks of shape {masks.shape}; pass one label, score, "
            f"(H, W) mask and map per image, in the same order"
        )
    mismatched = np.count_nonzero(masks.any(axis=(1, 2)) != labels)
    if mismatched:
        log.warning(
            "%d of %d images have a label that disagrees with their mask being empty",
            mismatched,
            labels.size,
        )
    ranking = _rank_pixels(masks, maps, need_negative=True, with_regions=True)
    counts = _counts_at_positives(ranking)
    values["pixel_auroc"] = _auroc(counts, ranking.normal.size)
    values["pixel_ap"] = _ap(counts)
    values["pixel_f1_max"] = _f1_max(counts)
    values["pixel_aupro"] = _aupro(ranking, fpr_limit)
    values["mad"] = float(np.mean(list(values.values())))
    return values


def compute_per_class(
    class_names: Sequence[str],
    class_ids: ArrayLike,
    labels: ArrayLike,
    scores: ArrayLike,
    masks: ArrayLike,
    maps: ArrayLike,
    fpr_limit: float = 0.3,
) -> PerClassMetrics:
    """`compute_all` for each class (class_ids (N,) index class_names) and the mean over classes.

    Papers report the mean over classes, not metrics pooled over all images; a class without
    test images is an error rather than silently leaving the mean.
    """
    class_ids = np.asarray(class_ids)
    if class_ids.ndim != 1 or not np.issubdtype(class_ids.dtype, np.integer):
        raise ValueError(
            f"class_ids must be a 1-D integer array indexing class_names, got shape "
            f"{class_ids.shape} dtype {class_ids.dtype}"
        )
    if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= len(class_names)):
        raise ValueError(
            f"class_ids must lie in [0, {len(class_names)}) to index class_names, got "
            f"[{class_ids.min()}, {class_ids.max()}]"
        )
    labels, scores = np.asarray(labels), np.asarray(scores)
    masks, maps = np.asarray(masks), np.asarray(maps)
    per_class = {}
    for index, name in enumerate(class_names):
        rows = np.flatnonzero(class_ids == index)
        if rows.size == 0:
            raise ValueError(
                f"class {name!r} has no test images (class_ids never equals {index}); "
                f"drop it from class_names or add its images"
            )
        try:
            per_class[name] = compute_all(
                labels[rows], scores[rows], masks[rows], maps[rows], fpr_limit
            )
        except ValueError as err:
            raise ValueError(f"class {name!r}: {err}") from err
    mean = {key: float(np.mean([m[key] for m in per_class.values()])) for key in METRIC_NAMES}
    return PerClassMetrics(per_class, mean)


def loss_plateau(values: Sequence[float]) -> float:
    """Relative drop of the mean loss from the second-last to the last tenth of the steps.

    A training diagnostic, not a detection metric: near 0 means the loss reached its plateau
    (how a step budget is judged without looking at test results); NaN under 20 steps.
    """
    values = np.asarray(values, dtype=np.float64)
    tenth = len(values) // 10
    if tenth < 2:
        return float("nan")
    before, last = values[-2 * tenth : -tenth].mean(), values[-tenth:].mean()
    return float((before - last) / before) if before else 0.0
