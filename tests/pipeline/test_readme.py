"""The README's tables are the pipeline's, and its commands are the ones CI runs."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_shows_the_tables_the_pipeline_wrote() -> None:
    readme = (REPO / "README.md").read_text()
    for table in ("main", "ablation", "scoring"):
        text = (REPO / "results" / "tables" / f"{table}.md").read_text().strip()
        assert text in readme, "README is stale: run scripts/sync_readme.py after dvc repro"
    assert "(results/figures/qualitative.png)" in readme
    assert (REPO / "results" / "figures" / "qualitative.png").is_file()


def test_ci_runs_the_readme_setup_and_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/reproduce.sh" in readme and "bash scripts/setup.sh" in ci
    assert ".venv/bin/python -m pytest" in readme and ".venv/bin/python -m pytest" in ci
