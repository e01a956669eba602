"""`mddnet repro --lanes`: per-run stages side by side, recorded as `dvc repro` would record them.

The lanes are checked with commands that log their start and end times; the whole flow runs in
a throwaway DVC repository whose `train` and `evaluate` stages have the shape `mddnet pipeline`
renders (foreach over runs, a `prepare` stage upstream), and DVC itself then says whether
everything is recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mddnet import lanes
from mddnet.errors import MddnetError
from mddnet.lanes import (
    Job,
    _threads_note,
    default_lanes,
    longest_first,
    repro,
    run_lanes,
    snapshot,
)
from mddnet.pipeline import PipelinePaths

PY = sys.executable


def _stamping(tmp_path: Path, key: str, seconds: float, exit_code: int = 0) -> Job:
    """A training that writes its start and end times to <key>.json and exits with `exit_code`."""
    stamp = tmp_path / f"{key}.json"
    script = (
        f"import json, sys, time; s = time.time(); time.sleep({seconds}); "
        f"json.dump([s, time.time()], open({str(stamp)!r}, 'w')); print('trained {key}'); "
        f"sys.exit({exit_code})"
    )
    return Job(f"dvc.yaml:train@{key}", f'"{PY}" -c "{script}"', tmp_path, ())


def test_two_lanes_overlap_and_a_failure_spares_the_others(tmp_path: Path) -> None:
    trainings = [_stamping(tmp_path, "a", 1.0), _stamping(tmp_path, "b", 1.0, exit_code=3)]
    trainings.append(_stamping(tmp_path, "c", 0.1))
    lines: list[str] = []

    failed = run_lanes(trainings, 2, tmp_path / "logs", lines.append)

    assert failed == ["dvc.yaml:train@b"]
    (a0, a1), (b0, b1) = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "ab")
    assert b0 < a1 and a0 < b1  # a and b ran at the same time
    c0, _ = json.loads((tmp_path / "c.json").read_text())
    assert c0 >= min(a1, b1) - 0.05  # c waited for a free lane
    assert (tmp_path / "logs" / "train" / "b.log").read_text() == "trained b\n"
    assert any("FAILED (exit 3) train@b" in line for line in lines)
    assert lines[-1] == "2 of 3 train stages done"


def test_one_lane_runs_in_order(tmp_path: Path) -> None:
    trainings = [_stamping(tmp_path, key, 0.2) for key in "ab"]
    assert run_lanes(trainings, 1, tmp_path / "logs", lambda _: None) == []
    (_, a1), (b0, _) = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "ab")
    assert b0 >= a1


def test_longest_first_orders_by_decoders_and_teacher_passes_and_keeps_ties_in_order(
    tmp_path: Path, params_path: Path
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"extends": str(params_path), "train": {"steps": 10}}))
    keys = [
        "rd_baseline-s0",
        "restoration_only-s0",
        "mddnet-s0",
        "rd_baseline-s1",
        "drd_net-s1",
        "mddnet_as_stated-s0",
    ]
    trainings = [Job(f"dvc.yaml:train@{key}", "true", tmp_path, ()) for key in keys]

    ordered = [t.key for t in longest_first(trainings, params)]

    # cost = steps x (decoders + 2 x anomaly share), with the default share 0.5: 40 for the
    # paper-only variant (an anomaly on every image), 30 for mddnet and drd_net, 20 for
    # restoration_only, 10 for RD (clean normals)
    assert ordered == [
        "mddnet_as_stated-s0",
        "mddnet-s0",
        "drd_net-s1",
        "restoration_only-s0",
        "rd_baseline-s0",
        "rd_baseline-s1",
    ]


@pytest.mark.parametrize(("threads", "lanes", "advice"), [(1, 3, False), (2, 2, True)])
def test_threads_warning_advises_one_thread_only_where_it_is_not_set(
    tmp_path: Path, params_path: Path, monkeypatch, threads: int, lanes: int, advice: bool
) -> None:
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"extends": str(params_path), "cpu": {"threads": threads}})
    )
    monkeypatch.setattr("os.cpu_count", lambda: 2)

    note = _threads_note(tmp_path, PipelinePaths(), lanes)

    assert note is not None and f"{lanes * threads} threads on 2 cores" in note
    assert ("set cpu.threads: 1" in note) is advice
    assert _threads_note(tmp_path, PipelinePaths(), 2 // threads) is None


@pytest.mark.parametrize(
    ("threads", "cores", "lanes", "warned"),
    [(2, 2, 1, False), (1, 2, 2, False), (2, 16, 8, False), (None, 8, 1, False), (4, 2, 1, True)],
)
def test_default_lanes_fill_the_cores_without_oversubscribing_them(
    tmp_path: Path,
    params_path: Path,
    monkeypatch,
    threads: int | None,
    cores: int,
    lanes: int,
    warned: bool,
) -> None:
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"extends": str(params_path), "cpu": {"threads": threads}})
    )
    monkeypatch.setattr("os.cpu_count", lambda: cores)

    assert default_lanes(tmp_path, PipelinePaths()) == lanes
    # one lane of more threads than cores is still oversubscribed, and still warned of
    assert (_threads_note(tmp_path, PipelinePaths(), lanes) is not None) is warned


def test_snapshot_sees_an_edit_and_a_new_file(tmp_path: Path) -> None:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "a.py").write_text("x = 1\n")
    single = tmp_path / "params.yaml"
    single.write_text("a: 1\n")
    before = snapshot([folder, single])
    assert snapshot([folder, single]) == before
    (folder / "b.py").write_text("")
    assert snapshot([folder, single]) != before
    before = snapshot([folder, single])
    single.write_text("a: 12\n")
    assert snapshot([folder, single]) != before


# -- the whole flow in a throwaway DVC repository ---------------------------------------------

DVC_YAML = """\
stages:
  prepare:
    cmd: echo prepared > prepared.txt
    outs: [prepared.txt]
  train:
    foreach:
      rd_baseline-s0: {variant: rd_baseline, seed: 0}
      rd_baseline-s1: {variant: rd_baseline, seed: 1}
      mddnet-s0: {variant: mddnet, seed: 0}
    do:
      cmd: %s
      deps: [prepared.txt, code.txt]
      params: [train.steps]
      outs:
      - out/${key}.txt
  evaluate:
    foreach:
      rd_baseline-s0: {variant: rd_baseline, seed: 0}
      rd_baseline-s1: {variant: rd_baseline, seed: 1}
      mddnet-s0: {variant: mddnet, seed: 0}
    do:
      cmd: mkdir -p ev && sed s/^/evaluated-/ out/${key}.txt > ev/${key}.txt
      deps:
      - out/${key}.txt
      outs:
      - ev/${key}.txt
  tables:
    cmd: cat ev/rd_baseline-s0.txt ev/rd_baseline-s1.txt ev/mddnet-s0.txt > table.txt
    deps: [ev/rd_baseline-s0.txt, ev/rd_baseline-s1.txt, ev/mddnet-s0.txt]
    outs: [table.txt]
