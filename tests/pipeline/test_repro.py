"""The whole pipeline, end to end, on tiny params in a copy of the working tree.

The copy has what a fresh clone has: the tracked and new files, but no `data/`, no `artifacts/`,
no DVC cache and no `results/`. So this test also proves that `data.dvc` (real inputs, absent
here) does not stop the offline default, and that every notebook runs through papermill. It then
checks what a reviewer sees: figures in the executed notebooks, no machine paths, `dvc metrics
show` in 120 columns, `dvc plots show` offline, and that a table or figure edit retrains nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mddnet.metrics import METRIC_NAMES

REPO = Path(__file__).resolve().parents[2]
# The first test also builds the module's repository (a whole dvc repro, several minutes on two
# busy cores), so this module's timeout is three times the suite's 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.notebooks, pytest.mark.timeout(1800)]
TRY_A_SETTING = "evaluate.fusion.restoration_identity"  # the README's example
MACHINE_PATH = re.compile(r"[\"'( ](/work/|/tmp/|/home/|/root/|/private/|/Users/)")


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
    """Two chain variants on two seeds (so tables show an sd) and nothing else: every stage is a
    notebook whose start-up costs about 9 s whatever it computes, so each run left out counts.
    A scoring variant that borrows a checkpoint is checked in `test_dvc.py` instead."""
    keep = {"rd_baseline", "mddnet"}
    raw["seeds"] = [0, 1]
    raw["data"]["benchmark"].update(
        classes=["brick", "washer"],
        image_size=64,
        train_per_class=4,
        test_good_per_class=2,
        test_defect_per_class=2,
    )
    raw["data"]["image_size"] = 64
    raw["train"].update(steps=2, batch_size=4, checkpoint_every=1)
    raw["calibration"]["holdout"] = 0.25
    raw["evaluate"]["batch_size"] = 8
    raw["variants"] = {k: v for k, v in raw["variants"].items() if k in keep}
    raw["report"].update(
        chain=["rd_baseline", "mddnet"],
        ablation=["rd_baseline", "mddnet"],
        scoring=["mddnet"],
        reproduced=["rd_baseline", "mddnet"],
    )
    raw["figures"].update(compare=["rd_baseline", "mddnet"], formats=["png"], dpi=40)
    raw["figures"]["qualitative_per_class"] = 1
    return raw


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = _run([sys.executable, "-m", "dvc", *args], cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _commit(cwd: Path, message: str) -> None:
    for args in (["add", "-A"], ["commit", "-qm", message]):
        done = _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd)
        assert done.returncode == 0, done.stderr


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


@pytest.fixture(scope="module")
def reproduced(tiny_repo: Path) -> Path:
    """The tiny repository after one `dvc repro`, committed (as a user would before trying)."""
    status = _dvc(tiny_repo, "status", "--json")
    # `dvc status`, not `dvc repro --dry`: DVC 3.x's dry run hashes the missing outputs of
    # upstream stages on a fresh clone and crashes (treeverse/dvc#9818).
    pending = json.loads(status.stdout)
    for stage in ("prepare", "train@mddnet-s1", "evaluate@mddnet-s1", "reference", "figures"):
        assert pending[stage], f"{stage} is not pending before the first repro"
    _dvc(tiny_repo, "repro")
    _commit(tiny_repo, "first repro")
    return tiny_repo


def test_repro_makes_every_result_and_a_second_repro_does_nothing(reproduced: Path) -> None:
    results = reproduced / "results"
    for run in ("rd_baseline-s0", "rd_baseline-s1", "mddnet-s0", "mddnet-s1"):
        metrics = json.loads((results / "metrics" / f"{run}.json").read_text())
        assert f"{metrics['variant']}-s{metrics['seed']}" == run
        assert set(metrics["mean"]) == set(METRIC_NAMES)
        assert all(0.0 <= v <= 1.0 for v in metrics["mean"].values())
        assert set(metrics["per_class"]) == {"brick", "washer"}
    assert json.loads((results / "metrics" / "reference.json").read_text())["variant"]
    for table in ("main", "paper_vs_reproduced", "ablation", "scoring"):
        for ext in ("csv", "md", "tex"):
            assert (results / "tables" / f"{table}.{ext}").stat().st_size > 0
    ablation = (results / "tables" / "ablation.md").read_text()
    assert "\u00b1" in ablation and "[reference]" in ablation  # seeds' sd and the reference row
    for figure in ("data_samples", "qualitative", "per_class", "ablation", "losses", "roc_pr"):
        assert (results / "figures" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((reproduced / "artifacts" / "checkpoints").glob(".*resume*"))

    started = time.perf_counter()
    second = _dvc(reproduced, "repro")
    assert "Data and pipelines are up to date" in second.stdout
    assert time.perf_counter() - started < 30


def test_executed_notebooks_show_their_figures_and_no_machine_path(reproduced: Path) -> None:
    results = reproduced / "results"
    for name in ("01_prepare_data", "08_figures"):
        cells = json.loads((results / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        outputs = [o for c in cells for o in c.get("outputs", [])]
        assert any("image/png" in o.get("data", {}) for o in outputs), name
    for path in results.rglob("*"):
        if path.suffix in (".json", ".ipynb", ".csv", ".md", ".tex"):
            found = MACHINE_PATH.search(path.read_text(encoding="utf-8"))
            assert not found, f"{path.relative_to(reproduced)}: {found.group(0)!r}"
    train = (results / "notebooks" / "02_train" / "mddnet-s0.ipynb").read_text()
    assert "it/s" not in train and "step/s" not in train  # log lines, no progress bars


def test_metrics_show_is_one_narrow_row_per_variant(reproduced: Path) -> None:
    shown = _dvc(reproduced, "metrics", "show").stdout.strip().splitlines()
    assert max(map(len, shown)) <= 120, "\n".join(shown)
    rows = [line.split()[0] for line in shown[1:]]
    assert sorted(rows) == sorted(f"results/summary/{v}.json" for v in ("rd_baseline", "mddnet"))


def test_plots_show_renders_the_figures_from_local_files(reproduced: Path, tmp_path: Path) -> None:
    _dvc(reproduced, "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    images = re.findall(r"<img[^>]*src=\"([^\"]+)\"", page)
    assert any("qualitative" in src for src in images), images
    assert all(not src.startswith("http") for src in images)


def test_editing_a_scoring_table_or_figure_module_retrains_nothing(reproduced: Path) -> None:
    edits = [
        ("report.py", False),
        ("plots.py", False),
        ("scoring.py", False),  # scoring and calibration are stages after training
        ("calibration.py", False),
        ("checkpoint.py", False),
        ("losses.py", True),
    ]
    for module, stale in edits:
        path = reproduced / "mddnet" / module
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        try:
            changed = json.loads(_dvc(reproduced, "status", "--json").stdout)
        finally:
            path.write_text(original)
        trains = [name for name in changed if name.startswith("train@")]
        assert bool(trains) == stale, f"{module}: stale train stages {trains}"
        if module == "calibration.py":
            assert any(name.startswith("calibrate@") for name in changed), changed


def test_readme_try_a_setting_reruns_only_what_depends_on_it(reproduced: Path) -> None:
    """The README's `dvc exp run -S` example: a fusion setting re-evaluates, never retrains.

    The README sets the restoration-identity weight to 1; where the calibration chose 1 itself
    (no number would move), the test sets 0 instead. An image score would not do: with two
    defects per class both scores can rank the images alike, and only image metrics depend on it.
    """
    scoring = json.loads((reproduced / "results/provenance/mddnet-s0.json").read_text())["scoring"]
    weight = "1" if scoring["weights"][1] != 1 else "0"
    run = _dvc(reproduced, "exp", "run", "-S", f"{TRY_A_SETTING}={weight}")
    ran = set(re.findall(r"Running stage '([^']+)'", run.stdout))
    assert ran and not any(name.startswith(("train@", "prepare")) for name in ran), ran
    assert "reference" not in ran, ran  # the reference row has no fusion
    assert any(name.startswith("evaluate@mddnet") for name in ran), ran
    diff = _dvc(reproduced, "metrics", "diff").stdout
    assert "results/summary/mddnet.json" in diff, diff
