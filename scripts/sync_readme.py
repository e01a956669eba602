"""Copy the pipeline's tables into README.md (between the results markers), unchanged.

The README shows the main, ablation and scoring tables and the qualitative figure of results/;
`tests/pipeline/test_readme.py` fails when the copy differs from what the pipeline wrote, so the
numbers in the README always come from the pipeline. Run after `dvc repro`:

    .venv/bin/python scripts/sync_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
SECTIONS = (
    ("Main results (per class, percent)", "results/tables/main.md"),
    ("Ablation (mean over classes, percent; best in bold)", "results/tables/ablation.md"),
    ("Scoring maps of the MDD-Net checkpoint", "results/tables/scoring.md"),
)
FIGURE = "results/figures/qualitative.png"


def results_block() -> str:
    parts = [START]
    for title, path in SECTIONS:
        parts += [f"**{title}** (`{path}`):", "", (REPO / path).read_text().strip(), ""]
    parts += [
        f"![Qualitative results: image, ground truth, the three anomaly maps]({FIGURE})",
        END,
    ]
    return "\n".join(parts)


def main() -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no {START} ... {END} block to fill")
    readme.write_text(pattern.sub(lambda _: results_block(), text))


if __name__ == "__main__":
    main()
