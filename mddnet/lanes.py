"""`mddnet repro --lanes N`: `dvc repro` with a pipeline's per-run stages run side by side. [ours]

DVC holds one lock per repository, so two `dvc repro` cannot share a checkout, and a pipeline's
per-run stages (one per variant and seed: trainings of minutes to half an hour each on a CPU,
then a calibration and an evaluation of seconds to a minute each) run one after the other even
where cores are idle. Here the stale stages of each family (`train@...`, then `calibrate@...`,
then `evaluate@...`: each reads only what the one before wrote) run their own commands, as DVC
renders them from dvc.yaml, in N lanes; `dvc commit` then records them as `dvc repro` would
have, each as soon as it finishes (a session cut short keeps what it finished), and `dvc repro`
runs the rest (reference, tables, figures). The numbers are those of a plain `dvc repro`: every
stage is the same command with the same seed and thread count.

`dvc commit` records the dependencies as they are when it runs, so they must not change while
the lanes run: their size and modification time are compared with those at the start of the
family before each stage is recorded, and from the first change on nothing more is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mddnet.errors import MddnetError
from mddnet.pipeline import PipelinePaths

__all__ = [
    "LANE_FAMILIES",
    "Job",
    "default_lanes",
    "longest_first",
    "prune_removed",
    "repro",
    "run_lanes",
    "snapshot",
    "stale_jobs",
]

# mddnet.pipeline's foreach stages, in the order they feed each other: each family runs in the
# lanes once the one before it is recorded
LANE_FAMILIES = ("train", "calibrate", "evaluate")
UPSTREAM_STAGE = "prepare"  # what every training reads (the dataset summary)
SEED_SEPARATOR = "-s"  # mddnet.pipeline names each run <variant>-s<seed>


@dataclass(frozen=True)
class Job:
    """One stale per-run stage: its DVC address, rendered command and dependency paths."""

    address: str  # e.g. pipelines/bottle_tire/dvc.yaml:train@mddnet-s0
    cmd: str
    cwd: Path  # the stage's wdir, where `cmd` runs
    deps: tuple[Path, ...]  # files and folders it reads, params files included

    @property
    def family(self) -> str:
        """The foreach stage it is one item of: train, calibrate or evaluate."""
        return self.address.rsplit(":", 1)[-1].split("@", 1)[0]

    @property
    def key(self) -> str:
        """The run, <variant>-s<seed>."""
        return self.address.split("@", 1)[1]

    @property
    def variant(self) -> str:
        return self.key.rsplit(SEED_SEPARATOR, 1)[0]

    @property
    def stage(self) -> str:
        """The stage's name as `dvc repro` prints it, e.g. train@mddnet-s0."""
        return f"{self.family}@{self.key}"


@contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Run in `folder`: DVC's Python API resolves targets and names stages (`addressing`, the
    names `dvc commit` takes) relative to the cwd, and `_dvc` runs there too."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def stale_jobs(root: Path, dvc_yaml: str, family: str) -> list[Job]:
    """The `family@...` stages of `dvc_yaml` that `dvc status` finds changed, in dvc.yaml's
    order."""
    from dvc.repo import Repo  # DVC renders foreach/${...} itself: no second parser here

    with _inside(root), Repo(str(root)) as repo:
        changed = set(repo.status(targets=[dvc_yaml]))
        stages = [
            stage
            for stage in repo.stage.collect(dvc_yaml)
            if f"{family}@" in stage.addressing and stage.addressing in changed
        ]
        return [
            Job(
                address=stage.addressing,
                cmd=stage.cmd,
                cwd=Path(stage.wdir),
                deps=tuple(sorted({Path(dep.fs_path) for dep in stage.deps})),  # params too
            )
            for stage in stages
        ]


