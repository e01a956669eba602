"""The whole pipeline, end to end, on tiny params in a copy of the working tree.

The copy has what a fresh clone has: the tracked and new files, but no `data/`, no `artifacts/`,
no DVC cache and no `results/`. So this test also proves that `data.dvc` (real inputs, absent
here) does not stop the offline default, and that every notebook runs through papermill.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mddnet.metrics import METRIC_NAMES

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.notebooks]


def _working_tree_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    skip = ("results/", "dvc.lock", "pipelines/")
    return [f for f in listed if f and not f.startswith(skip) and (REPO / f).is_file()]


def _tiny_params(raw: dict) -> dict:
    keep = {"rd_baseline", "mddnet", "score_tr"}
    raw["data"]["benchmark"].update(
        classes=["brick", "washer"],
        image_size=64,
        train_per_class=4,
        test_good_per_class=2,
        test_defect_per_class=2,
    )
    raw["data"]["image_size"] = 64
    raw["train"].update(epochs=2, batch_size=4, checkpoint_every=1)
    raw["evaluate"]["batch_size"] = 8
    raw["variants"] = {k: v for k, v in raw["variants"].items() if k in keep}
    raw["report"].update(ablation=["rd_baseline", "mddnet"], scoring=["score_tr"])
    raw["report"]["reproduced"] = ["rd_baseline", "mddnet"]
    raw["figures"].update(compare=["rd_baseline", "mddnet"], formats=["png"], dpi=40)
    raw["figures"]["qualitative_per_class"] = 1
    return raw


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("clone")
    for name in _working_tree_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)
    assert not (copy / "data").exists() and not (copy / ".dvc" / "cache").exists()
    raw = yaml.safe_load((copy / "params.yaml").read_text())
    (copy / "params.yaml").write_text(yaml.safe_dump(_tiny_params(raw), sort_keys=False))
    assert _run(["git", "init", "-q"], copy).returncode == 0
    rendered = _run([sys.executable, "-m", "mddnet.cli", "pipeline"], copy)
    assert rendered.returncode == 0, rendered.stderr
    return copy


def test_status_lists_every_stage_as_pending(tiny_repo: Path) -> None:
    # `dvc status`, not `dvc repro --dry`: DVC 3.x's dry run hashes the missing outputs of
    # upstream stages on a fresh clone and crashes (treeverse/dvc#9818).
    status = _run([sys.executable, "-m", "dvc", "status", "--json"], tiny_repo)
    assert status.returncode == 0, status.stderr
    pending = json.loads(status.stdout)
    for stage in (
        "prepare",
        "train@rd_baseline",
        "train@mddnet",
        "evaluate@score_tr",
        "main_results",
        "ablations",
        "figures",
    ):
        assert pending[stage], f"{stage} is not pending before the first repro"


def test_repro_makes_every_result_and_a_second_repro_does_nothing(tiny_repo: Path) -> None:
    first = _run([sys.executable, "-m", "dvc", "repro"], tiny_repo)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = tiny_repo / "results"
    for variant in ("rd_baseline", "mddnet", "score_tr"):
        metrics = json.loads((results / "metrics" / f"{variant}.json").read_text())
        assert metrics["variant"] == variant and metrics["dataset"] == "generated"
        assert set(metrics["mean"]) == set(METRIC_NAMES)
        assert all(0.0 <= v <= 1.0 for v in metrics["mean"].values())
        assert set(metrics["per_class"]) == {"brick", "washer"}
    for table in ("main", "paper_vs_reproduced", "ablation", "scoring"):
        for ext in ("csv", "md", "tex"):
            assert (results / "tables" / f"{table}.{ext}").stat().st_size > 0
    for figure in (
        "data_samples",
        "qualitative",
        "per_class",
        "ablation",
        "losses",
        "roc_pr",
        "prototypes",
    ):
        assert (results / "figures" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    executed = sorted(p.name for p in (results / "notebooks").glob("*.ipynb"))
    assert len(executed) == 1 + 2 + 3 + 3
    assert not list((tiny_repo / "artifacts" / "checkpoints").glob(".*resume*"))

    started = time.perf_counter()
    second = _run([sys.executable, "-m", "dvc", "repro"], tiny_repo)
    assert second.returncode == 0, second.stderr
    assert "Data and pipelines are up to date" in second.stdout
    assert time.perf_counter() - started < 30

    shown = _run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], tiny_repo)
    listed = json.loads(shown.stdout)
    files = {Path(f).stem for entry in listed.values() for f in entry["data"]}
    assert files == {"rd_baseline", "mddnet", "score_tr"}
