"""Tables: means and sds over seeds, spread marks, percent rounding, full-precision CSV, booktabs
LaTeX, published rows, and the two table stages on a folder of metrics files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from mddnet.config import load_config, load_params
from mddnet.report import (
    DOWN,
    METRICS,
    PUBLISHED_METRICS,
    REFERENCE_RUN,
    UP,
    Tables,
    ablation_results,
    ablation_table,
    caption,
    load_reference,
    load_runs,
    main_results,
    main_table,
    paper_vs_reproduced,
    spread_mark,
    summarise,
    write_table,
)

HEADER_ROW = "I-AUROC | I-AP | I-F1max | P-AUROC | P-AP | P-F1max | AUPRO | mAD"

# Copied by hand from MDD-Net.md, "Published reference numbers" (percent, in METRICS order).
NOTES = {
    ("MVTec AD", "RD"): "93.6/97.2/95.6/95.8/48.2/53.6/91.2",
    ("MVTec AD", "RD++"): "97.9/98.8/96.4/97.3/54.7/58.0/93.2",
    ("MVTec AD", "MambaAD"): "97.8/99.3/97.3/97.4/55.1/57.6/93.4",
    ("MVTec AD", "Dinomaly ViT-B"): "99.6/99.8/99.0/98.4/69.3/69.2/94.8",
    ("VisA", "RD"): "90.6/90.9/89.3/98.0/35.4/42.5/91.9",
    ("VisA", "RD++"): "93.9/94.7/90.2/98.4/42.3/46.3/91.9",
    ("VisA", "Dinomaly ViT-B"): "98.7/98.9/96.2/98.7/53.2/55.7/94.5",
}


def metrics_file(
    level: float, variant: str = "mddnet", seed: int = 0, dataset: str = "generated"
) -> dict:
    """A metrics dict as evaluate writes it: two classes and their (hand-made) mean."""
    return {
        "dataset": dataset,
        "variant": variant,
        "label": variant,
        "seed": seed,
        "mean": {m: level for m in METRICS},
        "per_class": {
            "brick": {m: level - 0.1 for m in METRICS},
            "gear": {m: level + 0.1 for m in METRICS},
        },
    }


def runs_of(**levels: list[float]) -> dict[str, dict]:
    """`{<variant>-s<seed>: metrics}` with one metrics file per level, seeds 0, 1, ..."""
    return {
        f"{variant}-s{seed}": metrics_file(level, variant, seed)
        for variant, values in levels.items()
        for seed, level in enumerate(values)
    }


def md_cells(path: Path) -> list[list[str]]:
    """The body rows of a Markdown pipe table, as stripped cell texts."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.fixture
def reference(repo: Path) -> pd.DataFrame:
    return load_reference(repo / "references" / "published_results.csv")


def test_main_table_of_one_seed_lists_classes_in_file_order_then_the_mean() -> None:
    runs = runs_of(mddnet=[0.8])
    runs["mddnet-s0"]["per_class"]["brick"]["pixel_aupro"] = 0.123456789
    table = main_table(runs, "mddnet")
    assert list(table.index) == ["brick", "gear", "mean"]
    assert table.index.name == "class"
    assert list(table.columns) == ["seeds", *METRICS, *(f"{m}_sd" for m in METRICS)]
    assert table.loc["brick", "pixel_aupro"] == 0.123456789
    assert table.loc["gear", "image_auroc"] == pytest.approx(0.9)
    assert (table.loc["mean", list(METRICS)] == 0.8).all()
    assert (table["seeds"] == 1).all()
    assert table[[f"{m}_sd" for m in METRICS]].isna().all().all()  # one seed: no sd


