"""A tiny generated benchmark and a tiny config, shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mddnet.benchmark import make_benchmark
from mddnet.config import Config, deep_merge, load_config

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["brick", "washer", "capsule"]


def tiny_overrides(root: Path, **train: object) -> dict:
    """Params that train in seconds: 3 classes at 64 px, a handful of images, one epoch."""
    return {
        "data": {
            "root": str(root),
            "image_size": 64,
            "benchmark": {
                "classes": CLASSES,
                "image_size": 64,
                "train_per_class": 6,
                "test_good_per_class": 3,
                "test_defect_per_class": 3,
            },
        },
        "train": {"epochs": 1, "batch_size": 6, "checkpoint_every": 2, **train},
        "evaluate": {"batch_size": 16},
    }


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "benchmark"
    config = load_config(REPO / "params.yaml", overrides=tiny_overrides(root))
    make_benchmark(root, config.data.benchmark, seed=0)
    return root


@pytest.fixture
def tiny_config(tiny_root: Path):
    """`tiny_config(variant="mddnet", **train_overrides) -> Config` on the tiny benchmark."""

    def make(variant: str = "mddnet", **train: object) -> Config:
        return load_config(REPO / "params.yaml", variant, tiny_overrides(tiny_root, **train))

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_root: Path, tmp_path_factory) -> Path:
    """One epoch of the full model on the tiny benchmark, trained once per test session."""
    from mddnet.train import fit

    config = load_config(REPO / "params.yaml", "mddnet", tiny_overrides(tiny_root))
    return fit(config, tmp_path_factory.mktemp("ckpt") / "mddnet.pt", progress=False).checkpoint


@pytest.fixture
def tiny_params(tiny_root: Path, tmp_path: Path) -> Path:
    """A whole params file with the tiny overrides merged in (for the command line)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    path = tmp_path / "tiny_params.yaml"
    path.write_text(yaml.safe_dump(deep_merge(raw, tiny_overrides(tiny_root)), sort_keys=False))
    return path
