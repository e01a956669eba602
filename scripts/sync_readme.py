"""Copy the pipelines' tables into README.md (between the results markers), unchanged.

The README shows tables of results/ (the offline default) and of results/<name>/ (the real-data
pipelines); `tests/pipeline/test_readme.py` fails when a copy differs from what the pipeline
wrote, so the numbers in the README always come from the pipelines. Run after `dvc repro`:

    .venv/bin/python scripts/sync_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# block name -> (title, table file) in README order; a block is <!-- NAME:start --> ... :end -->
BLOCKS: dict[str, list[tuple[str, str]]] = {
    "results": [
        ("Ablation (mean over classes and seeds, percent)", "results/tables/ablation.md"),
        ("Scoring maps of the MDD-Net checkpoints", "results/tables/scoring.md"),
    ],
    "bottle_tire": [
        ("Ablation on bottle + tire (percent)", "results/bottle_tire/tables/ablation.md"),
        ("Scoring maps", "results/bottle_tire/tables/scoring.md"),
    ],
    "bottle_tire_256": [
        ("Bottle + tire at 256 px (percent)", "results/bottle_tire_256/tables/ablation.md"),
        ("Scoring maps at 256 px", "results/bottle_tire_256/tables/scoring.md"),
    ],
    "mvtec_ad_mini": [
        ("Ablation on mvtec_ad_mini (percent)", "results/mvtec_ad_mini/tables/ablation.md"),
    ],
    "mvtec_ad_bottle": [
        ("Ablation on mvtec_ad_bottle (percent)", "results/mvtec_ad_bottle/tables/ablation.md"),
    ],
}


def block(name: str) -> str:
    """The text of one block, from the table files that exist (a pipeline not yet run has none)."""
    parts = [f"<!-- {name}:start -->"]
    for title, path in BLOCKS[name]:
        if (REPO / path).is_file():
            parts += [f"**{title}** (`{path}`):", "", (REPO / path).read_text().strip(), ""]
    return "\n".join([*parts, f"<!-- {name}:end -->"])


def synced(text: str) -> str:
    for name in BLOCKS:
        pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"README.md: no <!-- {name}:start --> ... :end --> block to fill")
        text = pattern.sub(lambda _, n=name: block(n), text)
    return text


if __name__ == "__main__":
    readme = REPO / "README.md"
    readme.write_text(synced(readme.read_text()))
