"""The prepare stage: generate the offline benchmark if asked, then scan and fully validate.

Validation decodes every image and mask (`validate_dataset`), so that broken real data stops the
pipeline here, with every problem listed, instead of failing or silently skewing a training run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from mddnet.benchmark import make_benchmark
from mddnet.config import Config
from mddnet.data.layout import DatasetError, Sample, scan_dataset, summarize, validate_dataset
from mddnet.io import write_text

__all__ = ["PreparedDataset", "prepare_dataset"]

log = logging.getLogger(__name__)


class PreparedDataset(NamedTuple):
    """The validated samples of the configured classes and their per-class summary."""

    samples: list[Sample]
    summary: pd.DataFrame


def prepare_dataset(
    config: Config, roots: Sequence[Path], summary_out: Path | None = None
) -> PreparedDataset:
    """Generate (when `data.generate`), scan and validate the dataset at `roots`.

    `roots` are `data.root` resolved by the caller. Raises `DatasetError` listing every problem.
    """
    if config.data.generate:
        if len(roots) != 1:
            raise DatasetError(
                f"data.generate writes one benchmark: give data.root one folder, got "
                f"{[str(r) for r in roots]}"
            )
        log.info("generating the offline benchmark at %s (seed %d)", roots[0], config.seed)
        make_benchmark(roots[0], config.data.benchmark, config.seed)
    samples = scan_dataset(list(roots), config.data.classes)
    problems = validate_dataset(samples)
    if problems:
        raise DatasetError(problems)
    summary = summarize(samples)
    if summary_out is not None:
        write_text(summary_out, summary.to_csv(index=False))
    log.info("%d classes, %d images, all decoded", len(summary), len(samples))
    return PreparedDataset(samples, summary)
