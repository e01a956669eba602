"""Figures of MDD-Net: qualitative anomaly maps, per-class and ablation charts, training losses,
ROC/PR curves and the class-aware memory's prototypes.

Every figure is a `matplotlib.figure.Figure` built without pyplot, so no global backend or figure
registry is touched (Agg renders it when saved); seaborn styles it through a context, so its
settings do not leak into the caller. `save_figure` is the only function that writes files.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from mddnet.data.layout import Sample, load_image, load_mask
from mddnet.io import load_checkpoint, write_bytes
from mddnet.metrics import loss_plateau
from mddnet.predictions import Predictions, load_predictions
from mddnet.report import (
    HEADERS,
    METRICS,
    REFERENCE_RUN,
    ablation_table,
    load_runs,
    main_table,
    summarise,
)

if TYPE_CHECKING:
    from mddnet.config import Config, Params

__all__ = [
    "LOSS_TERMS",
    "ablation_chart",
    "data_samples_figure",
    "dataset_samples",
    "loss_curves",
    "per_class_bars",
    "pipeline_figures",
    "prototype_projection",
    "qualitative_grid",
    "roc_pr_curves",
    "save_figure",
]

log = logging.getLogger(__name__)

LOSS_TERMS: tuple[str, ...] = ("total", "restoration", "identity", "discrepancy", "memory")
# Dates in PDF/SVG metadata would make every rerun a changed output for DVC and git.
_METADATA: dict[str, dict[str, Any]] = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}
_PROJECTION_NAMES = {"pca": "PCA", "tsne": "t-SNE"}
# (title, Predictions field) of the map columns of the qualitative grid.
_MAP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("teacher-restoration", "teacher_restoration"),
    ("restoration-identity", "restoration_identity"),
    ("fused", "fused"),
)


@contextlib.contextmanager
def _styled(style: str) -> Iterator[None]:
    """Seaborn's axes style and paper fonts while a figure is built (restored afterwards)."""
    with sns.axes_style(style), sns.plotting_context("paper"):
        yield


def save_figure(fig: Figure, stem: str | Path, formats: Iterable[str], dpi: int) -> list[Path]:
    """Write `<stem>.<format>` for each format, each atomically and byte-for-byte reproducible."""
    stem = Path(stem)
    written = []
    for fmt in formats:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight", metadata=_METADATA.get(fmt))
        path = stem.parent / f"{stem.name}.{fmt}"
        write_bytes(path, buffer.getvalue())
        written.append(path)
    log.info("wrote figure %s.{%s}", stem, ",".join(p.suffix[1:] for p in written))
    return written


def _resized(array: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """A 2-D array resized to size x size with PIL (float maps in mode F keep their values)."""
    return np.asarray(Image.fromarray(array).resize((size, size), resample))


def _picked(predictions: Predictions, per_class: int) -> list[int]:
    """Up to `per_class` defective images per class, evenly spaced in test order.

    Deterministic (the same images every run) and, since MVTec lists a class's test images by
    defect type, spread over the defect types rather than all from the first one.
    """
    picked = []
    for class_id, name in enumerate(predictions.class_names):
        defective = np.flatnonzero(
            (np.asarray(predictions.class_ids) == class_id) & (np.asarray(predictions.labels) == 1)
        )
        if defective.size == 0:
            log.warning("qualitative grid: class %s has no defective test image", name)
            continue
        count = min(per_class, defective.size)
        picked.extend(defective[np.linspace(0, defective.size - 1, count).round().astype(int)])
    return [int(i) for i in picked]


def _evenly(items: Sequence[Any], count: int) -> list[Any]:
    """Up to `count` items evenly spaced over `items` (deterministic; spreads over types)."""
    if not items:
        return []
    index = np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int)
    return [items[i] for i in index]


