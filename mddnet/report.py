"""Result tables of MDD-Net: main results, ablations, and the published numbers beside ours.

Each evaluated run (`<variant>-s<seed>`) has a metrics file of fractions at full precision. The
tables summarise a variant over its seeds (mean and sample sd), and mark a gap to the baseline row
only where it exceeds the larger of the two sds (`spread_mark`): single runs move by a point or
two with the seed, so smaller gaps are not claims. This module is the only place where fractions
become percent with a fixed number of decimals, and `write_table` the only function that formats:
each table is written as CSV (full precision), Markdown and LaTeX (booktabs) from one DataFrame.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pandas as pd

from mddnet.io import read_json, write_json, write_text
from mddnet.metrics import METRIC_NAMES

if TYPE_CHECKING:
    from mddnet.config import Config, Params

__all__ = [
    "HEADERS",
    "METRICS",
    "PUBLISHED_METRICS",
    "REFERENCE_RUN",
    "THIS_REPOSITORY",
    "Tables",
    "AblationTables",
    "MainTables",
    "ablation_results",
    "ablation_table",
    "caption",
    "load_reference",
    "load_runs",
    "main_results",
    "main_table",
    "paper_vs_reproduced",
    "per_class_frame",
    "spread_mark",
    "summarise",
    "summary_metrics",
    "write_table",
]

log = logging.getLogger(__name__)

# Metric names of the metrics JSON (fractions) -> column headers of the formatted tables.
HEADERS: dict[str, str] = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1_max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1_max": "P-F1max",
    "pixel_aupro": "AUPRO",
    "mad": "mAD",
}
METRICS: tuple[str, ...] = METRIC_NAMES
# The published tables report the seven metrics but not their mean (mAD).
PUBLISHED_METRICS: tuple[str, ...] = METRICS[:-1]
REFERENCE_COLUMNS: tuple[str, ...] = ("dataset", "method", *PUBLISHED_METRICS, "source")
THIS_REPOSITORY = "this repository"
REFERENCE_RUN = "reference"  # the metrics file of the training-free reference row
UP, DOWN = "\u2191", "\u2193"  # marks of a gap beyond the seed spread
NOT_AVAILABLE = "not available"
NOT_COMPARABLE = "not comparable: different data"
MISSING_CELL = "n/a"


class _Markup(NamedTuple):
    """How one output format escapes text, emphasises a cell and writes a spread mark."""

    escape: Callable[[str], str]
    bold: Callable[[str], str]
    mark: Callable[[str], str]
    plus_minus: str


_LATEX_SPECIALS = str.maketrans(
    {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
    }
)
_MARKDOWN = _Markup(
    escape=lambda s: s.replace("|", r"\|"),
    bold=lambda s: f"**{s}**",
    mark=lambda s: s,
    plus_minus="\u00b1",
)
_LATEX = _Markup(
    escape=lambda s: s.translate(_LATEX_SPECIALS).replace("\u00b1", r"$\pm$"),
    bold=lambda s: rf"\textbf{{{s}}}",
    mark=lambda s: r"$\uparrow$" if s == UP else r"$\downarrow$",
    plus_minus=r"$\pm$",
)


def _metric_row(values: Mapping[str, Any], where: str, names: Sequence[str] = METRICS) -> dict:
    """The named metrics of one row; a missing one is an error naming where it was expected."""
    missing = [name for name in names if name not in values]
    if missing:
        raise ValueError(
            f"{where} lacks metric {missing[0]!r} (expected: {', '.join(names)}); "
            f"rerun the evaluate stage that writes it"
        )
    return {name: float(values[name]) for name in names}


def per_class_frame(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Per-class rows of one metrics file, then its `mean` row (taken from the file as is)."""
    rows = {
        name: _metric_row(values, f"per_class[{name!r}]")
        for name, values in metrics["per_class"].items()
    }
    rows["mean"] = _metric_row(metrics["mean"], "mean")
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(METRICS))
    frame.index.name = "class"
    return frame


def _runs_of(runs: Mapping[str, Mapping[str, Any]], variant: str) -> list[Mapping[str, Any]]:
    found = [m for m in runs.values() if m.get("variant") == variant]
    if not found:
        raise ValueError(
            f"no metrics for variant {variant!r} (have: {', '.join(sorted(runs))}); run its "
            f"evaluate stage first (dvc repro)"
        )
    return sorted(found, key=lambda m: m.get("seed", 0))


