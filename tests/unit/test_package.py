"""Packaging contracts: import has no side effects; the locks, environment.yml, setup.sh, CI,
the citation and the extras agree with pyproject.toml."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

_IMPORT_PROBE = r"""
import os, socket, sys
before = set(os.listdir('.'))
def refuse(*args, **kwargs):
    raise SystemExit('network connection attempted during import')
socket.socket.connect = refuse
socket.create_connection = refuse
import mddnet, mddnet.config, mddnet.io, mddnet.seed, mddnet.cli
after = set(os.listdir('.'))
sys.exit(0 if before == after else 'files created: %s' % sorted(after - before))
"""


@pytest.mark.slow
def test_import_creates_no_files_and_opens_no_connection(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []


LOCKS = {  # lock file -> the torch pair it must pin (scripts/setup.sh picks one by `uname -m`)
    "linux-x86_64": {"torch": "2.14.1", "torchvision": "0.29.1"},
    "linux-aarch64": {"torch": "2.9.1", "torchvision": "0.24.1"},
}
PIPELINE_ONLY = {"dvc", "papermill", "ipykernel", "nbformat", "jupyterlab", "seaborn", "tabulate"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project(repo: Path) -> dict:
    return tomllib.loads((repo / "pyproject.toml").read_text())["project"]


def _lock_path(repo: Path, platform: str) -> Path:
    return repo / "requirements" / f"{platform}-py311.txt"


def _lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a `uv pip compile --generate-hashes` lock."""
    entries: dict[str, tuple[str, list[str]]] = {}
    name = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\", line)
            assert match, f"{path.name}:{number}: not `name==version \\`: {line!r}"
            name = _normalise(match[1])
            assert name not in entries, f"{path.name}:{number}: {name} twice"
            entries[name] = (match[2], [])
            continue
        match = re.fullmatch(r"\s+--hash=sha256:([0-9a-f]{64})( \\)?", line)
        assert match and name, f"{path.name}:{number}: not a hash of a requirement: {line!r}"
        entries[name][1].append(match[1])
    return entries


def _requirements(repo: Path) -> list[Requirement]:
    """Runtime dependencies and the dev and pipeline extras (and the extras those name)."""
    project = _project(repo)
    extras = project["optional-dependencies"]
    found = [Requirement(r) for r in project["dependencies"]]
    pending, seen = ["dev", "pipeline"], set()
    while pending:
        extra = pending.pop()
        seen.add(extra)
        for requirement in map(Requirement, extras[extra]):
            if _normalise(requirement.name) == "mddnet":
                pending.extend(sorted(requirement.extras - seen))
            else:
                found.append(requirement)
    return found


def test_lock_covers_every_dependency_of_pyproject_at_a_version_it_allows(repo: Path) -> None:
    requirements = _requirements(repo)
    assert {"pytest", "pytest-timeout", "ruff", "onnx", "jupyterlab", "dvc"} <= {
        _normalise(r.name) for r in requirements
    }
    for platform in LOCKS:
        lock = _lock(_lock_path(repo, platform))
        for requirement in requirements:
            name = _normalise(requirement.name)
            assert name in lock, f"{platform}: {name} is missing; run bash requirements/compile.sh"
            version = lock[name][0]
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{platform}: {name}=={version} is outside pyproject's {requirement}; "
                "run bash requirements/compile.sh"
            )


def test_every_locked_package_is_pinned_with_a_hash(repo: Path) -> None:
    for platform in LOCKS:
        lock = _lock(_lock_path(repo, platform))
        assert len(lock) > 100
        unhashed = sorted(name for name, (_, hashes) in lock.items() if not hashes)
        assert unhashed == [], f"{platform}: no hash for {unhashed}"


def test_locks_pin_the_tested_torch_pairs(repo: Path) -> None:
    for platform, pair in LOCKS.items():
        lock = _lock(_lock_path(repo, platform))
        assert {name: lock[name][0] for name in pair} == pair
        constraint = (repo / "requirements" / f"torch-{platform}.txt").read_text()
        for name, version in pair.items():
            assert f"{name}=={version}" in constraint.splitlines()
    command = _lock_path(repo, "linux-x86_64").read_text().splitlines()[1].strip()
    assert command.startswith("#    uv pip compile pyproject.toml --extra dev --extra pipeline")


def test_setup_installs_the_lock_by_hash_then_mddnet_without_deps(repo: Path) -> None:
    setup = (repo / "scripts" / "setup.sh").read_text()
    for platform in LOCKS:
        assert f"requirements/{platform}-py311.txt" in setup
    assert '--require-hashes -r "$LOCK"' in setup
    assert "--no-deps -e ." in setup
    assert "import torch, torchvision, timm, mddnet" in setup.splitlines()[-1]