def dataset_samples(
    samples: Sequence[Sample], image_size: int, per_class: int = 3, *, style: str = "white"
) -> Figure:
    """Per class: a few normal training images, then defective test images, ground truth outlined.

    The figure a user looks at first to see what the data is (real or generated) and that masks
    sit where the defects are.
    """
    by_class: dict[str, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.class_name, []).append(sample)
    columns = 2 * per_class
    with _styled(style):
        fig = Figure(figsize=(1.3 * columns, 1.35 * len(by_class)), layout="constrained")
        axes = fig.subplots(len(by_class), columns, squeeze=False)
        for row, (name, group) in enumerate(sorted(by_class.items())):
            normals = _evenly([s for s in group if s.split == "train"], per_class)
            defects = _evenly([s for s in group if s.label == 1], per_class)
            shown = [*normals, *([None] * (per_class - len(normals))), *defects]
            for ax, sample in zip(axes[row], shown + [None] * (columns - len(shown)), strict=True):
                ax.set_xticks([])
                ax.set_yticks([])
                if sample is None:
                    ax.set_axis_off()
                    continue
                image = load_image(sample.image_path)
                ax.imshow(np.asarray(image.resize((image_size, image_size))), aspect="auto")
                if sample.mask_path is not None:
                    mask = load_mask(sample.mask_path, image.size).astype(np.uint8) * 255
                    mask = _resized(mask, image_size, Image.Resampling.NEAREST) > 0
                    ax.contour(mask, levels=[0.5], colors="red", linewidths=0.7)
                ax.set_title(sample.defect_type, fontsize=7, pad=2)
            axes[row, 0].set_ylabel(name, fontsize=8)
    return fig


def _map_panels(
    predictions: Predictions, rows: Sequence[int], absent: set[str], image_size: int
) -> dict[int, np.ndarray]:
    """Grid column of each drawn map -> its panels (R, S, S), resized like the images."""
    return {
        column: np.stack(
            [
                _resized(
                    np.asarray(getattr(predictions, field)[i], np.float32),
                    image_size,
                    Image.Resampling.BILINEAR,
                )
                for i in rows
            ]
        )
        for column, (_, field) in enumerate(_MAP_COLUMNS, start=2)
        if field not in absent
    }


def _draw_row(
    axes: Sequence[Any],
    predictions: Predictions,
    index: int,
    panels: Mapping[int, np.ndarray],
    image_size: int,
    scales: Mapping[int, tuple[float, float]],
) -> None:
    """One test image of the qualitative grid: image, ground truth, its map panels (each column
    on its own colour scale, shared by all rows)."""
    with Image.open(predictions.paths[index]) as image:
        rgb = np.asarray(
            image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
        )  # (S, S, 3)
    mask = np.asarray(predictions.masks[index], np.uint8) * 255
    mask = _resized(mask, image_size, Image.Resampling.NEAREST) > 0  # (S, S)
    # aspect="auto": panels fill their cells, no gaps from a fixed aspect ratio.
    axes[0].imshow(rgb, aspect="auto")
    axes[1].imshow(rgb, aspect="auto")
    axes[1].imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.45, aspect="auto")
    for c, panel in panels.items():
        low, high = scales[c]
        axes[c].imshow(panel, cmap="jet", vmin=low, vmax=high, aspect="auto")
    if mask.any():  # the ground-truth outline on the overlay and on every map
        for c in (1, *panels):
            axes[c].contour(mask, levels=[0.5], colors="white", linewidths=0.7)
    class_name = predictions.class_names[int(predictions.class_ids[index])]
    defect = Path(predictions.paths[index]).parent.name
    axes[0].set_ylabel(f"{class_name}\n{defect}", fontsize=8)


def qualitative_grid(
    predictions: Predictions, per_class: int, image_size: int, *, style: str = "white"
) -> Figure:
    """Image, ground truth and the three anomaly maps for a few defective images per class.

    Every panel is drawn at `image_size` px (images, masks and maps are resized alike, as the
    dataset resizes inputs). Each map column has ONE colour scale shared by all rows (min to max
    of that map over the shown images), so rows compare the way a single threshold sees them. A
    map that is zero everywhere (the variant has no such map) is left blank and titled "n/a".
    """
    rows = _picked(predictions, per_class)
    if not rows:
        raise ValueError("qualitative grid: no defective test image in the predictions")
    absent = {field for _, field in _MAP_COLUMNS if not np.any(getattr(predictions, field))}
    titles = ["image", "ground truth"] + [
        f"{title} (n/a)" if field in absent else title for title, field in _MAP_COLUMNS
    ]
    maps = _map_panels(predictions, rows, absent, image_size)
    with _styled(style):
        fig = Figure(figsize=(1.4 * len(titles), 1.4 * len(rows) + 0.5), layout="constrained")
        # One thin extra row holds the colour bars of the map columns.
        axes = fig.subplots(
            len(rows) + 1,
            len(titles),
            squeeze=False,
            gridspec_kw={"height_ratios": [1.0] * len(rows) + [0.07]},
        )
        for r, index in enumerate(rows):
            scales = {c: (float(p.min()), float(p.max())) for c, p in maps.items()}
            row = {c: p[r] for c, p in maps.items()}
            _draw_row(axes[r], predictions, index, row, image_size, scales)
        for ax in axes[:-1].flat:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax, title in zip(axes[0], titles, strict=True):
            ax.set_title(title, fontsize=8)
        for c, ax in enumerate(axes[-1]):
            if c in maps:  # all rows share the column's scale: row 0's image stands for all
                fig.colorbar(axes[0, c].images[0], cax=ax, orientation="horizontal")
                ax.tick_params(labelsize=7)
            else:
                ax.remove()
    return fig