"""


def _dvc_repo(tmp_path: Path, params_path: Path, train_cmd: str) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run([PY, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(DVC_YAML % train_cmd)
    params = {"extends": str(params_path), "cpu": {"threads": 1}, "train": {"steps": 3}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "code.txt").write_text("v1\n")
    return root


def _stale(root: Path) -> dict:
    status = subprocess.run(
        [PY, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True, check=True
    )
    return json.loads(status.stdout)


TRAIN = "mkdir -p out && echo ${item.variant} ${item.seed} > out/${key}.txt"


@pytest.mark.slow
def test_repro_records_parallel_trainings_as_dvc_repro_would(tmp_path, params_path) -> None:
    root = _dvc_repo(tmp_path, params_path, TRAIN)
    lines: list[str] = []

    repro(root, PipelinePaths(), lanes=2, echo=lines.append)

    assert _stale(root) == {}  # DVC finds every stage recorded and up to date
    table = "evaluated-rd_baseline 0\nevaluated-rd_baseline 1\nevaluated-mddnet 0\n"
    assert (root / "table.txt").read_text() == table
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    runs = ["rd_baseline-s0", "rd_baseline-s1", "mddnet-s0"]
    assert {f"{family}@{run}" for family in ("train", "evaluate") for run in runs} <= set(lock)
    assert (root / "artifacts" / "logs" / "train" / "mddnet-s0.log").is_file()
    assert (root / "artifacts" / "logs" / "evaluate" / "mddnet-s0.log").is_file()
    # the evaluations ran in the lanes, each after every training was recorded
    events = [
        line.split()[1:3] for line in lines if line.split()[1:2] in (["start"], ["recorded"])
    ]
    last_training = max(i for i, (_, s) in enumerate(events) if s.startswith("train@"))
    first_evaluation = min(i for i, (_, s) in enumerate(events) if s.startswith("evaluate@"))
    assert last_training < first_evaluation
    assert [line for line in lines if "stages done" in line] == [
        "3 of 3 train stages done",
        "3 of 3 evaluate stages done",
    ]

    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("3", "4"))
    assert set(_stale(root)) == {f"train@{run}" for run in runs}
    lines.clear()
    repro(root, PipelinePaths(), lanes=2, echo=lines.append)
    assert _stale(root) == {}
    # the outputs are the same, so DVC finds the evaluations up to date: only the trainings ran
    assert [line for line in lines if "stages done" in line] == ["3 of 3 train stages done"]


@pytest.mark.slow
def test_a_dependency_edited_during_the_run_records_nothing(tmp_path, params_path) -> None:
    root = _dvc_repo(tmp_path, params_path, f"echo v2 >> code.txt && {TRAIN}")
    with pytest.raises(MddnetError, match="changed while they ran, so none that finished after"):
        repro(root, PipelinePaths(), lanes=2, echo=lambda _: None)
    assert not (root / "dvc.lock").exists() or "train@" not in (root / "dvc.lock").read_text()


@pytest.mark.slow
def test_each_training_is_recorded_as_it_finishes(tmp_path, params_path) -> None:
    # One lane, longest first: mddnet-s0, rd_baseline-s0, then rd_baseline-s1, which edits a
    # dependency: the two that finished before the edit are in dvc.lock, the third is not.
    edit = "if [ ${key} = rd_baseline-s1 ]; then echo v2 >> code.txt; fi"
    root = _dvc_repo(tmp_path, params_path, f"{TRAIN} && {edit}")
    lines: list[str] = []
    with pytest.raises(MddnetError, match="changed while they ran"):
        repro(root, PipelinePaths(), lanes=1, echo=lines.append)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert {"train@mddnet-s0", "train@rd_baseline-s0"} <= set(lock)
    assert "train@rd_baseline-s1" not in lock
    assert "not recorded: train@rd_baseline-s1 (a dependency changed during the run)" in lines


@pytest.mark.slow
def test_a_failed_training_is_named_and_the_others_are_recorded(tmp_path, params_path) -> None:
    root = _dvc_repo(tmp_path, params_path, TRAIN + " && test ${item.variant} = rd_baseline")
    with pytest.raises(MddnetError, match=r"1 train stage\(s\) failed: train@mddnet-s0;"):
        repro(root, PipelinePaths(), lanes=2, echo=lambda _: None)
    # nothing downstream ran: the evaluations wait for every training
    runs = ("rd_baseline-s0", "rd_baseline-s1", "mddnet-s0")
    assert set(_stale(root)) == {"train@mddnet-s0", "tables"} | {f"evaluate@{r}" for r in runs}


@pytest.mark.slow
def test_a_failed_dvc_commit_is_named_and_the_others_are_recorded(
    tmp_path, params_path, monkeypatch
) -> None:
    """`dvc commit` fails when another DVC command holds the repository's lock."""
    root = _dvc_repo(tmp_path, params_path, TRAIN)
    commit = lanes._dvc

    def locked_for_one(*args: str, root: Path) -> None:
        if args[-1].endswith("train@mddnet-s0"):
            raise subprocess.CalledProcessError(1, ["dvc", *args])
        commit(*args, root=root)

    monkeypatch.setattr(lanes, "_dvc", locked_for_one)
    lines: list[str] = []
    with pytest.raises(MddnetError, match=r"1 train stage\(s\) ran but `dvc commit` failed: "):
        repro(root, PipelinePaths(), lanes=2, echo=lines.append)
    assert "not recorded: train@mddnet-s0 (dvc commit failed: see DVC's message)" in lines
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert {"train@rd_baseline-s0", "train@rd_baseline-s1"} <= set(lock)
    assert "train@mddnet-s0" not in lock