def main_table(runs: Mapping[str, Mapping[str, Any]], variant: str) -> pd.DataFrame:
    """Per-class means over the variant's seeds, then the mean row (the mean of the seeds' means),
    each metric with its sample sd over seeds (`<metric>_sd`, NaN for one seed)."""
    frames = [per_class_frame(m) for m in _runs_of(runs, variant)]
    stacked = pd.concat(frames, keys=range(len(frames)))
    mean = stacked.groupby(level=1, sort=False).mean()
    sd = stacked.groupby(level=1, sort=False).std(ddof=1).add_suffix("_sd")
    frame = pd.concat([mean, sd], axis=1).loc[frames[0].index]
    frame.insert(0, "seeds", len(frames))
    return frame


def summarise(runs: Mapping[str, Mapping[str, Any]], names: Iterable[str]) -> pd.DataFrame:
    """One row per variant: seed count, mean of each metric over seeds and its sample sd."""
    rows = {}
    for name in names:
        values = pd.DataFrame([_metric_row(m["mean"], name) for m in _runs_of(runs, name)])
        rows[name] = {
            "seeds": len(values),
            **values.mean().to_dict(),
            **values.std(ddof=1).add_suffix("_sd").to_dict(),
        }
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "variant"
    return frame


def spread_mark(row: Mapping[str, Any], base: Mapping[str, Any], metric: str) -> str:
    """UP or DOWN when `row` differs from `base` in `metric` by more than the larger of their
    sds over seeds (both with two or more seeds), else ""."""
    if min(row["seeds"], base["seeds"]) < 2:
        return ""
    gap = row[metric] - base[metric]
    spread = max(row[f"{metric}_sd"], base[f"{metric}_sd"])
    if abs(gap) <= spread:
        return ""
    return UP if gap > 0 else DOWN