def prune_removed(root: Path, dvc_yaml: str) -> list[str]:
    """Forget what `dvc_yaml` no longer has: the dvc.lock entries of removed stages (a variant
    or seed taken out of the params), and every output dvc.lock records that no current stage
    declares (theirs, or an old path after a change of layout). DVC keeps both, and a table
    stage reading a whole folder (`metrics/`) would count a removed run's numbers. Returns the
    stage names dropped."""
    from dvc.repo import Repo
    from dvc.utils.serialize import modify_yaml

    lock_file = root / Path(dvc_yaml).with_name("dvc.lock")
    if not lock_file.exists():
        return []
    with _inside(root), Repo(str(root)) as repo:
        current = repo.stage.collect(dvc_yaml)
    names = {stage.name for stage in current}
    declared = {Path(out.fs_path) for stage in current for out in stage.outs}
    wdirs = {Path(stage.wdir) for stage in current}
    if len(wdirs) != 1:
        raise MddnetError(f"{dvc_yaml}: expected one wdir for all stages, found {sorted(wdirs)}")
    wdir = wdirs.pop()
    with modify_yaml(lock_file) as lock:
        stages = lock.get("stages", {})
        recorded = {
            wdir / out["path"] for stage in stages.values() for out in stage.get("outs", [])
        }
        removed = [name for name in stages if name not in names]
        for name in removed:
            del stages[name]
    for path in sorted(recorded - declared):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return removed


def longest_first(trainings: Sequence[Job], params: Path) -> list[Job]:
    """The trainings ordered by expected length, longest first (ties keep their order).

    The lanes take runs in this order, so the long runs start first and short ones fill the gaps
    at the end; in dvc.yaml's order (RD first) a lane idled for the last long run. The estimate
    per step is decoders + 2 x the share of images that get an anomaly (each costs a teacher pass
    on x_a): 1 for RD, 2 for restoration_only, 3 for MDD-Net and 4 with an anomaly on every image,
    against 7, 15, 19 and 31 minutes measured at 256 px on one thread. It orders the queue only;
    every run is the same command.
    """
    from mddnet.config import load_params

    loaded = load_params(params)

    def cost(training: Job) -> float:
        config = loaded.config(training.variant)
        synthesis = config.data.synthesis
        anomalous = 0.0 if synthesis.kind == "none" else synthesis.probability
        decoders = 2 if config.model.identity_decoder else 1
        return config.train.steps * (decoders + 2 * anomalous)

    return sorted(trainings, key=cost, reverse=True)


