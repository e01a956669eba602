"""Shared fixtures: repository paths and the real-data root (skipped with a reason if absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def params_path() -> Path:
    return PARAMS


@pytest.fixture
def real_data() -> Path:
    """Root of ../shared/data (MVTec AD mini and bottle), from MDDNET_REAL_DATA."""
    value = os.environ.get("MDDNET_REAL_DATA")
    if not value:
        pytest.skip("MDDNET_REAL_DATA is not set (export it to the folder of real MVTec AD data)")
    root = Path(value)
    if not root.is_dir():
        pytest.skip(f"MDDNET_REAL_DATA={root} does not exist")
    return root
