"""Result tables of MDD-Net: main results, ablations, and the published numbers beside ours.

Metrics files keep fractions at full precision; this module is the only place where they become
percent with a fixed number of decimals, and `write_table` is the only function that formats:
each table is written as CSV (full precision), Markdown and LaTeX (booktabs) from one DataFrame.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pandas as pd

from mddnet.io import write_text
from mddnet.metrics import METRIC_NAMES

if TYPE_CHECKING:
    from mddnet.config import Variant

__all__ = [
    "HEADERS",
    "METRICS",
    "PUBLISHED_METRICS",
    "THIS_REPOSITORY",
    "ablation_table",
    "caption",
    "load_metrics",
    "load_reference",
    "main_table",
    "paper_vs_reproduced",
    "relabel",
    "variant_labels",
    "variant_paths",
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
NOT_AVAILABLE = "not available"
NOT_COMPARABLE = "not comparable: different data"
MISSING_CELL = "n/a"


class _Markup(NamedTuple):
    """How one output format escapes text and emphasises a cell."""

    escape: Callable[[str], str]
    bold: Callable[[str], str]


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
_MARKDOWN = _Markup(escape=lambda s: s.replace("|", r"\|"), bold=lambda s: f"**{s}**")
_LATEX = _Markup(escape=lambda s: s.translate(_LATEX_SPECIALS), bold=lambda s: rf"\textbf{{{s}}}")


def _metric_row(values: Mapping[str, Any], where: str, names: Sequence[str] = METRICS) -> dict:
    """The named metrics of one row; a missing one is an error naming where it was expected."""
    missing = [name for name in names if name not in values]
    if missing:
        raise ValueError(
            f"{where} lacks metric {missing[0]!r} (expected: {', '.join(names)}); "
            f"rerun the evaluate stage that writes it"
        )
    return {name: float(values[name]) for name in names}


def main_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Per-class rows in the order of the metrics file, then the file's `mean` row.

    The mean is taken from the file, not recomputed, so the table shows exactly what evaluate
    reported.
    """
    rows = {
        name: _metric_row(values, f"per_class[{name!r}]")
        for name, values in metrics["per_class"].items()
    }
    rows["mean"] = _metric_row(metrics["mean"], "mean")
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(METRICS))
    frame.index.name = "class"
    return frame


def ablation_table(
    metrics_by_variant: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]
) -> pd.DataFrame:
    """One row of mean metrics per variant, in the order of `labels` (which also selects them).

    `labels` usually comes from `variant_labels(config.variants, config.report.ablation)`, the
    paper's ablation layout; `config.report.scoring` gives the scoring table the same way.
    """
    missing = [variant for variant in labels if variant not in metrics_by_variant]
    if missing:
        raise ValueError(
            f"no metrics for variant {missing[0]!r} (have: {', '.join(metrics_by_variant)}); "
            f"run `dvc repro evaluate@{missing[0]}` first"
        )
    rows = {
        variant: {
            "label": label,
            **_metric_row(metrics_by_variant[variant]["mean"], f"variant {variant!r}: mean"),
        }
        for variant, label in labels.items()
    }
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=["label", *METRICS])
    frame.index.name = "variant"
    return frame


def variant_labels(variants: Mapping[str, Variant], names: Iterable[str]) -> dict[str, str]:
    """Labels of the named variants in the given order: the `labels` of `ablation_table`."""
    unknown = [name for name in names if name not in variants]
    if unknown:
        raise ValueError(
            f"unknown variant {unknown[0]!r} (valid: {', '.join(variants)}); fix the variant "
            f"lists under report: or figures: in params"
        )
    return {name: variants[name].label for name in names}