def per_class_bars(
    table: pd.DataFrame,
    metrics_to_show: Sequence[str] = ("image_auroc", "pixel_auroc", "pixel_aupro"),
    *,
    style: str = "whitegrid",
) -> Figure:
    """Grouped bars (percent) per class and for the mean, one colour per metric, with error bars
    of the sd over seeds (`report.main_table`'s `<metric>_sd` columns; none for one seed)."""
    unknown = [m for m in metrics_to_show if m not in HEADERS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r} (expected one of: {', '.join(METRICS)})")
    colours = sns.color_palette("tab10", len(metrics_to_show))
    width = 0.8 / len(metrics_to_show)
    x = np.arange(len(table))
    with _styled(style):
        fig = Figure(figsize=(max(5.0, 1.2 + 0.45 * len(x) * len(metrics_to_show)), 3.4))
        fig.set_layout_engine("constrained")
        ax = fig.subplots()
        for i, metric in enumerate(metrics_to_show):
            sd = table.get(f"{metric}_sd")
            ax.bar(
                x + (i - (len(metrics_to_show) - 1) / 2) * width,
                100 * table[metric],
                width,
                yerr=None if sd is None or sd.isna().all() else 100 * sd.fillna(0),
                capsize=2,
                color=colours[i],
                label=HEADERS[metric],
            )
        ax.set_xticks(x, table.index, rotation=45, ha="right")
        ax.set(ylim=(0, 100), ylabel="%")
        ax.legend(
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0),
            ncols=len(metrics_to_show),
            frameon=False,
        )
    return fig


ABLATION_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "mad")


