"""Figures: what each one draws (counts, values, picks), and the one reproducible writer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from PIL import Image

from mddnet.data.layout import scan_dataset
from mddnet.plots import (
    ABLATION_METRICS,
    ablation_chart,
    dataset_samples,
    loss_curves,
    per_class_bars,
    prototype_projection,
    qualitative_grid,
    roc_pr_curves,
    save_figure,
)
from mddnet.report import METRICS, REFERENCE_RUN, ablation_table, main_table, summarise

SIZE = 16  # map side, also the panel side of the qualitative grid


def fake_predictions(root: Path, restoration_identity: bool = True) -> SimpleNamespace:
    """Two classes, each with 2 good and 3 defective images (one defect type per image).

    Written in MVTec layout so that the row label shows the defect type; maps are random but
    seeded, with the ground truth square added so that the fused map is its brightest there.
    """
    rng = np.random.default_rng(0)
    paths, class_ids, labels, masks = [], [], [], []
    for class_id, name in enumerate(("alpha", "beta")):
        for kind in ("good", "good", "type0", "type1", "type2"):
            folder = root / name / "test" / kind
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{len(paths):03d}.png"
            pixels = rng.integers(0, 256, (SIZE * 2, SIZE * 2, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
            mask = np.zeros((SIZE, SIZE), bool)
            if kind != "good":
                mask[4:9, 4:9] = True
            paths.append(str(path))
            class_ids.append(class_id)
            labels.append(int(kind != "good"))
            masks.append(mask)
    masks_array = np.stack(masks)
    teacher = rng.uniform(0, 0.5, masks_array.shape) + masks_array  # (N, S, S)
    identity = (
        rng.uniform(0, 0.2, masks_array.shape) + 0.5 * masks_array
        if restoration_identity
        else np.zeros(masks_array.shape)
    )
    fused = teacher + identity
    return SimpleNamespace(
        class_names=("alpha", "beta"),
        paths=tuple(paths),
        class_ids=np.array(class_ids),
        labels=np.array(labels),
        scores=fused.reshape(len(paths), -1).max(axis=1),
        masks=masks_array,
        fused=fused.astype(np.float16),
        teacher_restoration=teacher.astype(np.float16),
        restoration_identity=identity.astype(np.float16),
    )


def metrics_file(level: float = 0.7, variant: str = "mddnet", seed: int = 0) -> dict:
    per_class = {
        "alpha": {m: level - 0.2 for m in METRICS},
        "beta": {m: level + 0.2 for m in METRICS},
    }
    return {
        "variant": variant,
        "seed": seed,
        "mean": {m: level for m in METRICS},
        "per_class": per_class,
    }


def test_save_figure_writes_reproducible_png_and_pdf_and_nothing_else(tmp_path: Path) -> None:
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    written = save_figure(fig, tmp_path / "out" / "line", ("png", "pdf"), dpi=50)
    assert written == [tmp_path / "out" / "line.png", tmp_path / "out" / "line.pdf"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["line.pdf", "line.png"]
    assert written[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert written[1].read_bytes().startswith(b"%PDF-")
    first = [p.read_bytes() for p in written]
    save_figure(fig, tmp_path / "out" / "line", ("png", "pdf"), dpi=50)
    assert [p.read_bytes() for p in written] == first  # no dates: DVC sees no change


def test_qualitative_grid_picks_evenly_spaced_defective_images_the_same_way_twice(
    tmp_path: Path,
) -> None:
    predictions = fake_predictions(tmp_path)
    grids = [qualitative_grid(predictions, per_class=2, image_size=SIZE) for _ in range(2)]
    rows = [[ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] for fig in grids]
    # Of three defective images, two evenly spaced are the first and the last.
    assert rows[0] == ["alpha\ntype0", "alpha\ntype2", "beta\ntype0", "beta\ntype2"]
    assert rows[1] == rows[0]
    first, second = (np.asarray(fig.axes[0].images[0].get_array()) for fig in grids)
    np.testing.assert_array_equal(first, second)


def test_qualitative_grid_has_five_columns_and_one_colour_scale_per_map_column(
    tmp_path: Path,
) -> None:
    predictions = fake_predictions(tmp_path)
    fig = qualitative_grid(predictions, per_class=1, image_size=SIZE)
    panels = [ax for ax in fig.axes if ax.get_subplotspec().rowspan.stop <= 2]
    assert len(panels) == 2 * 5  # 2 classes x (image, truth, 3 maps)
    assert len(fig.axes) == 2 * 5 + 3  # + a colour bar under each map column
    assert [ax.get_title() for ax in fig.axes[:5]] == [
        "image",
        "ground truth",
        "teacher-restoration",
        "restoration-identity",
        "fused",
    ]
    picked = [2, 7]  # the first defective image of each class
    fused = np.asarray(predictions.fused[picked], dtype=np.float32)
    for row in range(2):
        assert fig.axes[row * 5 + 4].images[0].get_clim() == (fused.min(), fused.max())


def test_qualitative_grid_leaves_an_absent_map_blank_and_says_n_a(tmp_path: Path) -> None:
    predictions = fake_predictions(tmp_path, restoration_identity=False)
    fig = qualitative_grid(predictions, per_class=1, image_size=SIZE)
    assert fig.axes[3].get_title() == "restoration-identity (n/a)"
    assert len(fig.axes[3].images) == 0 and len(fig.axes[8].images) == 0
    assert len(fig.axes) == 2 * 5 + 2  # no colour bar for the absent map


def test_qualitative_grid_without_defective_images_is_an_error(tmp_path: Path) -> None:
    predictions = fake_predictions(tmp_path)
    predictions.labels = np.zeros_like(predictions.labels)
    with pytest.raises(ValueError, match="no defective test image"):
        qualitative_grid(predictions, per_class=1, image_size=SIZE)


def test_per_class_bars_draw_one_group_per_class_and_the_mean_in_percent() -> None:
    table = main_table({"mddnet-s0": metrics_file()}, "mddnet")
    fig = per_class_bars(table, ("image_auroc", "pixel_aupro"))
    ax = fig.axes[0]
    assert len(ax.containers) == 2  # one colour per metric
    heights = [[bar.get_height() for bar in container] for container in ax.containers]
    assert heights == [pytest.approx([50, 90, 70])] * 2  # alpha, beta, mean
    assert all(c.errorbar is None for c in ax.containers)  # one seed: no error bars
    assert [t.get_text() for t in ax.get_xticklabels()] == ["alpha", "beta", "mean"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["I-AUROC", "AUPRO"]
    with pytest.raises(ValueError, match="unknown metric 'auroc'"):
        per_class_bars(table, ("auroc",))


def test_per_class_bars_show_the_sd_over_seeds_as_error_bars() -> None:
    runs = {f"mddnet-s{s}": metrics_file(level, seed=s) for s, level in enumerate((0.6, 0.8))}
    ax = per_class_bars(main_table(runs, "mddnet"), ("mad",)).axes[0]
    (container,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [bar.get_height() for bar in container] == pytest.approx([50, 90, 70])
    segments = container.errorbar.lines[2][0].get_segments()  # one vertical line per bar
    half = [abs(seg[1][1] - seg[0][1]) / 2 for seg in segments]
    assert half == pytest.approx([100 * np.sqrt(0.02)] * 3)  # sd of 0.6 and 0.8, in percent


def test_ablation_chart_draws_means_with_sd_bars_and_the_reference_line() -> None:
    runs = {
        **{f"rd-s{s}": metrics_file(v, "rd", s) for s, v in enumerate((0.7, 0.74))},
        "mdd-s0": metrics_file(0.9, "mdd"),
    }
    summary = summarise(runs, ["rd", "mdd"])
    reference = metrics_file(0.5, "reference")
    frame = ablation_table(summary, {"rd": "RD", "mdd": "MDD-Net"}, None, reference)
    fig = ablation_chart(frame)
    assert [ax.get_title() for ax in fig.axes] == ["I-AUROC", "P-AUROC", "AUPRO", "mAD"]
    assert len(fig.axes) == len(ABLATION_METRICS)
    for ax in fig.axes:
        points = ax.lines[0]  # the error-bar markers
        x, y = (np.asarray(v, dtype=float) for v in (points.get_xdata(), points.get_ydata()))
        np.testing.assert_allclose(x, [72.0, 90.0])  # rd (mean of its 2 seeds), mdd
        np.testing.assert_allclose(y, [1, 0])  # the first row on top
        (dashed,) = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert dashed.get_xdata()[0] == pytest.approx(50.0)  # the reference row
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["RD", "MDD-Net"]
    assert REFERENCE_RUN not in [t.get_text() for t in fig.axes[0].get_yticklabels()]


def write_losses(path: Path, memory: float) -> None:
    # 20 steps, epochs of 3 (the last of 2): the total repeats 3, 6, 9 and ends 3, 6.
    total = [3.0, 6.0, 9.0] * 6 + [3.0, 6.0]
    frame = pd.DataFrame(
        {
            "step": range(1, 21),
            "epoch": [i // 3 for i in range(20)],
            "lr": 0.005,
            "total": total,
            "restoration": 1.0,
            "identity": 1.0,
            "discrepancy": 1.0,
            "memory": memory,
        }
    )
    frame.to_csv(path, index=False)


def test_loss_curves_smooth_over_an_epoch_and_skip_terms_a_run_does_not_have(
    tmp_path: Path,
) -> None:
    write_losses(tmp_path / "a.csv", memory=0.5)
    write_losses(tmp_path / "b.csv", memory=0.0)
    fig = loss_curves({"MDD-Net": tmp_path / "a.csv", "DRD-Net": tmp_path / "b.csv"})
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert list(axes) == ["total", "restoration", "identity", "discrepancy", "memory"]
    assert [len(ax.lines) for ax in axes.values()] == [2, 2, 2, 2, 1]
    assert all(ax.get_yscale() == "log" for ax in axes.values())
    # Epochs of 3 steps: a centred mean over 3 steps, fewer at the ends.
    expected = [4.5] + [6.0] * 18 + [4.5]
    np.testing.assert_allclose(axes["total"].lines[0].get_ydata(), expected)
    # The legend gives the plateau: steps 17-18 average (6 + 9) / 2 = 7.5, steps 19-20
    # (3 + 6) / 2 = 4.5: the loss fell by 3 / 7.5 = 40 % over the last tenth.
    legend = fig.axes[-1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "MDD-Net (last tenth: -40.0 %)",
        "DRD-Net (last tenth: -40.0 %)",
    ]


def test_loss_curves_say_when_a_term_is_zero_in_every_run(tmp_path: Path) -> None:
    write_losses(tmp_path / "a.csv", memory=0.0)
    fig = loss_curves({"RD": tmp_path / "a.csv"})
    memory = next(ax for ax in fig.axes if ax.get_title() == "memory")
    assert not memory.lines and memory.get_yscale() == "linear"
    assert [t.get_text() for t in memory.texts] == ["zero in every run shown"]


def test_loss_curves_explain_missing_files_and_columns(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.csv: loss log not found"):
        loss_curves({"x": tmp_path / "absent.csv"})
    (tmp_path / "short.csv").write_text("step,total\n1,1.0\n")
    with pytest.raises(ValueError, match="short.csv: missing column 'restoration'"):
        loss_curves({"x": tmp_path / "short.csv"})


def test_roc_pr_curves_put_hand_computed_auroc_and_ap_in_the_legend() -> None:
    # Pairs (defective, good) ranked right: (0.35>0.1), (0.8>0.1), (0.8>0.4); wrong: (0.35<0.4)
    # -> AUROC 3/4. AP: recall 1/2 at precision 1 (0.8), then 1 at precision 2/3 (0.35).
    run = SimpleNamespace(labels=np.array([0, 0, 1, 1]), scores=np.array([0.1, 0.4, 0.35, 0.8]))
    perfect = SimpleNamespace(labels=np.array([0, 1]), scores=np.array([0.0, 1.0]))
    roc_ax, pr_ax = roc_pr_curves({"run": run, "perfect": perfect}).axes
    assert [t.get_text() for t in roc_ax.get_legend().get_texts()] == [
        "run (AUROC 75.0)",
        "perfect (AUROC 100.0)",
    ]
    assert [t.get_text() for t in pr_ax.get_legend().get_texts()] == [
        "run (AP 83.3)",
        "perfect (AP 100.0)",
    ]
    assert len(roc_ax.lines) == 3  # chance diagonal + one curve per variant
    np.testing.assert_allclose(roc_ax.lines[1].get_xdata(), [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(roc_ax.lines[1].get_ydata(), [0, 0.5, 0.5, 1, 1])


def test_prototype_projection_pca_matches_an_svd_of_the_normalised_prototypes() -> None:
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(3, 4, 6)) * rng.uniform(0.5, 3, size=(3, 4, 1))
    ax = prototype_projection(prototypes, ["a", "b", "c"]).axes[0]
    assert [c.get_label() for c in ax.collections] == ["a", "b", "c"]
    shown = np.concatenate([c.get_offsets() for c in ax.collections])  # (12, 2)
    points = prototypes.reshape(12, 6)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    centred = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    signs = np.sign(np.sum(shown * expected, axis=0))  # components are defined up to sign
    np.testing.assert_allclose(shown * signs, expected, atol=1e-10)
    assert ax.get_xlabel().startswith("PC1")


@pytest.mark.slow
def test_prototype_projection_tsne_option_and_errors() -> None:
    prototypes = np.random.default_rng(1).normal(size=(2, 3, 5))
    ax = prototype_projection(prototypes, ["a", "b"], method="tsne").axes[0]
    assert [len(c.get_offsets()) for c in ax.collections] == [3, 3]
    assert "t-SNE" in ax.get_title()
    with pytest.raises(ValueError, match=r"shape \(classes=3, K, D\)"):
        prototype_projection(prototypes, ["a", "b", "c"])
    with pytest.raises(ValueError, match="'pca' or 'tsne', got 'umap'"):
        prototype_projection(prototypes, ["a", "b"], method="umap")


def test_dataset_samples_show_normals_then_defects_per_class(tmp_path: Path) -> None:
    fake_predictions(tmp_path)  # writes alpha/beta test images in MVTec layout
    for name in ("alpha", "beta"):
        train = tmp_path / name / "train" / "good"
        train.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (SIZE, SIZE), (40 * i, 0, 0)).save(train / f"{i}.png")
        for kind in ("type0", "type1", "type2"):
            masks = tmp_path / name / "ground_truth" / kind
            masks.mkdir(parents=True)
            for image in (tmp_path / name / "test" / kind).glob("*.png"):
                mask = np.zeros((2 * SIZE, 2 * SIZE), np.uint8)
                mask[4:12, 4:12] = 255
                Image.fromarray(mask).save(masks / f"{image.stem}_mask.png")
    fig = dataset_samples(scan_dataset(tmp_path), SIZE, per_class=2)
    assert len(fig.axes) == 2 * 4  # 2 classes x (2 normals + 2 defects)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["good", "good", "type0", "type2"] * 2  # defects evenly spaced
    assert [ax.get_ylabel() for ax in fig.axes[::4]] == ["alpha", "beta"]
    assert all(len(ax.collections) > 0 for ax in fig.axes if ax.get_title() != "good")


def test_figures_leave_the_global_matplotlib_style_untouched(tmp_path: Path) -> None:
    before = dict(mpl.rcParams)
    per_class_bars(main_table({"m-s0": metrics_file(variant="m")}, "m"), style="darkgrid")
    qualitative_grid(fake_predictions(tmp_path), per_class=1, image_size=SIZE, style="ticks")
    assert dict(mpl.rcParams) == before