def caption(dataset: str, backbone: str, weights: str, image_size: int, what: str) -> str:
    """A caption that says what the table shows and which setting produced the numbers."""
    return (
        f"{what}. Dataset: {dataset}; teacher: {backbone} (weights: {weights}); "
        f"input {image_size}x{image_size} px; metrics in percent."
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
    reproduced: Mapping[str, Mapping[str, Any]],
    dataset: str,
    comparable: bool,
) -> pd.DataFrame:
    """Published rows of `dataset`, then this repository's rows (`reproduced`: name -> metrics).

    Published percent values become fractions like ours, so `write_table` formats both alike.
    With `comparable=False` (e.g. the offline benchmark) our rows carry a note that they were
    measured on different data; claiming comparability for a metrics file whose `dataset` is
    another one is refused.
    """
    published = reference[reference["dataset"].map(_dataset_key) == _dataset_key(dataset)]
    if published.empty:
        raise ValueError(
            f"reference has no rows for dataset {dataset!r} (has: "
            f"{', '.join(reference['dataset'].unique())}); pass one of those, with "
            f"comparable=False when this repository's numbers come from other data"
        )
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
    for name, metrics in reproduced.items():
        if name in rows:
            raise ValueError(
                f"row name {name!r} is already a published method; name this repository's row "
                f"differently, e.g. '{name} (this repository)'"
            )
        ours = metrics.get("dataset", dataset)
        if comparable and _dataset_key(ours) != _dataset_key(dataset):
            raise ValueError(
                f"{name!r} was measured on {ours!r}, not {dataset!r}: pass comparable=False"
            )
        rows[name] = {
            "dataset": ours,
            **_metric_row(metrics["mean"], f"{name!r}: mean", PUBLISHED_METRICS),
            "source": THIS_REPOSITORY,
            "note": "" if comparable else NOT_COMPARABLE,
        }
    frame = pd.DataFrame.from_dict(
        rows, orient="index", columns=["dataset", *PUBLISHED_METRICS, "source", "note"]
    )
    frame.index.name = "method"
    return frame


def relabel(metrics_by_variant: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    """`{label: metrics}` for the variants in `labels` (their order), for rows named by label."""
    return {label: metrics_by_variant[name] for name, label in labels.items()}


def variant_paths(folder: str | Path, names: Iterable[str], suffix: str) -> dict[str, Path]:
    """`{name: folder/<name><suffix>}`: the per-variant files a stage wrote, in `names` order."""
    return {name: Path(folder) / f"{name}{suffix}" for name in names}


def load_metrics(paths: Iterable[str | Path]) -> dict[str, dict[str, Any]]:
    """Read metrics JSON files, keyed by their `variant` field (the file stem when absent)."""
    loaded: dict[str, dict[str, Any]] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: metrics not found; run the evaluate stage first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); rerun its evaluate stage") from err
        for key in ("mean", "per_class"):
            if not isinstance(data.get(key), Mapping):
                raise ValueError(
                    f"{path}: missing {key!r} (a metrics file has 'mean' and 'per_class'); "
                    f"rerun its evaluate stage"
                )
        _metric_row(data["mean"], f"{path}: mean")
        for name, values in data["per_class"].items():
            _metric_row(values, f"{path}: per_class[{name!r}]")
        variant = data.get("variant", path.stem)
        if variant in loaded:
            raise ValueError(f"{path}: variant {variant!r} is already loaded from another file")
        loaded[variant] = data
    return loaded


def _percent(value: float, decimals: int, markup: _Markup, best: float | None) -> str:
    """One metric cell: percent with `decimals` decimals, bold when it shows the column best."""
    if pd.isna(value):
        return MISSING_CELL
    shown = round(100 * value, decimals)
    text = f"{shown:.{decimals}f}"
    return markup.bold(text) if best is not None and shown == best else text


def _cells(frame: pd.DataFrame, decimals: int, markup: _Markup, bold_best: bool) -> pd.DataFrame:
    """All cells as display strings: metrics in percent, text escaped, headers renamed."""
    shown = frame.reset_index()
    for column in shown.columns:
        if column in HEADERS:
            # Best of the rounded values, so that every cell that reads as the best is bold.
            best = (100 * shown[column]).round(decimals).max() if bold_best else None
            shown[column] = [_percent(v, decimals, markup, best) for v in shown[column]]
        else:
            shown[column] = ["" if pd.isna(v) else markup.escape(str(v)) for v in shown[column]]
    return shown.rename(columns=lambda c: markup.escape(HEADERS.get(c, str(c))))


def write_table(
    frame: pd.DataFrame, stem: str | Path, caption: str, decimals: int, bold_best: bool = False
) -> list[Path]:
    """Write `<stem>.csv` (fractions, full precision), `<stem>.md` and `<stem>.tex` (percent).

    Metric columns (named as in `METRICS`) are shown in percent with `decimals` decimals, other
    columns as text; `bold_best` marks the highest value of each metric column (ablations).
    """
    stem = Path(stem)
    csv_path, md_path, tex_path = (
        stem.parent / f"{stem.name}.{ext}" for ext in ("csv", "md", "tex")
    )
    write_text(csv_path, frame.reset_index().to_csv(index=False))

    # Numbers align right, text left, in both formats.
    align = ["right" if c in HEADERS else "left" for c in frame.reset_index().columns]
    md = _cells(frame, decimals, _MARKDOWN, bold_best)
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
    return [csv_path, md_path, tex_path]