@pytest.mark.slow
def test_a_run_taken_out_of_the_params_and_a_moved_output_are_forgotten(
    tmp_path, params_path
) -> None:
    root = _dvc_repo(tmp_path, params_path, TRAIN)
    repro(root, PipelinePaths(), lanes=2, echo=lambda _: None)
    dvc_yaml = (root / "dvc.yaml").read_text()
    dvc_yaml = dvc_yaml.replace("      rd_baseline-s1: {variant: rd_baseline, seed: 1}\n", "")
    dvc_yaml = dvc_yaml.replace(" ev/rd_baseline-s1.txt,", "").replace(
        " ev/rd_baseline-s1.txt", ""
    )
    dvc_yaml = dvc_yaml.replace("table.txt", "t/table.txt")
    (root / "dvc.yaml").write_text(dvc_yaml.replace("cmd: cat", "cmd: mkdir -p t && cat"))
    lines: list[str] = []

    repro(root, PipelinePaths(), lanes=2, echo=lines.append)

    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert "train@rd_baseline-s1" not in lock and "train@rd_baseline-s0" in lock
    assert "evaluate@rd_baseline-s1" not in lock
    assert not (root / "out" / "rd_baseline-s1.txt").exists()  # the removed run's outputs
    assert not (root / "ev" / "rd_baseline-s1.txt").exists()
    assert not (root / "table.txt").exists()  # recorded before, no longer declared
    table = "evaluated-rd_baseline 0\nevaluated-mddnet 0\n"
    assert (root / "t" / "table.txt").read_text() == table
    dropped = "train@rd_baseline-s1, evaluate@rd_baseline-s1"
    assert lines[0] == f"dropped 2 stage(s) the params no longer name: {dropped}"
    assert _stale(root) == {}


def test_lanes_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MddnetError, match="--lanes must be at least 1, got 0"):
        repro(tmp_path, PipelinePaths(), lanes=0)