def snapshot(paths: Iterable[Path]) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file under `paths`; a missing path is recorded as absent."""
    seen: dict[str, tuple[int, int]] = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat() if file.exists() else None
            seen[str(file)] = (stat.st_size, stat.st_mtime_ns) if stat else (-1, -1)
    return seen


def run_lanes(
    jobs: Sequence[Job],
    lanes: int,
    logs: Path,
    echo: Callable[[str], None] = print,
    on_success: Callable[[Job], None] = lambda _: None,
) -> list[str]:
    """Run the jobs' commands, `lanes` at a time, each logged to `logs/<family>/<key>.log`, and
    call `on_success` on each that succeeds, as it finishes.

    Returns the addresses of those that failed; the others keep running when one fails.
    """

    def run(job: Job) -> bool:
        log = logs / job.family / f"{job.key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        echo(f"{time.strftime('%H:%M:%S')} start {job.stage} (log: {log})")
        start = time.monotonic()
        with log.open("w") as out:
            done = subprocess.run(
                job.cmd,
                shell=True,
                cwd=job.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_environment(),
            )
        verdict = "done" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
        echo(
            f"{time.strftime('%H:%M:%S')} {verdict} {job.stage} "
            f"in {time.monotonic() - start:.0f} s"
        )
        if done.returncode == 0:
            on_success(job)
        return done.returncode == 0

    with ThreadPoolExecutor(max_workers=lanes) as pool:
        succeeded = list(pool.map(run, jobs))
    echo(f"{sum(succeeded)} of {len(jobs)} {_families(jobs)} stages done")
    return [t.address for t, ok in zip(jobs, succeeded, strict=True) if not ok]


def _families(jobs: Sequence[Job]) -> str:
    return "/".join(dict.fromkeys(job.family for job in jobs))


def _environment() -> dict[str, str]:
    """This interpreter's bin folder first on PATH: the stage commands call `python`, and `dvc`
    must be the one installed beside mddnet, also when the environment is not activated."""
    here = str(Path(sys.executable).parent)
    return os.environ | {"PATH": os.pathsep.join([here, os.environ.get("PATH", "")])}


def _dvc(*args: str, root: Path) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, env=_environment())


def _threads(root: Path, paths: PipelinePaths) -> tuple[int, int]:
    """(torch threads of one training, cores of this machine)."""
    from mddnet.config import load_config

    cores = os.cpu_count() or 1
    return load_config(root / paths.params).cpu.threads or cores, cores


def default_lanes(root: Path, paths: PipelinePaths) -> int:
    """As many lanes as the cores hold trainings of `cpu.threads` each (at least one): more
    would make the pinned threads wait for each other, many times slower, not faster."""
    threads, cores = _threads(root, paths)
    return max(1, cores // threads)


def _threads_note(root: Path, paths: PipelinePaths, lanes: int) -> str | None:
    """A warning when lanes x torch threads exceed the cores (the runs would slow each other)."""
    threads, cores = _threads(root, paths)
    if lanes * threads <= cores:
        return None
    return (
        f"{lanes} lanes x cpu.threads {threads} = {lanes * threads} threads on {cores} cores: "
        "the runs will slow each other; use fewer lanes"
        + (f" or set cpu.threads: 1 in {paths.params}" if threads > 1 else "")
        + " (the numbers depend on cpu.threads, so keep it as the results were made with)"
    )


class _Recorder:
    """`dvc commit` of each stage as it finishes, one at a time, while the dependencies are as
    they were when its family started (`before`); after the first change, none."""

    def __init__(
        self,
        root: Path,
        before: dict[str, tuple[int, int]],
        deps: set[Path],
        echo: Callable[[str], None],
    ) -> None:
        self.root, self.before, self.deps, self.echo = root, before, deps, echo
        self.changed = False
        self.uncommitted: list[str] = []  # ran, but `dvc commit` failed (e.g. DVC's lock held)
        self._lock = threading.Lock()

    def __call__(self, job: Job) -> None:
        with self._lock:
            self.changed = self.changed or snapshot(self.deps) != self.before
            if self.changed:
                self.echo(f"not recorded: {job.stage} (a dependency changed during the run)")
                return
            try:
                _dvc("commit", "--force", job.address, root=self.root)
            except subprocess.CalledProcessError:
                self.uncommitted.append(job.address)
                self.echo(f"not recorded: {job.stage} (dvc commit failed: see DVC's message)")
                return
            self.echo(f"{time.strftime('%H:%M:%S')} recorded {job.stage} in dvc.lock")


def _run_family(
    root: Path, paths: PipelinePaths, family: str, lanes: int, echo: Callable[[str], None]
) -> None:
    """Run and record the stale stages of one family in the lanes.

    Raise if one failed or a dependency changed while they ran; the others stay recorded.
    """
    jobs = stale_jobs(root, paths.dvc_yaml, family)
    if family == LANE_FAMILIES[0]:
        jobs = longest_first(jobs, root / paths.params)
    if not jobs:
        return
    deps = {path for job in jobs for path in job.deps}
    record = _Recorder(root, snapshot(deps), deps, echo)
    failed = run_lanes(jobs, lanes, root / paths.artifacts / "logs", echo, record)
    if record.changed:
        raise MddnetError(
            f"a dependency of the {family} stages (code, notebook, params, data or an upstream "
            "output) changed while they ran, so none that finished after the change is "
            "recorded: run `mddnet repro` again on an unchanged tree"
        )
    if record.uncommitted:
        raise MddnetError(
            f"{len(record.uncommitted)} {family} stage(s) ran but `dvc commit` failed: "
            f"{', '.join(record.uncommitted)}. Another DVC command (a `dvc status` too) may have "
            "held DVC's lock: run `mddnet repro` again while no other DVC command runs"
        )
    if failed:
        raise MddnetError(
            f"{len(failed)} {family} stage(s) failed: {', '.join(failed)}; the others are "
            f"recorded. See {paths.artifacts}/logs/{family}/<run>.log and run `mddnet repro` "
            "again"
        )


def repro(
    root: Path, paths: PipelinePaths, lanes: int | None, echo: Callable[[str], None] = print
) -> None:
    """`dvc repro` of one pipeline, with its stale per-run stages run in `lanes` parallel lanes
    (None: `default_lanes`), family by family."""
    if lanes is None:
        lanes = default_lanes(root, paths)
    if lanes < 1:
        raise MddnetError(f"--lanes must be at least 1, got {lanes}")
    removed = prune_removed(root, paths.dvc_yaml)
    if removed:
        echo(f"dropped {len(removed)} stage(s) the params no longer name: {', '.join(removed)}")
    _dvc("repro", f"{paths.dvc_yaml}:{UPSTREAM_STAGE}", root=root)
    note = _threads_note(root, paths, lanes)
    if note:
        echo(f"warning: {note}")
    for family in LANE_FAMILIES:
        _run_family(root, paths, family, lanes, echo)
    _dvc("repro", paths.dvc_yaml, root=root)