def ablation_table(
    summary: pd.DataFrame,
    labels: Mapping[str, str],
    baseline: str | None = None,
    reference: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Rows of `summary` in the order of `labels`, with marks against the `baseline` row, and
    the training-free `reference` metrics file as a last row when given."""
    missing = [name for name in labels if name not in summary.index]
    if missing:
        raise ValueError(f"no summary for variant {missing[0]!r}; run its evaluate stage first")
    frame = summary.loc[list(labels)].copy()
    frame.insert(0, "label", list(labels.values()))
    for metric in METRICS:
        frame[f"{metric}_mark"] = [
            ""
            if baseline is None or name == baseline
            else spread_mark(frame.loc[name], summary.loc[baseline], metric)
            for name in frame.index
        ]
    if reference is not None:
        values = _metric_row(reference["mean"], "reference: mean")
        frame.loc[REFERENCE_RUN] = {
            "label": reference.get("label", REFERENCE_RUN),
            "seeds": 1,
            **values,
        }
    return frame


# Short keys, so that `dvc metrics show` of a pipeline fits 120 columns with one row per variant.
SUMMARY_KEYS = {**HEADERS, "image_f1_max": "I-F1", "pixel_f1_max": "P-F1"}


def summary_metrics(row: Mapping[str, Any], decimals: int) -> dict[str, Any]:
    """A variant's summary for `dvc metrics show`: percent means over seeds, `sd` (of mAD over
    seeds; null for one seed) and `n` (seeds)."""
    shown = {SUMMARY_KEYS[m]: round(100 * float(row[m]), decimals) for m in METRICS}
    sd = row.get("mad_sd")
    shown["sd"] = None if sd is None or pd.isna(sd) else round(100 * float(sd), decimals)
    return {**shown, "n": int(row["seeds"])}


def caption(config: Config, what: str) -> str:
    """A caption that says what the table shows and which setting produced the numbers."""
    model = config.model
    size = config.data.image_size
    return (
        f"{what}. Dataset: {config.data.dataset}; teacher: {model.backbone} (weights: "
        f"{model.weights}); input {size}x{size} px; {config.train.steps} training steps; "
        f"metrics in percent, mean \u00b1 sd over seeds where a row has several"
    )


def _dataset_key(name: str) -> str:
    """'MVTec AD', 'mvtec_ad' and 'mvtec-ad' name the same dataset."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def load_reference(path: str | Path) -> pd.DataFrame:
    """Read the published reference rows (percent), checking the columns the tables need."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: reference table not found; set report.reference in params to "
            f"references/published_results.csv (or a CSV with the same columns)"
        )
    frame = pd.read_csv(path)
    missing = [column for column in REFERENCE_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column {missing[0]!r}; a reference CSV needs the columns "
            f"{', '.join(REFERENCE_COLUMNS)}"
        )
    for column in PUBLISHED_METRICS:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            raise ValueError(
                f"{path}: column {column!r} holds non-numbers; write percent values, or leave "
                f"the cell empty where a number is not available"
            )
    return frame


def paper_vs_reproduced(
    reference: pd.DataFrame,
    reproduced: pd.DataFrame,
    labels: Mapping[str, str],
    dataset: str,
    ours: str,
    comparable: bool,
) -> pd.DataFrame:
    """Published rows of `dataset`, then this repository's rows: the `reproduced` summary rows
    (means over seeds) named by `labels`, measured on dataset `ours`.

    Published percent values become fractions like ours, so `write_table` formats both alike.
    With `comparable=False` (e.g. the offline benchmark) our rows carry a note that they were
    measured on different data; claiming comparability for other data is refused.
    """
    published = reference[reference["dataset"].map(_dataset_key) == _dataset_key(dataset)]
    if published.empty:
        raise ValueError(
            f"reference has no rows for dataset {dataset!r} (has: "
            f"{', '.join(reference['dataset'].unique())}); pass one of those, with "
            f"comparable=False when this repository's numbers come from other data"
        )
    if comparable and _dataset_key(ours) != _dataset_key(dataset):
        raise ValueError(f"rows measured on {ours!r}, not {dataset!r}: pass comparable=False")
    rows = {}
    for record in published.to_dict(orient="records"):
        # The published numbers have one decimal in percent: round away the float noise of /100.
        values = {name: round(record[name] / 100, 6) for name in PUBLISHED_METRICS}
        missing = any(pd.isna(v) for v in values.values())
        rows[record["method"]] = {
            "dataset": record["dataset"],
            **values,
            "source": record["source"],
            "note": NOT_AVAILABLE if missing else "",
        }
    for name, label in labels.items():
        if label in rows:
            raise ValueError(
                f"row name {label!r} is already a published method; label this repository's "
                f"variant differently, e.g. '{label} (this repository)'"
            )
        rows[label] = {
            "dataset": ours,
            **_metric_row(reproduced.loc[name], f"{name!r}", PUBLISHED_METRICS),
            "source": THIS_REPOSITORY,
            "note": "" if comparable else NOT_COMPARABLE,
        }
    frame = pd.DataFrame.from_dict(
        rows, orient="index", columns=["dataset", *PUBLISHED_METRICS, "source", "note"]
    )
    frame.index.name = "method"
    return frame


def load_runs(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Every metrics file of a folder, keyed by file stem (`<variant>-s<seed>`, `reference`)."""
    folder = Path(folder)
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no metrics files; run the evaluate stages first")
    loaded: dict[str, dict[str, Any]] = {}
    for path in paths:
        data = read_json(path)
        for key in ("mean", "per_class"):
            if not isinstance(data.get(key), Mapping):
                raise ValueError(
                    f"{path}: missing {key!r} (a metrics file has 'mean' and 'per_class'); "
                    f"rerun its evaluate stage"
                )
        _metric_row(data["mean"], f"{path}: mean")
        loaded[path.stem] = data
    return loaded


def _percent(value: float, decimals: int) -> str:
    return MISSING_CELL if pd.isna(value) else f"{round(100 * value, decimals):.{decimals}f}"


def _metric_cells(
    frame: pd.DataFrame, metric: str, decimals: int, markup: _Markup, bold_best: bool
) -> list[str]:
    """`mean` or `mean ± sd`, then the spread mark; bold where the rounded mean is the best."""
    means = frame[metric]
    best = (100 * means).round(decimals).max() if bold_best else None
    sds = frame.get(f"{metric}_sd", pd.Series(float("nan"), index=frame.index))
    marks = frame.get(f"{metric}_mark", pd.Series("", index=frame.index))
    cells = []
    for mean, sd, mark in zip(means, sds, marks.fillna(""), strict=True):
        text = _percent(mean, decimals)
        if not pd.isna(sd):
            text += f" {markup.plus_minus} {_percent(sd, decimals)}"
        if best is not None and not pd.isna(mean) and round(100 * mean, decimals) == best:
            text = markup.bold(text)
        cells.append(f"{text} {markup.mark(mark)}" if mark else text)
    return cells


def _cells(frame: pd.DataFrame, decimals: int, markup: _Markup, bold_best: bool) -> pd.DataFrame:
    """All cells as display strings: metrics in percent (with sd and mark), text escaped."""
    shown = frame.reset_index()
    kept = [c for c in shown.columns if not str(c).endswith(("_sd", "_mark"))]
    for column in kept:
        if column in HEADERS:
            shown[column] = _metric_cells(shown, column, decimals, markup, bold_best)
        elif column == "seeds":
            shown[column] = [str(int(v)) for v in shown[column]]
        else:
            shown[column] = ["" if pd.isna(v) else markup.escape(str(v)) for v in shown[column]]
    return shown[kept].rename(columns=lambda c: markup.escape(HEADERS.get(c, str(c))))