def test_main_table_averages_the_seeds_with_their_sample_sd() -> None:
    # Means 0.6 and 0.8: mean 0.7, sample sd sqrt(2 x 0.1^2 / 1) = 0.141421
    runs = runs_of(mddnet=[0.6, 0.8], drd_net=[0.1])
    table = main_table(runs, "mddnet")
    assert table.loc["mean", "mad"] == pytest.approx(0.7)
    assert table.loc["brick", "mad"] == pytest.approx(0.6)
    assert table.loc["mean", "mad_sd"] == pytest.approx(math.sqrt(0.02))
    assert (table["seeds"] == 2).all()


def test_main_table_names_what_is_missing() -> None:
    runs = runs_of(mddnet=[0.8])
    del runs["mddnet-s0"]["per_class"]["gear"]["mad"]
    with pytest.raises(ValueError, match=r"per_class\['gear'\] lacks metric 'mad'"):
        main_table(runs, "mddnet")
    with pytest.raises(ValueError, match=r"no metrics for variant 'drd_net' \(have: mddnet-s0\)"):
        main_table(runs, "drd_net")


def test_summarise_has_one_row_per_variant_with_seeds_means_and_sds() -> None:
    summary = summarise(runs_of(mddnet=[0.6, 0.8], rd_baseline=[0.5]), ["rd_baseline", "mddnet"])
    assert list(summary.index) == ["rd_baseline", "mddnet"]
    assert summary.index.name == "variant"
    assert list(summary["seeds"]) == [1, 2]
    assert summary.loc["mddnet", "image_auroc"] == pytest.approx(0.7)
    assert summary.loc["mddnet", "image_auroc_sd"] == pytest.approx(math.sqrt(0.02))
    assert math.isnan(summary.loc["rd_baseline", "image_auroc_sd"])


def test_spread_mark_needs_a_gap_beyond_the_larger_sd_over_two_or_more_seeds() -> None:
    base = {"seeds": 3, "mad": 0.80, "mad_sd": 0.02}
    assert spread_mark({"seeds": 3, "mad": 0.90, "mad_sd": 0.01}, base, "mad") == UP
    assert spread_mark({"seeds": 3, "mad": 0.70, "mad_sd": 0.01}, base, "mad") == DOWN
    assert spread_mark({"seeds": 3, "mad": 0.81, "mad_sd": 0.01}, base, "mad") == ""  # 0.01
    assert spread_mark({"seeds": 2, "mad": 0.85, "mad_sd": 0.06}, base, "mad") == ""  # < sd
    assert spread_mark({"seeds": 1, "mad": 0.99, "mad_sd": float("nan")}, base, "mad") == ""


def test_ablation_table_follows_labels_marks_against_the_baseline_and_ends_with_reference():
    summary = summarise(
        runs_of(rd_baseline=[0.70, 0.72], mddnet=[0.90, 0.91], score_tr=[0.5]),
        ["rd_baseline", "mddnet", "score_tr"],
    )
    reference = metrics_file(0.6, variant="reference") | {"label": "[reference] kNN"}
    labels = {"rd_baseline": "RD", "mddnet": "+ memory (MDD-Net)"}
    table = ablation_table(summary, labels, "rd_baseline", reference)
    assert list(table.index) == ["rd_baseline", "mddnet", REFERENCE_RUN]
    assert list(table["label"]) == ["RD", "+ memory (MDD-Net)", "[reference] kNN"]
    assert table.loc["mddnet", "image_auroc"] == pytest.approx(0.905)
    assert table.loc[REFERENCE_RUN, "image_auroc"] == 0.6
    assert table.loc["mddnet", "mad_mark"] == UP and table.loc["rd_baseline", "mad_mark"] == ""
    with pytest.raises(ValueError, match="no summary for variant 'drd_net'"):
        ablation_table(summary, {"mddnet": "M", "drd_net": "D"})


