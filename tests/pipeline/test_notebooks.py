"""Notebook hygiene: thin notebooks that papermill and JupyterLab both run the same way."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from mddnet.pipeline import NOTEBOOKS

REPO = Path(__file__).resolve().parents[2]
BOOKS = sorted(NOTEBOOKS.values())


def _cells(notebook: str) -> list[dict]:
    return json.loads((REPO / notebook).read_text(encoding="utf-8"))["cells"]


def _code(cell: dict) -> str:
    return "".join(cell["source"])


def parameters(notebook: str) -> dict[str, object]:
    """Names and literal values of the notebook's `parameters` cell."""
    cell = next(c for c in _cells(notebook) if "parameters" in c["metadata"].get("tags", []))
    return {
        node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(_code(cell)).body
    }


def test_every_stage_notebook_exists() -> None:
    assert (
        sorted(p.relative_to(REPO).as_posix() for p in (REPO / "notebooks").glob("*.ipynb"))
        == BOOKS
    )


@pytest.mark.parametrize("notebook", BOOKS)
def test_stored_without_outputs(notebook: str) -> None:
    for cell in _cells(notebook):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, notebook


@pytest.mark.parametrize("notebook", BOOKS)
def test_one_parameters_cell_of_literals_with_outputs_under_scratch(notebook: str) -> None:
    tagged = [c for c in _cells(notebook) if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1
    for node in ast.parse(_code(tagged[0])).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.unparse(node)
        assert isinstance(node.targets[0], ast.Name)
        ast.literal_eval(node.value)  # raises unless a literal
    for name, value in parameters(notebook).items():
        if name.endswith(("_out", "_csv", "_figure", "_dir")) or name == "checkpoint":
            # interactive runs never overwrite pipeline outputs (inputs may point at results/)
            is_input = name in {"metrics_dir", "losses_dir", "predictions_dir", "checkpoints_dir"}
            assert is_input or str(value).startswith("scratch/"), (notebook, name, value)
    assert _cells(notebook)[0]["cell_type"] == "markdown"  # a header says what the stage does


@pytest.mark.parametrize("notebook", BOOKS)
def test_no_definitions_loops_or_chdir(notebook: str) -> None:
    banned = (
        ast.FunctionDef,
        ast.AsyncFunctionDef,
        ast.ClassDef,
        ast.Lambda,
        ast.For,
        ast.AsyncFor,
        ast.While,
        ast.ListComp,
        ast.SetComp,
        ast.DictComp,
        ast.GeneratorExp,
    )
    for cell in _cells(notebook):
        if cell["cell_type"] != "code":
            continue
        source = _code(cell)
        assert "chdir" not in source, notebook
        for node in ast.walk(ast.parse(source)):
            assert not isinstance(node, banned), f"{notebook}: {ast.unparse(node)[:60]}"
