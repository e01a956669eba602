"""Determinism: the default pipeline run twice with the same seed gives the same bytes on CPU.

Each run is its own process, as two `dvc repro` runs are, with a different PYTHONHASHSEED: a
result that depended on the iteration order of a set or dict of strings, on memory addresses or
on anything else that changes between processes would differ here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mddnet.io import load_checkpoint
from mddnet.predictions import load_predictions

REPO = Path(__file__).resolve().parents[2]

# One process runs the default pipeline's computing stages on tiny params: prepare (generate the
# benchmark and validate it), train, evaluate.
_PIPELINE = """
import sys
from mddnet.cli import main
from mddnet.config import load_config
from mddnet.data.prepare import prepare_dataset

params, out = sys.argv[1], sys.argv[2]
config = load_config(params)
prepare_dataset(config, config.data.root_paths())
sys.exit(
    main(["train", "--params", params, "--variant", "mddnet", "--out", f"{out}/mddnet.pt"])
    or main(["evaluate", "--params", params, "--variant", "mddnet",
             "--checkpoint", f"{out}/mddnet.pt", "--metrics-out", f"{out}/mddnet.json",
             "--predictions-out", f"{out}/mddnet.npz"])
)
"""


def _run_pipeline(folder: Path, params, hash_seed: str) -> Path:
    params_file = params(folder / "params.yaml", folder / "benchmark", generate=True)
    done = subprocess.run(
        [sys.executable, "-c", _PIPELINE, str(params_file), str(folder / "out")],
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}


@pytest.mark.slow
def test_the_same_seed_gives_byte_identical_metrics_json_across_processes(
    params, tmp_path
) -> None:
    first = _run_pipeline(tmp_path / "first", params, hash_seed="1")
    second = _run_pipeline(tmp_path / "second", params, hash_seed="2")

    assert _files(first / "benchmark") == _files(second / "benchmark")  # prepare
    assert len(_files(first / "benchmark")) == 2 * (8 + 2 + 2 + 2)  # images and masks
    losses = [(f / "out" / "mddnet.losses.csv").read_text().splitlines() for f in (first, second)]
    assert len(losses[0]) == 1 + 4  # header + train.steps 4
    # Step by step, so that a failure names the first step whose losses differ.
    for step, (row, other) in enumerate(zip(*losses, strict=True)):
        assert row == other, f"losses differ from step {step}: {row} != {other}"
    one, two = (load_checkpoint(f / "out" / "mddnet.pt") for f in (first, second))
    assert one["state_dict"].keys() == two["state_dict"].keys()
    differ = {
        name: float((tensor.double() - two["state_dict"][name].double()).abs().max())
        for name, tensor in one["state_dict"].items()
        if not torch.equal(tensor, two["state_dict"][name])
    }
    assert not differ, f"{len(differ)} tensors differ (name: max |diff|): {differ}"
    assert one["calibration"] == two["calibration"]  # thresholds and choices too
    metrics = [(f / "out" / "mddnet.json").read_bytes() for f in (first, second)]
    assert metrics[0] == metrics[1]
    maps = [load_predictions(f / "out" / "mddnet.npz").fused for f in (first, second)]
    assert maps[0].tobytes() == maps[1].tobytes()