def test_environment_yml_installs_the_lock_and_repeats_no_dependency(repo: Path) -> None:
    env = yaml.safe_load((repo / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if not isinstance(d, dict)]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert conda == ["python=3.11", "pip"]
    assert pip_section == ["-r requirements/linux-x86_64-py311.txt"]
    assert _lock_path(repo, "linux-x86_64").is_file()
    # mddnet itself: the usage line installs it editable without deps (see the file's header)
    assert "pip install --no-deps -e ." in (repo / "environment.yml").read_text()


def test_plain_install_leaves_the_notebook_pipeline_to_an_extra(repo: Path) -> None:
    project = _project(repo)
    runtime = {_normalise(Requirement(r).name) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    pipeline = {_normalise(Requirement(r).name) for r in extras["pipeline"]}
    assert runtime.isdisjoint(PIPELINE_ONLY) and pipeline >= PIPELINE_ONLY
    for extra, requirements in extras.items():
        names = [_normalise(Requirement(r).name) for r in requirements]
        assert len(names) == len(set(names)), f"[{extra}] lists a package twice"


_BLOCKED_IMPORT_PROBE = r"""
import importlib.abc, importlib.machinery, sys
blocked = set(sys.argv[1:])
class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # importing fails; a find_spec probe (torch._dynamo makes some) still finds the module
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in blocked:
            return importlib.machinery.ModuleSpec(name, self)
    def exec_module(self, module):
        raise ImportError(f'{module.__name__} is imported, but only [pipeline] installs it')
sys.meta_path.insert(0, Block())
import importlib, pkgutil, mddnet
for module in pkgutil.walk_packages(mddnet.__path__, 'mddnet.'):
    if module.name != 'mddnet.plots':  # the notebooks' figures: seaborn
        importlib.import_module(module.name)
"""


@pytest.mark.slow
def test_cli_modules_import_without_the_pipeline_extra() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKED_IMPORT_PROBE, *sorted(PIPELINE_ONLY)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_license_and_citation_agree_with_pyproject(repo: Path) -> None:
    project = _project(repo)
    license_text = (repo / "LICENSE").read_text()
    assert project["license"] in ({"text": "MIT"}, "MIT")  # the table, or an SPDX expression
    assert license_text.startswith("MIT License\n\nCopyright (c) 2026 mddnet contributors\n")
    assert set(project["urls"]) == {"Homepage", "Repository", "Issues"}

    cff = yaml.safe_load((repo / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["title"] == "mddnet: a reference implementation of MDD-Net"
    assert cff["authors"] == [{"name": "mddnet contributors"}]
    assert cff["license"] == "MIT" and cff["version"] == project["version"]
    assert cff["date-released"] == "2026-12-02"  # a string, as the CFF schema asks
    assert {"message", "title", "authors", "cff-version"} <= set(cff)
    (paper,) = cff["references"]
    assert paper["type"] == "article" and paper["year"] == 2025
    assert paper["title"].startswith("Memory-Augmented Dual-Decoder Networks")
    assert [a["family-names"] for a in paper["authors"]] == [
        "Xing", "Tang", "Wang", "Xiao", "Ju", "Zhou", "Zhen", "Lv"
    ]  # fmt: skip
    identifiers = {(i["type"], i["value"]) for i in paper["identifiers"]}
    assert ("other", "arXiv:2504.14884") in identifiers
    assert ("url", "https://arxiv.org/abs/2504.14884") in identifiers


def test_pytest_times_out_hung_tests(repo: Path) -> None:
    pytest_config = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["pytest"]
    options = pytest_config["ini_options"]
    assert options["timeout"] == 600 and options["timeout_method"] == "signal"
    assert any(marker.startswith("slow:") for marker in options["markers"])


def test_ci_lints_before_the_tests_and_hooks_match_the_locked_ruff(repo: Path) -> None:
    ci = (repo / ".ci" / "run").read_text()
    order = [
        "bash scripts/setup.sh",
        ".venv/bin/ruff check .",
        ".venv/bin/ruff format --check .",
        ".venv/bin/python -m pytest",
    ]
    assert [ci.index(step) for step in order] == sorted(ci.index(step) for step in order)

    hooks = yaml.safe_load((repo / ".pre-commit-config.yaml").read_text())["repos"]
    by_id = {hook["id"]: (repo_["rev"], hook) for repo_ in hooks for hook in repo_["hooks"]}
    ruff = _lock(_lock_path(repo, "linux-x86_64"))["ruff"][0]
    assert by_id["ruff-check"][0] == by_id["ruff-format"][0] == f"v{ruff}"
    assert by_id["nbstripout"][1]["files"] == "^notebooks/"
    assert all(re.fullmatch(r"v?\d+(\.\d+)+", rev) for rev, _ in by_id.values())


@pytest.mark.slow
def test_cli_shows_the_resolved_variant(params_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mddnet.cli",
            "show-config",
            "--params",
            str(params_path),
            "--variant",
            "rd_baseline",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["variant"] == "rd_baseline" and shown["model"]["identity_decoder"] is False


@pytest.mark.slow
def test_cli_error_is_one_clear_line(params_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mddnet.cli",
            "show-config",
            "--params",
            str(params_path),
            "--variant",
            "nope",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "unknown variant 'nope'" in result.stderr and "Traceback" not in result.stderr
