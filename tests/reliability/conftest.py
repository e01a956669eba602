"""Fixtures of the reliability tests: tiny params files and the tiny generated benchmark.

Params files are the repository's `params.yaml` with the sizes shrunk, so each test goes through
the validation and code paths of a user's run; the benchmark is the default pipeline's data at
32 px.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from mddnet.benchmark import make_benchmark
from mddnet.config import deep_merge, load_config

REPO = Path(__file__).resolve().parents[2]

# The tiny run: one model on every class, 4 steps (one epoch of 16 images in batches of 4), a
# resume checkpoint after each step, calibration on the training normals (no hold-out).
TINY = {
    "data": {
        "image_size": 32,  # the smallest input that leaves the stride-16 stage a 2 x 2 map
        "benchmark": {
            "classes": ["brick", "washer"],
            "image_size": 32,
            "train_per_class": 8,
            "test_good_per_class": 2,
            "test_defect_per_class": 2,
        },
    },
    "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 1, "device": "cpu"},
    "calibration": {"holdout": 0.0},
    "evaluate": {"batch_size": 8},
}


def _write_params(
    path: Path, root: Path, overrides: Mapping[str, Any] | None = None, generate: bool = False
) -> Path:
    """A whole params file: the repository's, the tiny sizes, `data.root`, then `overrides`."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw = deep_merge(raw, TINY)
    raw = deep_merge(raw, {"data": {"root": str(root), "generate": generate}})
    raw = deep_merge(raw, overrides or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _files_under(folder: Path) -> list[str]:
    """Every file below `folder`, hidden ones included (temporary and resume files are hidden)."""
    if not folder.exists():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def params() -> Callable[..., Path]:
    """`params(path, root, overrides=None, generate=False) -> path` writes a tiny params file."""
    return _write_params


@pytest.fixture
def files_under() -> Callable[[Path], list[str]]:
    """`files_under(folder)`: every file below it, hidden ones included, sorted."""
    return _files_under


@pytest.fixture(scope="session")
def benchmark_root(tmp_path_factory) -> Path:
    """The default pipeline's generated benchmark, tiny: 2 classes at 32 px, 8 + 2 + 2 images."""
    root = tmp_path_factory.mktemp("benchmark") / "generated"
    config = load_config(REPO / "params.yaml", overrides=TINY)
    make_benchmark(root, config.data.benchmark, seed=0)
    return root
