"""A tiny generated benchmark and a tiny config, shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mddnet.benchmark import make_benchmark
from mddnet.config import Config, deep_merge, load_config

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["brick", "washer", "capsule"]
HOLDOUT = 0.2  # of the tiny checkpoint: ceil(0.2 x 6) = 2 of each class's 6 training normals


def tiny_overrides(root: Path, holdout: float = 0.0, **train: object) -> dict:
    """Params that train in seconds: 3 classes at 64 px, a handful of images, 3 steps (one
    epoch of 18 images in batches of 6); `holdout` keeps that fraction of each class's training
    normals out of training for calibration (0: calibrate on the training normals)."""
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
        "train": {"steps": 3, "batch_size": 6, "checkpoint_every": 2, **train},
        "calibration": {"holdout": holdout},
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
    """`tiny_config(variant="mddnet", holdout=0.0, **train_overrides) -> Config` on the tiny
    benchmark."""

    def make(variant: str = "mddnet", holdout: float = 0.0, **train: object) -> Config:
        overrides = tiny_overrides(tiny_root, holdout, **train)
        return load_config(REPO / "params.yaml", variant, overrides)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_root: Path, tmp_path_factory) -> Path:
    """The full model on the tiny benchmark, trained once per test session: 4 steps on 12
    images (2 of each class's 6 held out for calibration, so thresholds come from unseen
    normals)."""
    from mddnet.calibration import calibrate_checkpoint
    from mddnet.train import fit

    overrides = tiny_overrides(tiny_root, HOLDOUT, steps=4)
    config = load_config(REPO / "params.yaml", "mddnet", overrides)
    trained = fit(config, tmp_path_factory.mktemp("ckpt") / "mddnet.pt", progress=False)
    calibrated = trained.checkpoint.with_name("mddnet.calibrated.pt")
    calibrate_checkpoint(config, trained.checkpoint, calibrated, [tiny_root])
    return calibrated


@pytest.fixture
def tiny_params(tiny_root: Path, tmp_path: Path) -> Path:
    """A whole params file with the tiny overrides merged in (for the command line)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    path = tmp_path / "tiny_params.yaml"
    path.write_text(yaml.safe_dump(deep_merge(raw, tiny_overrides(tiny_root)), sort_keys=False))
    return path