def ablation_chart(ablation_frame: pd.DataFrame, *, style: str = "whitegrid") -> Figure:
    """Mean over classes of each variant with the sd over its seeds as error bars, one panel per
    metric; the training-free reference (`report.REFERENCE_RUN` row) is a dashed line.

    Each panel has its own x range, because the metrics span very different ranges; the error
    bars show which gaps between variants are larger than the seed-to-seed spread.
    """
    reference = (
        ablation_frame.loc[REFERENCE_RUN] if REFERENCE_RUN in ablation_frame.index else None
    )
    rows = ablation_frame.drop(index=REFERENCE_RUN, errors="ignore")
    names = list(rows.get("label", rows.index))
    y = np.arange(len(rows))[::-1]
    with _styled(style):
        fig = Figure(figsize=(3.0 + 2.2 * len(ABLATION_METRICS), 0.9 + 0.32 * len(rows)))
        fig.set_layout_engine("constrained")
        axes = fig.subplots(1, len(ABLATION_METRICS), sharey=True)
        for ax, metric in zip(axes, ABLATION_METRICS, strict=True):
            sd = rows.get(f"{metric}_sd", pd.Series(np.nan, index=rows.index)).fillna(0)
            ax.errorbar(100 * rows[metric], y, xerr=100 * sd, fmt="o", ms=4, capsize=2, color="C0")
            if reference is not None:
                ax.axvline(100 * reference[metric], ls="--", color="grey", lw=1, label="reference")
            ax.set_title(HEADERS[metric], fontsize=9)
            ax.set_xlabel("%")
        axes[0].set_yticks(y, names, fontsize=7)
        if reference is not None:  # below the panels: inside, it would cover a row's point
            handles, labels = axes[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside lower center", fontsize=7, frameon=False)
    return fig


def _read_losses(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: loss log not found; run the train stage that writes it")
    frame = pd.read_csv(path)
    missing = [c for c in ("step", *LOSS_TERMS) if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column {missing[0]!r}; a loss log has step, epoch, lr, "
            f"{', '.join(LOSS_TERMS)} (rerun the train stage)"
        )
    return frame


def loss_curves(
    csv_paths_by_variant: Mapping[str, str | Path], *, style: str = "whitegrid"
) -> Figure:
    """Total loss and each term against the step, one line per variant, log y.

    Each line is a centred moving average over one epoch of steps: per-batch losses are too
    noisy to tell several variants apart. A term that is zero throughout a run (removed in that
    variant) is not drawn; a term zero in every run gets a panel that says so. The legend gives
    each run's loss plateau (`metrics.loss_plateau`): how much the total loss still changed over
    the last tenth of the steps.
    """
    logs = {name: _read_losses(Path(path)) for name, path in csv_paths_by_variant.items()}
    colours = dict(zip(logs, sns.color_palette("tab10", len(logs)), strict=True))
    with _styled(style):
        fig = Figure(figsize=(10, 5.5), layout="constrained")
        axes = fig.subplots(2, 3).flat
        for ax, term in zip(axes, LOSS_TERMS, strict=False):
            used = {name: frame for name, frame in logs.items() if (frame[term] > 0).any()}
            if not used:  # e.g. the memory loss of a one-class set: an empty log axis misleads
                ax.set(title=term, xticks=[], yticks=[])
                ax.text(0.5, 0.5, "zero in every run shown", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8)  # fmt: skip
                continue
            for name, frame in used.items():
                window = max(1, int(frame.groupby("epoch").size().median()))
                smooth = frame[term].rolling(window, center=True, min_periods=1).mean()
                ax.plot(frame["step"], smooth, color=colours[name], lw=1.2, label=name)
            ax.set_yscale("log")
            # Plain numbers at 1-2-5 steps (0.05, 0.1, 0.2) read faster than 5 x 10^-2.
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set(title=term, xlabel="step")
        legend_ax = axes[len(LOSS_TERMS)]
        legend_ax.axis("off")
        labels = {
            name: f"{name} (last tenth: {-100 * loss_plateau(frame['total']):+.1f} %)"
            for name, frame in logs.items()
        }
        legend_ax.legend(
            handles=[
                legend_ax.plot([], [], color=colours[name], label=labels[name])[0] for name in logs
            ],
            loc="center",
            frameon=False,
            title="total loss change over the last tenth",
            title_fontsize=7,
        )
    return fig


def roc_pr_curves(
    predictions_by_variant: Mapping[str, Predictions], *, style: str = "whitegrid"
) -> Figure:
    """Image-level ROC and precision-recall curves, all test images pooled over classes.

    Pooled, so the AUROC/AP in the legend differ from the tables' per-class means.
    """
    with _styled(style):
        fig = Figure(figsize=(9, 4), layout="constrained")
        roc_ax, pr_ax = fig.subplots(1, 2)
        roc_ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        for name, predictions in predictions_by_variant.items():
            labels, scores = np.asarray(predictions.labels), np.asarray(predictions.scores)
            fpr, tpr, _ = roc_curve(labels, scores)
            precision, recall, _ = precision_recall_curve(labels, scores)
            auroc = roc_auc_score(labels, scores)
            ap = average_precision_score(labels, scores)
            roc_ax.plot(fpr, tpr, lw=1.2, label=f"{name} (AUROC {100 * auroc:.1f})")
            pr_ax.plot(
                recall,
                precision,
                lw=1.2,
                drawstyle="steps-post",
                label=f"{name} (AP {100 * ap:.1f})",
            )
        roc_ax.set(
            xlabel="false positive rate",
            ylabel="true positive rate",
            title="image-level ROC (pooled over classes)",
            xlim=(0, 1),
            ylim=(0, 1.01),
        )
        pr_ax.set(
            xlabel="recall",
            ylabel="precision",
            title="image-level precision-recall (pooled)",
            xlim=(0, 1),
            ylim=(0, 1.01),
        )
        for ax in (roc_ax, pr_ax):
            ax.legend(loc="lower left" if ax is pr_ax else "lower right", fontsize=7)
    return fig


def _project(points: np.ndarray, method: str) -> tuple[np.ndarray, list[str]]:
    """2-D coordinates of `points` (N, D) and the axis labels, by PCA or t-SNE."""
    if method not in _PROJECTION_NAMES:
        raise ValueError(f"projection method must be 'pca' or 'tsne', got {method!r}")
    if method == "pca":
        pca = PCA(n_components=2, svd_solver="full")
        coords = pca.fit_transform(points)  # (N, 2)
        return coords, [
            f"PC{i + 1} ({100 * r:.0f} % of variance)"
            for i, r in enumerate(pca.explained_variance_ratio_)
        ]
    if len(points) < 4:
        raise ValueError(f"t-SNE needs at least 4 prototypes, got {len(points)}; use pca")
    tsne = TSNE(
        n_components=2, perplexity=min(30.0, (len(points) - 1) / 3), init="pca", random_state=0
    )
    return tsne.fit_transform(points), ["t-SNE 1", "t-SNE 2"]


def prototype_projection(
    prototypes: np.ndarray,
    class_names: Sequence[str],
    method: str = "pca",
    *,
    style: str = "whitegrid",
) -> Figure:
    """2-D projection of the memory's prototypes (C, K, D), coloured by class.

    Prototypes are L2-normalised first because the memory reads them by cosine similarity: only
    their direction matters. `method` is "pca" (linear, deterministic; the default) or "tsne"
    (neighbourhoods, seeded; its perplexity is capped below the number of points).
    """
    prototypes = np.asarray(prototypes, dtype=np.float64)
    if prototypes.ndim != 3 or prototypes.shape[0] != len(class_names):
        raise ValueError(
            f"prototypes must have shape (classes={len(class_names)}, K, D), got "
            f"{prototypes.shape}; pass the memory's prototype tensor and its class names"
        )
    classes, k, _ = prototypes.shape
    points = prototypes.reshape(classes * k, -1)  # (C*K, D)
    points = points / np.linalg.norm(points, axis=1, keepdims=True).clip(min=1e-12)
    coords, axis_labels = _project(points, method)
    colours = sns.color_palette("husl" if classes > 10 else "tab10", classes)
    with _styled(style):
        fig = Figure(figsize=(6.5, 4.5), layout="constrained")
        ax = fig.subplots()
        for c, name in enumerate(class_names):
            block = coords[c * k : (c + 1) * k]  # (K, 2)
            ax.scatter(
                block[:, 0],
                block[:, 1],
                color=colours[c],
                s=25,
                label=name,
                edgecolors="white",
                linewidths=0.4,
            )
        ax.set(
            xlabel=axis_labels[0],
            ylabel=axis_labels[1],
            title=f"memory prototypes ({k} per class, {_PROJECTION_NAMES[method]})",
        )
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=7)
    return fig


def data_samples_figure(samples: Sequence[Sample], config: Config, stem: Path) -> Path:
    """The prepare stage's figure of the data, saved in `figures.formats`; returns the PNG."""
    figure = dataset_samples(samples, config.data.image_size, style="white")
    formats = dict.fromkeys((*config.figures.formats, "png"))  # the PNG is what notebooks show
    written = save_figure(figure, stem, formats, config.figures.dpi)
    return next(p for p in written if p.suffix == ".png")


def pipeline_figures(
    config: Config, params: Params, folders: Mapping[str, Path], out: Path
) -> dict[str, Path]:
    """Every figure of the figures stage, saved in `figures.formats`; `{name: PNG path}`.

    `folders` holds the `metrics`, `losses`, `predictions` and `checkpoints` folders. Per-run
    figures show the first seed's runs; tables and bars summarise all seeds.
    """
    report, settings = config.report, config.figures
    first = config.seeds[0]
    compare = {name: f"{name}-s{first}" for name in settings.compare}
    runs = load_runs(folders["metrics"])
    summary = summarise(runs, report.ablation)
    predictions = {
        n: load_predictions(folders["predictions"] / f"{r}.npz") for n, r in compare.items()
    }
    main = load_checkpoint(folders["checkpoints"] / f"{compare[report.main_variant]}.pt")
    prototypes = main["state_dict"].get("memory.prototypes")
    figures = {
        "qualitative": qualitative_grid(
            predictions[report.main_variant],
            settings.qualitative_per_class,
            config.data.image_size,
        ),
        "per_class": per_class_bars(main_table(runs, report.main_variant), style=settings.style),
        "ablation": ablation_chart(
            ablation_table(summary, params.labels(report.ablation), None, runs.get(REFERENCE_RUN)),
            style=settings.style,
        ),
        "losses": loss_curves(
            {n: folders["losses"] / f"{r}.csv" for n, r in compare.items()}, style=settings.style
        ),
        "roc_pr": roc_pr_curves(predictions, style=settings.style),
    }
    if prototypes is not None:
        figures["prototypes"] = prototype_projection(
            prototypes.numpy(), main["class_names"], style=settings.style
        )
    formats = dict.fromkeys((*settings.formats, "png"))  # the PNG is what notebooks show
    return {
        name: next(
            p for p in save_figure(fig, out / name, formats, settings.dpi) if p.suffix == ".png"
        )
        for name, fig in figures.items()
    }
