"""Time and measure `mddnet.metrics` on MVTec-AD-sized input, against the usual threshold loop.

Input: 1725 maps of 256x256 (113 M pixels) like MVTec AD's test set: 73% of the images anomalous
with 1-3 elliptic regions each, about 10% of all pixels anomalous, random float32 scores (higher
on average inside the regions so the curves are not trivial).

Baseline: the AUPRO loop found in many repositories (200 evenly spaced thresholds; at each, every
ground-truth mask is labelled and each region's overlap measured; FPR cut at the limit, rescaled
to [0, 1] and integrated). It is slow, so it runs on a subset of images and its time is
extrapolated linearly in the number of images (its cost is per image and per threshold).

Timings keep the best of `--repeat` calls, since other processes share the cores.

Usage: python benchmarks/metrics.py [--images 1725] [--size 256] [--baseline-images 173]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score

from mddnet import metrics

ANOMALOUS_IMAGE_FRACTION = 1258 / 1725  # MVTec AD test set


def make_input(
    images: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """labels (N,), scores (N,), masks (N, S, S) bool, maps (N, S, S) float32."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((images, size, size), dtype=bool)
    rows, cols = np.ogrid[:size, :size]
    # Mean region area chosen so that ~10% of all pixels are anomalous with 1-3 regions each.
    mean_radius = size * np.sqrt(0.10 / ANOMALOUS_IMAGE_FRACTION / 2 / np.pi)
    for mask in masks:
        if rng.random() >= ANOMALOUS_IMAGE_FRACTION:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.15, 0.85, size=2) * size
            ry, rx = mean_radius * rng.uniform(0.5, 1.5, size=2)
            mask |= ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
    maps = rng.random(masks.shape, dtype=np.float32)  # (N, S, S)
    maps[masks] += np.float32(0.5)
    labels = masks.any(axis=(1, 2)).astype(np.int64)
    scores = rng.random(images) + 0.5 * labels
    return labels, scores, masks, maps


def threshold_loop_aupro(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, steps: int = 200
) -> float:
    """The common approximate AUPRO: fixed thresholds, ground truth relabelled at each."""
    normal = ~masks
    num_normal = np.count_nonzero(normal)
    fprs, pros = [], []
    for threshold in np.linspace(maps.min(), maps.max(), steps):
        above = maps >= threshold  # (N, S, S)
        overlaps = []
        for image_above, mask in zip(above, masks, strict=True):
            labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
            for region in range(1, count + 1):
                pixels = labelled == region
                overlaps.append(np.count_nonzero(image_above & pixels) / np.count_nonzero(pixels))
        fprs.append(np.count_nonzero(above & normal) / num_normal)
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < fpr_limit
    fprs = (fprs[keep] - fprs[keep].min()) / (fprs[keep].max() - fprs[keep].min())
    return float(auc(fprs, pros[keep]))


def timed(function: Callable[..., Any], *args: Any, repeat: int = 1) -> tuple[Any, float]:
    """Value and best wall time of `repeat` calls (the best is the least disturbed by others)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        value = function(*args)
        best = min(best, time.perf_counter() - started)
    return value, best


def peak_extra_bytes(function: Callable[..., Any], *args: Any) -> int:
    """Peak memory allocated by one call beyond what existed before it (numpy is traced)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        function(*args)
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1725)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--baseline-images", type=int, default=173)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timings keep the best of these")
    args = parser.parse_args()

    labels, scores, masks, maps = make_input(args.images, args.size, args.seed)
    print(
        f"machine: {platform.machine()} {platform.processor() or platform.platform()}, "
        f"{os.cpu_count()} CPUs, numpy {np.__version__}"
    )
    print(
        f"input: {maps.shape[0]} maps {maps.shape[1]}x{maps.shape[2]} = {maps.size / 1e6:.1f} M "
        f"pixels ({maps.nbytes / 2**20:.0f} MiB float32 + {masks.nbytes / 2**20:.0f} MiB masks), "
        f"{np.count_nonzero(masks) / masks.size:.1%} anomalous, "
        f"{sum(ndimage.label(m, np.ones((3, 3)))[1] for m in masks)} regions"
    )

    result, total = timed(metrics.compute_all, labels, scores, masks, maps, repeat=args.repeat)
    print(f"compute_all (all 7 metrics, one shared sort): {total:6.1f} s")
    alone = {}
    for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"):
        value, seconds = timed(getattr(metrics, name), masks, maps, repeat=args.repeat)
        assert value == result[name], name
        alone[name] = seconds
        print(f"{name:13s} alone: {seconds:6.1f} s   value {value:.6f}")
    half, seconds = timed(metrics.pixel_aupro, masks, maps.astype(np.float16), repeat=args.repeat)
    print(f"pixel_aupro on float16 maps: {seconds:6.1f} s   value {half:.6f}")

    extra_all = peak_extra_bytes(metrics.compute_all, labels, scores, masks, maps)
    extra_pro = peak_extra_bytes(metrics.pixel_aupro, masks, maps)
    print(
        f"peak memory beyond the inputs: compute_all {extra_all / 2**30:.2f} GiB, "
        f"pixel_aupro {extra_pro / 2**30:.2f} GiB; process max RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    )

    subset = slice(0, args.baseline_images)
    sub_masks, sub_maps = masks[subset], maps[subset]
    exact, exact_seconds = timed(metrics.pixel_aupro, sub_masks, sub_maps, repeat=args.repeat)
    loop, loop_seconds = timed(threshold_loop_aupro, sub_masks, sub_maps)
    extrapolated = loop_seconds * args.images / args.baseline_images
    print(
        f"200-threshold loop on {args.baseline_images} images: {loop_seconds:.1f} s "
        f"(value {loop:.6f}; exact {exact:.6f} in {exact_seconds:.2f} s, "
        f"{loop_seconds / exact_seconds:.0f}x faster)"
    )
    print(
        f"200-threshold loop extrapolated to {args.images} images: {extrapolated:.0f} s; "
        f"exact AUPRO on all of them: {alone['pixel_aupro']:.1f} s "
        f"({extrapolated / alone['pixel_aupro']:.0f}x)"
    )

    flat_masks, flat_maps = sub_masks.ravel(), sub_maps.ravel()
    sk_auroc, sk_seconds = timed(roc_auc_score, flat_masks, flat_maps)
    sk_ap, seconds = timed(average_precision_score, flat_masks, flat_maps)
    sk_seconds += seconds
    own_auroc, own_seconds = timed(metrics.pixel_auroc, sub_masks, sub_maps, repeat=args.repeat)
    own_ap, seconds = timed(metrics.pixel_ap, sub_masks, sub_maps, repeat=args.repeat)
    own_seconds += seconds
    print(
        f"pixel AUROC + AP on {args.baseline_images} images: scikit-learn {sk_seconds:.1f} s, "
        f"mddnet {own_seconds:.1f} s; differences {abs(sk_auroc - own_auroc):.1e} (AUROC), "
        f"{abs(sk_ap - own_ap):.1e} (AP)"
    )


if __name__ == "__main__":
    main()
