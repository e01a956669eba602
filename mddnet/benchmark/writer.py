"""Writing the generated benchmark to disk: MVTec layout, byte-stable PNGs, an atomic swap.

All files are written into a hidden temporary folder that is renamed to the destination only when
complete, and `benchmark.json` marks the folder as generated, so that a rerun may replace it and
nothing else is ever overwritten.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mddnet.benchmark.classes import (
    MASK_TOLERANCE,
    class_spec,
    mask_path,
    render_sample,
    sample_path,
)
from mddnet.config import BenchmarkConfig

__all__ = [
    "GENERATOR",
    "GENERATOR_VERSION",
    "BenchmarkSummary",
    "ClassSummary",
    "make_benchmark",
]

log = logging.getLogger(__name__)

# Written into benchmark.json and checked to recognise an earlier benchmark that may be replaced.
# It names the module that first wrote benchmarks; kept so generated files and the benchmarks
# already on disk stay as they are.
GENERATOR = "mddnet.data.synthetic"
# Bump when a change alters any generated pixel, so that stale benchmarks can be told apart.
GENERATOR_VERSION = 2  # 2: transcendental math through benchmark.portable (same bits on every CPU)


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


def _png(array: np.ndarray) -> bytes:
    """PNG bytes with fixed options and no metadata, so equal arrays give equal files."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ---------------------------------------------------------------------------------------------
# Replacing the destination


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


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`, moving an old benchmark aside first."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------
# Writing


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
                _write_file(root / mask_path(name, index), _png(sample.mask))
                defects[sample.defect_type] += 1
    log.debug("%s: %s images, defects %s", name, counts, dict(defects))
    return ClassSummary(
        kind=class_spec(name).kind,
        train_good=config.train_per_class,
        test_good=config.test_good_per_class,
        test_defects=dict(defects),
    )


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
        class_spec(name)
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
