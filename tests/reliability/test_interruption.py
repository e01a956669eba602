"""Interrupted runs lose nothing: a training process killed mid-epoch resumes to the same weights
and metrics, and a results file whose writer is killed keeps its previous content.

SIGKILL is the hard case: the process gets no chance to clean up, so only what was on disk
before the kill counts. Training keeps a resume checkpoint (written atomically after every
`train.checkpoint_every` steps) and every results file is written to a hidden temporary sibling
and renamed over the target, so a kill leaves the old target intact. What a kill can leave
behind is that hidden temporary file (`.<name>.<random>.tmp`): nothing reads it, and the next
write of the target does not remove it.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mddnet.cli import main
from mddnet.io import load_checkpoint, write_bytes
from mddnet.pipeline import PipelinePaths, render_pipeline
from mddnet.train import resume_path

REPO = Path(__file__).resolve().parents[2]
STEPS, STEPS_PER_EPOCH = 8, 4  # 16 training images in batches of 4: two epochs
KILL_AT_STEP = 3  # inside the first epoch; the resumed run crosses the epoch and the lr step
TIMEOUT_S = 300  # generous: CI machines are slow and shared
# The training runs use one thread each: resuming does not depend on the thread count (all runs
# use the same), and one thread keeps a busy 2-core machine from being oversubscribed.
TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _mddnet(*args: str | Path) -> list[str]:
    """`mddnet <args>` run by this interpreter on this checkout's package."""
    return [sys.executable, "-m", "mddnet.cli", *map(str, args)]


# `mddnet train` in a child that SIGKILLs itself right after its resume checkpoint of step
# KILL_AT_STEP is on disk: a deterministic mid-epoch kill. (Polling for the file and killing from
# here raced with the child: under load it reached the epoch's end before the kill landed.)
_TRAIN_AND_DIE = """
import os, signal, sys
import mddnet.train as train
from mddnet.cli import main

kill_at, write = int(sys.argv[1]), train.save_checkpoint

def write_then_die(path, payload):
    write(path, payload)
    if not payload["complete"] and payload["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

train.save_checkpoint = write_then_die
sys.exit(main(sys.argv[2:]))
"""


def _train(
    params_file: Path, checkpoint: Path, log: Path, kill_at_step: int = 0
) -> subprocess.CompletedProcess:
    """`mddnet train --variant mddnet` on one thread, its output going to `log`; with
    `kill_at_step` > 0 the run is SIGKILLed once that step's resume checkpoint is written."""
    args = ["train", "--params", params_file, "--variant", "mddnet", "--out", checkpoint]
    command = [sys.executable, "-c", _TRAIN_AND_DIE, str(kill_at_step), *map(str, args)]
    with log.open("w") as handle:
        return subprocess.run(
            command,
            cwd=REPO,
            env=TRAIN_ENV,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=TIMEOUT_S,
            check=False,
        )


def _evaluate(params_file: Path, checkpoint: Path, metrics: Path) -> bytes:
    args = ["evaluate", "--params", params_file, "--checkpoint", checkpoint]
    assert main([str(a) for a in [*args, "--metrics-out", metrics]]) == 0
    return metrics.read_bytes()


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_to_the_same_weights_and_metrics(
    benchmark_root, params, tmp_path
) -> None:
    # lr_step_at 0.5: the learning-rate step (at step ceil(0.5 x 8) = 4) falls after the kill
    overrides = {"train": {"steps": STEPS, "lr_step_at": 0.5}}
    params_file = params(tmp_path / "params.yaml", benchmark_root, overrides)
    reference, checkpoint = tmp_path / "reference" / "mddnet.pt", tmp_path / "run" / "mddnet.pt"
    logs = {name: tmp_path / f"{name}.log" for name in ("reference", "killed", "rerun")}
    uninterrupted = _train(params_file, reference, logs["reference"])
    assert uninterrupted.returncode == 0, logs["reference"].read_text()[-3000:]
    killed = _train(params_file, checkpoint, logs["killed"], kill_at_step=KILL_AT_STEP)
    assert killed.returncode == -signal.SIGKILL, logs["killed"].read_text()[-3000:]
    assert not checkpoint.exists()
    step = load_checkpoint(resume_path(checkpoint))["step"]
    assert step == KILL_AT_STEP and step % STEPS_PER_EPOCH != 0  # inside an epoch

    assert _train(params_file, checkpoint, logs["rerun"]).returncode == 0
    rerun = logs["rerun"].read_text()
    assert f"resuming from step {step} of {STEPS}" in rerun
    assert not resume_path(checkpoint).exists()

    resumed, expected = load_checkpoint(checkpoint), load_checkpoint(reference)
    assert resumed["step"] == expected["step"] == STEPS
    assert resumed["calibration"] == expected["calibration"]
    assert resumed["state_dict"].keys() == expected["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name
    assert (
        checkpoint.with_suffix(".losses.csv").read_bytes()
        == reference.with_suffix(".losses.csv").read_bytes()
    )
    assert _evaluate(params_file, checkpoint, tmp_path / "resumed.json") == _evaluate(
        params_file, reference, tmp_path / "uninterrupted.json"
    )


# A child that writes the target through mddnet.io and is stopped inside the write: after the
# new bytes are in the temporary file and before the rename (os.fsync is the last step there).
_STALLED_WRITER = """
import os, sys, time
import torch
from mddnet.io import save_checkpoint, write_json

def stall(fd):
    print("stalled", flush=True)
    time.sleep(600)

os.fsync = stall
target, kind = sys.argv[1], sys.argv[2]
if kind == "json":
    write_json(target, {"values": list(range(100_000))})
else:
    save_checkpoint(target, {"state_dict": {"w": torch.ones(250_000)}, "config": {},
                             "class_names": []})
"""

OLD = b'{"earlier": "result"}\n'


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "name"), [("json", "metrics.json"), ("checkpoint", "model.pt")])
def test_a_writer_killed_mid_write_leaves_the_previous_file_intact(
    kind, name, files_under, tmp_path
) -> None:
    target = tmp_path / "results" / name
    write_bytes(target, OLD)
    process = subprocess.Popen(
        [sys.executable, "-c", _STALLED_WRITER, str(target), kind],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], TIMEOUT_S)
        assert ready and process.stdout.readline() == "stalled\n", process.stderr.read()
        temporary = [f for f in files_under(target.parent) if f != name]
        assert len(temporary) == 1 and re.fullmatch(
            rf"\.{re.escape(name)}\.\w+\.tmp", temporary[0]
        )
        assert (target.parent / temporary[0]).stat().st_size > len(OLD)  # the new data, unrenamed
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL
    assert target.read_bytes() == OLD
    # What SIGKILL leaves: the target as it was, and at most the hidden temporary file.
    left = [f for f in files_under(target.parent) if f != name]
    assert all(re.fullmatch(rf"\.{re.escape(name)}\.\w+\.tmp", f) for f in left), left


def test_dvc_keeps_the_resume_file_when_it_reruns_a_training_stage() -> None:
    """DVC deletes a stage's outputs before it reruns the stage; the resume file must not be one
    of them, or `dvc repro` after a kill would start the training over."""
    stages = render_pipeline(REPO, PipelinePaths())["stages"]
    train = stages["train"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in train["do"]["outs"]]
    assert train["foreach"]
    for run in train["foreach"]:
        declared = [Path(o.replace("${key}", run)) for o in outs]
        checkpoint = Path(PipelinePaths().checkpoint(run))
        assert checkpoint in declared
        resume = resume_path(checkpoint)
        assert all(resume != o and o not in resume.parents for o in declared), (run, declared)
