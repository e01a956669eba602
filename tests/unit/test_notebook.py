"""The notebooks' setup: paths resolve against the project root, from anywhere in the clone."""

from __future__ import annotations

from pathlib import Path

import pytest

from mddnet.config import load_config, load_params
from mddnet.notebook import Session, project_root


def test_project_root_is_found_from_any_folder_inside_the_clone(repo: Path, tmp_path) -> None:
    assert project_root(repo / "notebooks") == repo
    assert project_root(repo / "mddnet" / "models") == repo
    with pytest.raises(FileNotFoundError, match="not inside the mddnet repository"):
        project_root(tmp_path)


def test_session_roots_resolve_every_data_root_against_the_project_root(
    repo: Path, params_path: Path, tmp_path: Path
) -> None:
    params = load_params(params_path)
    session = Session(repo, params, params.config("mddnet"))
    assert session.roots() == [repo / "artifacts" / "benchmark"]
    assert session.path("results/x.json") == repo / "results" / "x.json"
    two = load_config(
        params_path, "mddnet", overrides={"data": {"root": ["data/a", str(tmp_path)]}}
    )
    assert Session(repo, params, two).roots() == [repo / "data" / "a", tmp_path]
