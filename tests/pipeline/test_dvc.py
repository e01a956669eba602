"""The DVC contract: what each stage passes to its notebook, what it declares, what it imports."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import papermill
import pytest
import yaml

from mddnet.config import load_params
from mddnet.pipeline import HEADER, STAGE_MODULES, PipelinePaths, render_pipeline, runs

REPO = Path(__file__).resolve().parents[2]
# The rendered pipelines (pipelines/datasets/dvc.yaml, which fetches data, is written by hand).
PIPELINE_FILES = [
    path
    for path in [REPO / "dvc.yaml", *sorted((REPO / "pipelines").glob("*/dvc.yaml"))]
    if path.read_text().startswith("# Rendered by `mddnet pipeline`")
]


def _paths_of(dvc_file: Path) -> PipelinePaths:
    return PipelinePaths.for_dataset(None if dvc_file.parent == REPO else dvc_file.parent.name)


def _expand(value: Any, key: str, item: dict[str, Any]) -> Any:
    if isinstance(value, str):
        value = value.replace("${key}", key)
        return re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item[m.group(1)]), value)
    if isinstance(value, list):
        return [_expand(v, key, item) for v in value]
    if isinstance(value, dict):
        return {_expand(k, key, item): _expand(v, key, item) for k, v in value.items()}
    return value


@cache  # read once: 360 parametrised cases read six files
def stages(dvc_file: Path) -> dict[str, dict[str, Any]]:
    """Every concrete stage of a dvc.yaml, foreach expanded as DVC does (`name@key`)."""
    expanded = {}
    for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
        if "foreach" not in stage:
            expanded[name] = stage
            continue
        for key, item in stage["foreach"].items():
            expanded[f"{name}@{key}"] = _expand(stage["do"], key, item)
    return expanded


def _paths(entries: list[Any]) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def _command(stage: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
    match = re.search(r"python -m papermill (\S+) (\S+) --log-output (.*)$", stage["cmd"])
    assert match, stage["cmd"]
    words = shlex.split(match.group(3))
    assert words[0::3] == ["-p"] * (len(words) // 3) and len(words) % 3 == 0, words
    return match.group(1), match.group(2), dict(zip(words[1::3], words[2::3], strict=True))


CASES = [(f, s) for f in PIPELINE_FILES for s in stages(f)]


@cache
def _declared(notebook: str) -> set[str]:
    return set(papermill.inspect_notebook(str(REPO / notebook)))


@cache
def _roots(dvc_file: Path) -> set[str]:
    config = load_params(REPO / _paths_of(dvc_file).params).base
    return {root.as_posix() for root in config.data.root_paths()}


def test_the_committed_pipelines_are_what_the_params_render() -> None:
    for dvc_file in PIPELINE_FILES:
        paths = _paths_of(dvc_file)
        assert yaml.safe_load(dvc_file.read_text()) == render_pipeline(REPO, paths), (
            f"{dvc_file} is stale: run `mddnet pipeline` (see its header)"
        )
        assert dvc_file.read_text().startswith(HEADER.format(params=paths.params))


def test_the_chain_trains_once_per_seed_and_every_other_variant_once() -> None:
    params = load_params(REPO / "params.yaml")
    seeds, chain = params.base.seeds, params.base.report.chain
    trained = runs(params, trained=True)
    assert {k for k in trained if k.startswith("mddnet-")} == {f"mddnet-s{s}" for s in seeds}
    for name in {run["variant"] for run in trained.values()}:
        expected = len(seeds) if name in chain else 1
        assert sum(run["variant"] == name for run in trained.values()) == expected, name
    evaluated = runs(params, trained=False)
    assert evaluated["score_tr-s1"]["checkpoint"] == "mddnet-s1"  # borrows its seed's model
    assert set(evaluated) >= set(trained)


def test_every_variant_that_trains_is_trained_by_some_pipeline() -> None:
    """The offline default trains nearly all; a row such as `synthesis_large`, the default's
    own setting, is trained only where a pipeline changed that setting."""
    trained = {
        run["variant"]
        for dvc_file in PIPELINE_FILES
        for run in runs(load_params(REPO / _paths_of(dvc_file).params), trained=True).values()
    }
    assert set(load_params(REPO / "params.yaml").trained()) <= trained


def test_the_default_pipeline_has_the_expected_stages() -> None:
    params = load_params(REPO / "params.yaml")
    expected = (
        ["prepare"]
        + [f"train@{run}" for run in runs(params, trained=True)]
        + [f"calibrate@{run}" for run in runs(params, trained=True)]
        + [f"evaluate@{run}" for run in runs(params, trained=False)]
        + ["reference", "main_results", "ablations", "figures"]
    )
    assert list(stages(REPO / "dvc.yaml")) == expected


def test_the_reference_stage_depends_on_what_it_reads_and_not_on_the_fusion() -> None:
    """Trying a fusion weight (the README's `dvc exp run -S`) must not recompute the reference
    row; changing its seed, teacher or map blur must."""
    entries = stages(REPO / "dvc.yaml")["reference"]["params"]  # [{params file: [keys]}]
    keys = {key for entry in entries for listed in entry.values() for key in listed}
    assert {"seeds", "model.weights", "evaluate.blur_sigma", "reference"} <= keys
    assert not {"model", "evaluate", "evaluate.fusion", "evaluate.image_score"} & keys


@pytest.mark.parametrize(
    ("dvc_file", "name"), CASES, ids=[f"{f.parent.name}:{s}" for f, s in CASES]
)
def test_every_parameter_is_declared_and_passed_and_every_out_is_passed(
    dvc_file: Path, name: str
) -> None:
    stage = stages(dvc_file)[name]
    notebook, executed, passed = _command(stage)
    assert set(passed) == _declared(notebook), f"{name}: -p names != the notebook's parameters"
    assert executed.startswith(_paths_of(dvc_file).results + "/notebooks/")
    roots = _roots(dvc_file)
    values = set(passed.values())
    for out in (
        _paths(stage.get("outs", []))
        + _paths(stage.get("metrics", []))
        + _paths(stage.get("plots", []))
    ):
        passed_as = (
            out in values
            or out == executed
            or out in roots
            or any(out.startswith(v + "/") or out.startswith(v + ".") for v in values)
        )
        assert passed_as, f"{name}: out {out} is not passed to the notebook"


_LOADED_PROBE = """
import ast, json, sys
cells = json.load(open(sys.argv[1]))["cells"]
tree = ast.parse("\\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"))
imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
exec(compile(ast.Module(body=imports, type_ignores=[]), "imports", "exec"))
print(json.dumps(sorted(
    m.__file__ for name, m in sys.modules.items()
    if name.split(".")[0] == "mddnet" and getattr(m, "__file__", None)
)))
"""


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep + "/") for dep in deps)


@pytest.mark.slow
@pytest.mark.parametrize(
    "notebook", sorted({_command(s)[0] for f in PIPELINE_FILES for s in stages(f).values()})
)
def test_stage_deps_cover_every_module_the_notebook_loads(notebook: str) -> None:
    """Measured, not parsed: import what the notebook imports, list the modules Python loaded."""
    result = subprocess.run(
        [sys.executable, "-c", _LOADED_PROBE, str(REPO / notebook)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    loaded = {Path(f).resolve().relative_to(REPO).as_posix() for f in json.loads(result.stdout)}
    assert loaded, "the probe loaded nothing"
    for dvc_file in PIPELINE_FILES:
        for name, stage in stages(dvc_file).items():
            if _command(stage)[0] == notebook:
                missing = {p for p in loaded if not _covered(p, _paths(stage["deps"]))}
                assert not missing, f"{dvc_file.name}:{name} lacks deps {sorted(missing)}"


@pytest.mark.parametrize("stage", ["train", "evaluate", "reference"])
def test_no_table_or_figure_module_is_a_dep_of_a_computing_stage(stage: str) -> None:
    # A caption or a figure colour must not retrain a model (or re-evaluate one).
    assert not {"mddnet/report.py", "mddnet/plots.py"} & set(STAGE_MODULES[stage])


def test_results_are_committed_not_cached_and_intermediates_are_cached() -> None:
    for dvc_file in PIPELINE_FILES:
        results = _paths_of(dvc_file).results
        for name, stage in stages(dvc_file).items():
            for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                cached = not (isinstance(entry, dict) and entry[path].get("cache") is False)
                assert cached == (not path.startswith(results + "/")), f"{name}: {path}"


def _tracked(folder: str) -> set[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--", folder], cwd=REPO, capture_output=True, text=True, check=True
    )
    return set(listed.stdout.split())


@pytest.mark.parametrize("dvc_file", PIPELINE_FILES, ids=lambda f: str(f.relative_to(REPO)))
def test_every_committed_result_was_recorded_by_a_stage_of_its_pipeline(dvc_file: Path) -> None:
    """A removed run's leftovers would be read by the table stages (they read whole folders):
    `mddnet repro` drops them (`mddnet.lanes.prune_removed`). Compared with dvc.lock,
    not dvc.yaml, so a pipeline not yet re-run after a change of layout still passes."""
    lock = yaml.safe_load(dvc_file.with_name("dvc.lock").read_text())["stages"]
    assert set(lock) <= set(stages(dvc_file)), set(lock) - set(stages(dvc_file))
    recorded = {out["path"] for stage in lock.values() for out in stage.get("outs", [])}
    results = _paths_of(dvc_file).results
    # the root pipeline's folder also holds the other pipelines' and `mddnet benchmark`'s
    others = [f"results/{f.parent.name}/" for f in PIPELINE_FILES if f.parent != REPO]
    foreign = [o for o in [*others, "results/benchmarks/"] if o != f"{results}/"]
    mine = {f for f in _tracked(results) if not any(f.startswith(o) for o in foreign)}
    assert mine and sorted(mine - recorded) == []


def test_figures_are_image_plots_so_dvc_shows_them_offline() -> None:
    plots = [p for s in stages(REPO / "dvc.yaml").values() for p in _paths(s.get("plots", []))]
    assert "results/figures/qualitative.png" in plots
    assert "results/figures/data_samples.png" in plots


def test_dvc_analytics_are_off() -> None:
    assert re.search(r"analytics\s*=\s*false", (REPO / ".dvc" / "config").read_text())


def test_data_dvc_tracks_the_real_inputs_folder_and_no_stage_needs_it() -> None:
    out = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert out["path"] == "data"
    for name, stage in stages(REPO / "dvc.yaml").items():
        assert not any(p == "data" or p.startswith("data/") for p in _paths(stage["deps"])), name