class Tables(NamedTuple):
    """The three files of one table."""

    csv: Path
    markdown: Path
    latex: Path


def write_table(
    frame: pd.DataFrame, stem: str | Path, caption: str, decimals: int, bold_best: bool = False
) -> Tables:
    """Write `<stem>.csv` (fractions, full precision), `<stem>.md` and `<stem>.tex` (percent).

    Metric columns (named as in `METRICS`) are shown in percent with `decimals` decimals, other
    columns as text; `bold_best` marks the highest value of each metric column (ablations).
    """
    stem = Path(stem)
    csv_path, md_path, tex_path = (
        stem.parent / f"{stem.name}.{ext}" for ext in ("csv", "md", "tex")
    )
    write_text(csv_path, frame.reset_index().to_csv(index=False))

    md = _cells(frame, decimals, _MARKDOWN, bold_best)
    # Numbers align right, text left, in both formats.
    align = ["right" if c in HEADERS.values() or c == "seeds" else "left" for c in md.columns]
    table = md.to_markdown(index=False, disable_numparse=True, colalign=align)
    write_text(md_path, f"{caption}\n\n{table}\n")

    tex = _cells(frame, decimals, _LATEX, bold_best)
    latex = tex.style.hide(axis="index").to_latex(
        column_format="".join("r" if a == "right" else "l" for a in align),
        hrules=True,  # booktabs: toprule, midrule, bottomrule
        caption=_LATEX.escape(caption),
        label=f"tab:{stem.name}",
        position_float="centering",
    )
    write_text(tex_path, latex)
    log.info("wrote table %s.{csv,md,tex} (%d rows)", stem, len(frame))
    return Tables(csv_path, md_path, tex_path)


class MainTables(NamedTuple):
    main: Tables
    paper_vs_reproduced: Tables


class AblationTables(NamedTuple):
    ablation: Tables
    scoring: Tables


def main_results(
    config: Config,
    params: Params,
    metrics_dir: Path,
    tables_dir: Path,
    summary_dir: Path,
    reference_csv: Path,
) -> MainTables:
    """The main per-class table, the published rows beside ours, and one summary file per
    evaluated variant (what `dvc metrics show` lists)."""
    report, runs = config.report, load_runs(metrics_dir)
    variants = list(
        dict.fromkeys(m["variant"] for name, m in runs.items() if name != REFERENCE_RUN)
    )
    summary = summarise(runs, variants)
    for name, row in summary.iterrows():
        write_json(summary_dir / f"{name}.json", summary_metrics(row, report.decimals))
    label = params.variants[report.main_variant].label
    main = write_table(
        main_table(runs, report.main_variant),
        tables_dir / "main",
        caption(config, f"per-class results of {label}"),
        report.decimals,
    )
    comparison = paper_vs_reproduced(
        load_reference(reference_csv),
        summary,
        params.labels(report.reproduced),
        report.reference_dataset,
        config.data.dataset,
        report.comparable,
    )
    paper = write_table(
        comparison,
        tables_dir / "paper_vs_reproduced",
        caption(config, f"published results on {report.reference_dataset} and this repository's"),
        report.decimals,
    )
    return MainTables(main, paper)


def ablation_results(
    config: Config, params: Params, metrics_dir: Path, tables_dir: Path
) -> AblationTables:
    """The ablation table (chain first, marks against the RD baseline, the reference last) and
    the scoring table of the main variant's checkpoints."""
    report, runs = config.report, load_runs(metrics_dir)
    summary = summarise(runs, list(dict.fromkeys([*report.ablation, *report.scoring])))
    reference = runs.get(REFERENCE_RUN)
    baseline = report.chain[0]
    marks = f"arrows: gap to {baseline} beyond the larger sd over seeds"
    ablation = write_table(
        ablation_table(summary, params.labels(report.ablation), baseline, reference),
        tables_dir / "ablation",
        caption(config, f"ablation of MDD-Net's parts (mean over classes); {marks}"),
        report.decimals,
        bold_best=True,
    )
    scoring = write_table(
        ablation_table(summary, params.labels(report.scoring)),
        tables_dir / "scoring",
        caption(config, f"scoring maps of the {report.main_variant} checkpoints"),
        report.decimals,
        bold_best=True,
    )
    return AblationTables(ablation, scoring)
