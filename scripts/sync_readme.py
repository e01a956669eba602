"""Copy the pipelines' tables into README.md (between the results markers), unchanged.

The README shows tables of results/ (the offline default) and of results/<name>/ (the real-data
pipelines); `tests/pipeline/test_readme.py` fails when a copy differs from what the pipeline
wrote, so the numbers in the README always come from the pipelines. Run after `dvc repro`:

    .venv/bin/python scripts/sync_readme.py
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# block name -> (title, table file) in README order; a block is <!-- NAME:start --> ... :end -->
BLOCKS: dict[str, list[tuple[str, str]]] = {
    "real_data_summary": [],
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
    "mvtec_ad_mini_256": [
        ("mvtec_ad_mini at 256 px (percent)", "results/mvtec_ad_mini_256/tables/ablation.md"),
        ("Scoring maps at 256 px", "results/mvtec_ad_mini_256/tables/scoring.md"),
    ],
    "mvtec_ad_bottle": [
        ("Ablation on mvtec_ad_bottle (percent)", "results/mvtec_ad_bottle/tables/ablation.md"),
    ],
}


# The real-data summary: one row per pipeline, MDD-Net against its RD baseline on the headline
# metrics, read from each pipeline's ablation.csv (so the README's summary is the pipeline's too).
SUMMARY: list[tuple[str, str]] = [
    ("mvtec_ad_mini_256", "15 classes"),
    ("mvtec_ad_bottle", "1 class"),
    ("bottle_tire_256", "2 classes"),
    ("mvtec_ad_mini", "15 classes"),
    ("bottle_tire", "2 classes"),
]
HEADLINE = ("image_auroc", "pixel_auroc", "pixel_aupro")
VERDICT = {"↑": "above", "↓": "below", "": "level"}


def _mean_sd(row: dict[str, str]) -> str:
    cells = (f"{100 * float(row[m]):.1f} ± {100 * float(row[f'{m}_sd']):.1f}" for m in HEADLINE)
    return " / ".join(cells)


def summary_block() -> list[str]:
    """The summary table's lines; a pipeline not yet run has no row."""
    lines = [
        "| set (one model for all its classes) | input px | steps "
        "| MDD-Net: I-AUROC / P-AUROC / AUPRO | RD baseline | MDD-Net against RD |",
        "|---|---|---|---|---|---|",
    ]
    for name, classes in SUMMARY:
        path = REPO / f"results/{name}/tables/ablation.csv"
        if path.is_file():
            rows = {row["variant"]: row for row in csv.DictReader(path.open(encoding="utf-8"))}
            caption = path.with_suffix(".md").read_text()
            size = re.search(r"input (\d+)x\d+ px", caption)[1]
            steps = int(re.search(r"(\d+) training steps", caption)[1])
            mddnet, rd = rows["mddnet"], rows["rd_baseline"]
            verdict = " / ".join(VERDICT[mddnet[f"{m}_mark"]] for m in HEADLINE)
            cells = [f"`{name}` ({classes})", size, f"{steps:,}", _mean_sd(mddnet)]
            cells += [_mean_sd(rd), verdict]
            lines.append(f"| {' | '.join(cells)} |")
    return lines


def block(name: str) -> str:
    """The text of one block, from the table files that exist (a pipeline not yet run has none)."""
    parts = [f"<!-- {name}:start -->"]
    if name == "real_data_summary":
        parts += summary_block()
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
