"""The same numbers under another instruction set (issue 14), as on a fresh clone elsewhere.

Each run happens in its own process, so every library picks its kernels afresh. A "smaller CPU"
is emulated by capping numpy's SIMD dispatch (NPY_DISABLE_CPU_FEATURES, read at import), OpenBLAS's
core type and torch's ATen capability. With `cpu.isa: avx2` (the default) the generated benchmark,
the trained weights and the metrics must not change by a single byte; with `cpu.isa: native` the
same caps do change the weights, which shows the test can fail.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mddnet.io import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

AVX512 = "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR X86_V4"
SMALLER_CPU = {
    "NPY_DISABLE_CPU_FEATURES": f"{AVX512} X86_V3 AVX2 FMA3 F16C AVX",  # numpy's SSE baseline
    "OPENBLAS_CORETYPE": "Haswell",
    "ATEN_CPU_CAPABILITY": "default",
}
TINY = {
    "data": {
        "image_size": 64,
        "benchmark": {
            "classes": ["gear", "brick"],  # gear: the class whose pixels once differed
            "image_size": 64,
            "train_per_class": 6,
            "test_good_per_class": 2,
            "test_defect_per_class": 2,
        },
    },
    "train": {"steps": 3, "batch_size": 4, "checkpoint_every": 100},
    "calibration": {"holdout": 0.2},
    "evaluate": {"batch_size": 8},
}


def _params(folder: Path, isa: str) -> Path:
    raw = {"extends": str(REPO / "params.yaml"), **TINY, "cpu": {"isa": isa, "threads": 2}}
    raw["data"] = {**TINY["data"], "root": str(folder / "benchmark")}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _mddnet(folder: Path, env: dict[str, str], *args: str) -> None:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    for key in SMALLER_CPU:  # only what this run asks for
        if key not in env:
            environment.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-m", "mddnet.cli", *args],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _run(folder: Path, env: dict[str, str], isa: str, evaluate: bool = True) -> dict[str, str]:
    """Generate, train and evaluate; sha256 of every file they wrote, by relative path."""
    folder.mkdir()
    params = str(_params(folder, isa))
    _mddnet(folder, env, "make-benchmark", "benchmark", "--params", params)
    _mddnet(folder, env, "train", "--params", params, "--out", "model.pt")
    if evaluate:
        _mddnet(
            folder,
            env,
            "evaluate",
            "--params",
            params,
            "--checkpoint",
            "model.pt",
            "--metrics-out",
            "metrics.json",
        )
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".png", ".json", ".csv")
    }


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def test_pinned_kernels_give_the_same_bytes_under_another_instruction_set(tmp_path: Path) -> None:
    native = _run(tmp_path / "native", {}, "avx2")
    smaller = _run(tmp_path / "smaller", SMALLER_CPU, "avx2")
    assert native.keys() == smaller.keys()
    differ = sorted(name for name in native if native[name] != smaller[name])
    assert not differ, f"files that depend on the instruction set: {differ[:5]}"
    one, other = _weights(tmp_path / "native/model.pt"), _weights(tmp_path / "smaller/model.pt")
    assert all(torch.equal(one[k], other[k]) for k in one)


def test_without_the_pin_the_instruction_set_changes_the_weights(tmp_path: Path) -> None:
    _run(tmp_path / "native", {}, "native", evaluate=False)  # the weights suffice
    _run(tmp_path / "smaller", SMALLER_CPU, "native", evaluate=False)
    one, other = _weights(tmp_path / "native/model.pt"), _weights(tmp_path / "smaller/model.pt")
    assert not all(torch.equal(one[k], other[k]) for k in one)
