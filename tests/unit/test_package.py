"""Packaging contracts: import has no side effects, environment.yml matches pyproject."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

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


def test_import_creates_no_files_and_opens_no_connection(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_runtime_packages_of_pyproject(repo: Path) -> None:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    env = yaml.safe_load((repo / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip_section if not r.startswith("-e")}
    assert runtime == listed
    assert "-e .[dev]" in pip_section


def test_torch_pins_agree_between_setup_script_and_environment(repo: Path) -> None:
    env = (repo / "environment.yml").read_text()
    setup = (repo / "scripts" / "setup.sh").read_text()
    for pin in ("torch==2.14.1", "torchvision==0.29.1"):
        assert pin in env and pin in setup


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