def test_write_table_writes_exactly_csv_md_and_tex(tmp_path: Path) -> None:
    table = main_table(runs_of(mddnet=[0.8]), "mddnet")
    written = write_table(table, tmp_path / "main", "Main results", 1)
    assert written == Tables(*(tmp_path / f"main.{ext}" for ext in ("csv", "md", "tex")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["main.csv", "main.md", "main.tex"]


def test_markdown_shows_percent_rounded_with_the_sd_and_the_mark(tmp_path: Path) -> None:
    frame = pd.DataFrame({m: [0.98765] for m in METRICS}, index=pd.Index(["mean"], name="class"))
    write_table(frame, tmp_path / "one", "A caption.", decimals=1)
    write_table(frame, tmp_path / "none", "A caption.", decimals=0)
    lines = (tmp_path / "one.md").read_text().splitlines()
    assert lines[0] == "A caption."
    assert " ".join(lines[2].split()) == f"| class | {HEADER_ROW} |"
    assert md_cells(tmp_path / "one.md") == [["mean"] + ["98.8"] * len(METRICS)]
    assert md_cells(tmp_path / "none.md") == [["mean"] + ["99"] * len(METRICS)]
    frame["mad_sd"], frame["mad_mark"] = 0.01234, UP
    write_table(frame, tmp_path / "sd", "A caption.", decimals=1)
    assert md_cells(tmp_path / "sd.md")[0][-1] == f"98.8 \u00b1 1.2 {UP}"


def test_csv_keeps_fractions_at_full_precision(tmp_path: Path) -> None:
    runs = runs_of(mddnet=[0.8])
    runs["mddnet-s0"]["per_class"]["brick"]["image_ap"] = 0.987654321012345
    runs["mddnet-s0"]["mean"]["mad"] = 1 / 3
    table = main_table(runs, "mddnet")
    write_table(table, tmp_path / "main", "Main results", 1)
    back = pd.read_csv(tmp_path / "main.csv", index_col="class")
    pd.testing.assert_frame_equal(back, table, check_exact=True)
    assert back.loc["mean", "mad"] == 1 / 3


def test_latex_is_booktabs_with_the_escaped_caption(params_path: Path, tmp_path: Path) -> None:
    config = load_config(
        params_path,
        overrides={"data": {"dataset": "mvtec_ad"}, "model": {"backbone": "wide_resnet50_2"}},
    )
    text = caption(config, "Main results")
    write_table(main_table(runs_of(mddnet=[0.8]), "mddnet"), tmp_path / "main", text, 1)
    tex = (tmp_path / "main.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    assert r"\caption{Main results. Dataset: mvtec\_ad; teacher: wide\_resnet50\_2" in tex
    assert r"\label{tab:main}" in tex
    assert r"brick & 1 & 70.0 & 70.0" in tex
    assert r"mean & 1 & 80.0 & 80.0" in tex
    assert "seeds & I-AUROC & I-AP & I-F1max & P-AUROC & P-AP & P-F1max & AUPRO & mAD" in tex


def test_caption_names_dataset_teacher_size_steps_and_seeds(params_path: Path) -> None:
    config = load_config(params_path, overrides={"train": {"steps": 500}})
    assert caption(config, "Ablations") == (
        "Ablations. Dataset: generated; teacher: tf_efficientnet_lite0 (weights: "
        "efficientnet_lite0); input 128x128 px; 500 training steps; metrics in percent, "
        "mean \u00b1 sd over seeds where a row has several"
    )


def test_bold_marks_every_cell_that_shows_the_column_best(tmp_path: Path) -> None:
    # 0.9381 and 0.9379 both read 93.8 at one decimal: both are the best a reader sees.
    summary = summarise(runs_of(a=[0.9381], b=[0.9379], c=[0.9]), ["a", "b", "c"])
    table = ablation_table(summary, {"a": "A", "b": "B", "c": "C"})
    write_table(table, tmp_path / "ablation", "Ablations", 1, bold_best=True)
    rows = md_cells(tmp_path / "ablation.md")
    assert [row[3] for row in rows] == ["**93.8**", "**93.8**", "90.0"]  # variant, label, seeds
    tex = (tmp_path / "ablation.tex").read_text()
    assert tex.count(r"\textbf{93.8}") == 2 * len(METRICS)


def test_reference_csv_holds_the_numbers_of_the_paper_notes(reference: pd.DataFrame) -> None:
    rows = {(r.dataset, r.method): r for r in reference.itertuples()}
    for key, published in NOTES.items():
        expected = [float(x) for x in published.split("/")]
        assert [getattr(rows[key], m) for m in PUBLISHED_METRICS] == expected, key
        assert rows[key].source == "ADer re-runs, as listed in MDD-Net notes"
    for dataset in ("MVTec AD", "VisA"):
        mdd = rows[(dataset, "MDD-Net")]
        assert all(math.isnan(getattr(mdd, m)) for m in PUBLISHED_METRICS)
        assert mdd.source.startswith("not available")
    assert len(reference) == len(NOTES) + 2


def test_paper_vs_reproduced_marks_mddnet_unavailable_and_offline_rows_not_comparable(
    reference: pd.DataFrame, tmp_path: Path
) -> None:
    summary = summarise(runs_of(mddnet=[0.94, 0.96]), ["mddnet"])
    labels = {"mddnet": "MDD-Net (this repository)"}
    table = paper_vs_reproduced(reference, summary, labels, "MVTec AD", "generated", False)
    assert list(table.index) == [
        "RD",
        "RD++",
        "MambaAD",
        "Dinomaly ViT-B",
        "MDD-Net",
        "MDD-Net (this repository)",
    ]
    assert table.loc["RD", "image_auroc"] == 0.936  # published percent -> fraction, exactly
    assert table.loc["Dinomaly ViT-B", "pixel_ap"] == 0.693
    assert table.loc["MDD-Net", "note"] == "not available"
    assert table.loc["MDD-Net", list(PUBLISHED_METRICS)].isna().all()
    ours_row = table.loc["MDD-Net (this repository)"]
    assert ours_row["note"] == "not comparable: different data"
    assert ours_row["dataset"] == "generated" and ours_row["source"] == "this repository"
    assert ours_row["pixel_aupro"] == pytest.approx(0.95)  # the mean over the seeds
    assert "mad" not in table.columns  # the published tables have no mAD

    write_table(table, tmp_path / "pvr", "Published vs reproduced", 1)
    rows = {row[0]: row for row in md_cells(tmp_path / "pvr.md")}
    assert rows["MDD-Net"][2:9] == ["n/a"] * 7 and rows["MDD-Net"][-1] == "not available"
    assert rows["RD"][2:9] == NOTES[("MVTec AD", "RD")].split("/")
    ours_cells = rows["MDD-Net (this repository)"]
    assert ours_cells[2:9] == ["95.0"] * 7
    assert ours_cells[-1] == "not comparable: different data"


def test_paper_vs_reproduced_on_the_same_dataset_has_no_note(reference: pd.DataFrame) -> None:
    summary = summarise(runs_of(mddnet=[0.9]), ["mddnet"])
    table = paper_vs_reproduced(reference, summary, {"mddnet": "ours"}, "VisA", "visa", True)
    assert list(table.index) == ["RD", "RD++", "Dinomaly ViT-B", "MDD-Net", "ours"]
    assert table.loc["ours", "note"] == ""


def test_paper_vs_reproduced_refuses_comparable_rows_from_other_data(
    reference: pd.DataFrame,
) -> None:
    summary = summarise(runs_of(mddnet=[0.9]), ["mddnet"])
    ours = {"mddnet": "ours"}
    with pytest.raises(ValueError, match="measured on 'generated'.*comparable=False"):
        paper_vs_reproduced(reference, summary, ours, "MVTec AD", "generated", True)
    with pytest.raises(ValueError, match="no rows for dataset 'BTAD'.*MVTec AD, VisA"):
        paper_vs_reproduced(reference, summary, ours, "BTAD", "generated", False)
    with pytest.raises(ValueError, match="'RD' is already a published method"):
        paper_vs_reproduced(reference, summary, {"mddnet": "RD"}, "MVTec AD", "generated", False)


def test_load_reference_explains_missing_files_columns_and_text(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="report.reference"):
        load_reference(tmp_path / "absent.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("dataset,method,image_auroc\nVisA,RD,90.6\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column 'image_ap'"):
        load_reference(bad)
    text = tmp_path / "text.csv"
    columns = ["dataset", "method", *PUBLISHED_METRICS, "source"]
    row = ["VisA", "RD", "high", *["1"] * 6, "x"]
    text.write_text(",".join(columns) + "\n" + ",".join(row) + "\n")
    with pytest.raises(ValueError, match="'image_auroc' holds non-numbers"):
        load_reference(text)


def _write_runs(folder: Path, runs: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in runs.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    return folder


def test_load_runs_keys_by_file_stem_and_explains_bad_files(tmp_path: Path) -> None:
    folder = _write_runs(tmp_path / "ok", runs_of(mddnet=[0.9, 0.8]))
    loaded = load_runs(folder)
    assert list(loaded) == ["mddnet-s0", "mddnet-s1"]
    assert loaded["mddnet-s1"]["mean"]["image_auroc"] == 0.8

    with pytest.raises(FileNotFoundError, match="empty: no metrics files"):
        load_runs(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.json").write_text("{")
    with pytest.raises(ValueError, match="x.json: not valid JSON"):
        load_runs(broken)
    (broken / "x.json").write_text(json.dumps({"per_class": {}}))
    with pytest.raises(ValueError, match="x.json: missing 'mean'"):
        load_runs(broken)
    data = metrics_file(0.8)
    del data["mean"]["pixel_ap"]
    (broken / "x.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"x.json: mean lacks metric 'pixel_ap'"):
        load_runs(broken)


ONLY_TWO = {
    "report": {
        "main_variant": "mddnet",
        "chain": ["rd_baseline", "mddnet"],
        "ablation": ["rd_baseline", "mddnet"],
        "scoring": ["score_tr", "score_fused"],
        "reproduced": ["mddnet"],
    },
    "figures": {"compare": ["rd_baseline", "mddnet"]},
}


def test_the_table_stages_write_every_table_from_a_metrics_folder(
    params_path: Path, repo: Path, tmp_path: Path
) -> None:
    params = load_params(params_path, ONLY_TWO)
    config = params.config()
    runs = runs_of(rd_baseline=[0.7, 0.72, 0.71], mddnet=[0.9, 0.92, 0.91])
    runs |= runs_of(score_tr=[0.85], score_fused=[0.91])
    runs[REFERENCE_RUN] = metrics_file(0.6, variant="reference")
    metrics = _write_runs(tmp_path / "metrics", runs)
    main = main_results(
        config,
        params,
        metrics,
        tmp_path / "tables",
        tmp_path / "summary",
        repo / config.report.reference,
    )
    ablation = ablation_results(config, params, metrics, tmp_path / "tables")
    for table in (*main, *ablation):
        assert all(path.is_file() for path in table)
    assert sorted(p.stem for p in (tmp_path / "summary").iterdir()) == sorted(
        ["rd_baseline", "mddnet", "score_tr", "score_fused"]
    )
    shown = {row[0]: row for row in md_cells(ablation.ablation.markdown)}
    assert list(shown) == ["rd_baseline", "mddnet", REFERENCE_RUN]
    assert shown["mddnet"][3].startswith("**91.0 \u00b1 1.0**")  # 3 seeds: mean ± sd, best
    assert shown["mddnet"][3].endswith(UP)  # beyond the seed spread of the RD baseline
    main_rows = {row[0]: row for row in md_cells(main.main.markdown)}
    assert list(main_rows) == ["brick", "gear", "mean"]


def test_every_metric_has_a_table_header() -> None:
    from mddnet.metrics import METRIC_NAMES
    from mddnet.report import HEADERS

    assert tuple(HEADERS) == METRIC_NAMES
