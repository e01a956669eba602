"""Tables: rows and order, percent rounding, full-precision CSV, booktabs LaTeX, published rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from mddnet.config import Variant
from mddnet.report import (
    METRICS,
    PUBLISHED_METRICS,
    ablation_table,
    caption,
    load_metrics,
    load_reference,
    main_table,
    paper_vs_reproduced,
    variant_labels,
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


def metrics_file(level: float, dataset: str = "generated", variant: str = "mddnet") -> dict:
    """A metrics dict as evaluate writes it: two classes and their (hand-made) mean."""
    return {
        "dataset": dataset,
        "variant": variant,
        "label": variant,
        "mean": {m: level for m in METRICS},
        "per_class": {
            "brick": {m: level - 0.1 for m in METRICS},
            "gear": {m: level + 0.1 for m in METRICS},
        },
    }


def md_cells(path: Path) -> list[list[str]]:
    """The body rows of a Markdown pipe table, as stripped cell texts."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.fixture
def reference(repo: Path) -> pd.DataFrame:
    return load_reference(repo / "references" / "published_results.csv")


def test_main_table_lists_classes_in_file_order_then_the_files_mean() -> None:
    metrics = metrics_file(0.8)
    metrics["per_class"]["brick"]["pixel_aupro"] = 0.123456789
    table = main_table(metrics)
    assert list(table.index) == ["brick", "gear", "mean"]
    assert table.index.name == "class"
    assert list(table.columns) == list(METRICS)
    assert table.loc["brick", "pixel_aupro"] == 0.123456789
    assert table.loc["gear", "image_auroc"] == pytest.approx(0.9)
    assert (table.loc["mean"] == 0.8).all()


def test_main_table_names_the_class_that_lacks_a_metric() -> None:
    metrics = metrics_file(0.8)
    del metrics["per_class"]["gear"]["mad"]
    with pytest.raises(ValueError, match=r"per_class\['gear'\] lacks metric 'mad'"):
        main_table(metrics)


def test_write_table_writes_exactly_csv_md_and_tex(tmp_path: Path) -> None:
    written = write_table(main_table(metrics_file(0.8)), tmp_path / "main", "Main results", 1)
    assert written == [tmp_path / f"main.{ext}" for ext in ("csv", "md", "tex")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["main.csv", "main.md", "main.tex"]


def test_markdown_shows_percent_rounded_to_the_decimals(tmp_path: Path) -> None:
    frame = pd.DataFrame({m: [0.98765] for m in METRICS}, index=pd.Index(["mean"], name="class"))
    write_table(frame, tmp_path / "one", "A caption.", decimals=1)
    write_table(frame, tmp_path / "none", "A caption.", decimals=0)
    lines = (tmp_path / "one.md").read_text().splitlines()
    assert lines[0] == "A caption."
    assert " ".join(lines[2].split()) == f"| class | {HEADER_ROW} |"
    assert md_cells(tmp_path / "one.md") == [["mean"] + ["98.8"] * len(METRICS)]
    assert md_cells(tmp_path / "none.md") == [["mean"] + ["99"] * len(METRICS)]


def test_csv_keeps_fractions_at_full_precision(tmp_path: Path) -> None:
    metrics = metrics_file(0.8)
    metrics["per_class"]["brick"]["image_ap"] = 0.987654321012345
    metrics["mean"]["mad"] = 1 / 3
    table = main_table(metrics)
    write_table(table, tmp_path / "main", "Main results", 1)
    back = pd.read_csv(tmp_path / "main.csv", index_col="class")
    pd.testing.assert_frame_equal(back, table, check_exact=True)
    assert back.loc["mean", "mad"] == 1 / 3


def test_latex_is_booktabs_with_the_escaped_caption(tmp_path: Path) -> None:
    text = caption("mvtec_ad", "wide_resnet50_2", "timm", 256, "Main results")
    write_table(main_table(metrics_file(0.8)), tmp_path / "main", text, 1)
    tex = (tmp_path / "main.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    assert r"\caption{Main results. Dataset: mvtec\_ad; teacher: wide\_resnet50\_2" in tex
    assert r"\label{tab:main}" in tex
    assert r"brick & 70.0 & 70.0" in tex
    assert r"mean & 80.0 & 80.0" in tex
    assert "I-AUROC & I-AP & I-F1max & P-AUROC & P-AP & P-F1max & AUPRO & mAD" in tex


def test_caption_names_dataset_backbone_weights_and_image_size() -> None:
    text = caption("VisA", "wide_resnet50_2", "wide_resnet50_2.tv_in1k", 256, "Ablations")
    assert text == (
        "Ablations. Dataset: VisA; teacher: wide_resnet50_2 (weights: wide_resnet50_2.tv_in1k); "
        "input 256x256 px; metrics in percent."
    )


def test_bold_marks_every_cell_that_shows_the_column_best(tmp_path: Path) -> None:
    # 0.9381 and 0.9379 both read 93.8 at one decimal: both are the best a reader sees.
    values = {"a": 0.9381, "b": 0.9379, "c": 0.9}
    metrics = {v: {"mean": {m: x for m in METRICS}} for v, x in values.items()}
    table = ablation_table(metrics, {"a": "A", "b": "B", "c": "C"})
    write_table(table, tmp_path / "ablation", "Ablations", 1, bold_best=True)
    rows = md_cells(tmp_path / "ablation.md")
    assert [row[2] for row in rows] == ["**93.8**", "**93.8**", "90.0"]
    tex = (tmp_path / "ablation.tex").read_text()
    assert tex.count(r"\textbf{93.8}") == 2 * len(METRICS)


def test_ablation_table_follows_the_order_of_labels_which_selects_the_rows() -> None:
    metrics = {
        "rd_baseline": metrics_file(0.7),
        "mddnet": metrics_file(0.9),
        "score_tr": metrics_file(0.5),
    }
    labels = {"rd_baseline": "RD", "mddnet": "+ memory (MDD-Net)"}
    table = ablation_table(metrics, labels)
    assert list(table.index) == ["rd_baseline", "mddnet"]
    assert table.index.name == "variant"
    assert list(table.columns) == ["label", *METRICS]
    assert list(table["label"]) == ["RD", "+ memory (MDD-Net)"]
    assert list(table["image_auroc"]) == [0.7, 0.9]


def test_ablation_table_names_the_variant_without_metrics() -> None:
    with pytest.raises(ValueError, match=r"'drd_net'.*dvc repro evaluate@drd_net"):
        ablation_table({"mddnet": metrics_file(0.9)}, {"mddnet": "M", "drd_net": "D"})


def test_variant_labels_keep_the_requested_order_and_reject_unknown_names() -> None:
    variants = {
        "rd_baseline": Variant(label="RD", override={}, checkpoint=None),
        "mddnet": Variant(label="MDD-Net", override={}, checkpoint=None),
    }
    assert variant_labels(variants, ["mddnet", "rd_baseline"]) == {
        "mddnet": "MDD-Net",
        "rd_baseline": "RD",
    }
    with pytest.raises(ValueError, match="unknown variant 'drd'"):
        variant_labels(variants, ["drd"])


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
    ours = metrics_file(0.95)
    table = paper_vs_reproduced(reference, {"MDD-Net (this repository)": ours}, "MVTec AD", False)
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
    assert ours_row["pixel_aupro"] == 0.95
    assert "mad" not in table.columns  # the published tables have no mAD

    write_table(table, tmp_path / "pvr", "Published vs reproduced", 1)
    rows = {row[0]: row for row in md_cells(tmp_path / "pvr.md")}
    assert rows["MDD-Net"][2:9] == ["n/a"] * 7 and rows["MDD-Net"][-1] == "not available"
    assert rows["RD"][2:9] == NOTES[("MVTec AD", "RD")].split("/")
    ours_cells = rows["MDD-Net (this repository)"]
    assert ours_cells[2:9] == ["95.0"] * 7
    assert ours_cells[-1] == "not comparable: different data"


def test_paper_vs_reproduced_on_the_same_dataset_has_no_note(reference: pd.DataFrame) -> None:
    table = paper_vs_reproduced(
        reference, {"ours": metrics_file(0.9, dataset="visa")}, "VisA", comparable=True
    )
    assert list(table.index) == ["RD", "RD++", "Dinomaly ViT-B", "MDD-Net", "ours"]
    assert table.loc["ours", "note"] == ""


def test_paper_vs_reproduced_refuses_comparable_rows_from_other_data(
    reference: pd.DataFrame,
) -> None:
    with pytest.raises(ValueError, match="measured on 'generated'.*comparable=False"):
        paper_vs_reproduced(reference, {"ours": metrics_file(0.9)}, "MVTec AD", True)
    with pytest.raises(ValueError, match="no rows for dataset 'BTAD'.*MVTec AD, VisA"):
        paper_vs_reproduced(reference, {"ours": metrics_file(0.9)}, "BTAD", False)
    with pytest.raises(ValueError, match="'RD' is already a published method"):
        paper_vs_reproduced(reference, {"RD": metrics_file(0.9)}, "MVTec AD", False)


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


def test_load_metrics_keys_by_variant_and_explains_bad_files(tmp_path: Path) -> None:
    named = tmp_path / "a.json"
    named.write_text(json.dumps(metrics_file(0.9, variant="mddnet")))
    unnamed = tmp_path / "drd_net.json"
    data = metrics_file(0.8)
    del data["variant"]
    unnamed.write_text(json.dumps(data))
    loaded = load_metrics([named, unnamed])
    assert list(loaded) == ["mddnet", "drd_net"]
    assert loaded["drd_net"]["mean"]["image_auroc"] == 0.8

    with pytest.raises(FileNotFoundError, match="absent.json: metrics not found"):
        load_metrics([tmp_path / "absent.json"])
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_metrics([broken])
    no_mean = tmp_path / "no_mean.json"
    no_mean.write_text(json.dumps({"per_class": {}}))
    with pytest.raises(ValueError, match="no_mean.json: missing 'mean'"):
        load_metrics([no_mean])
    short = tmp_path / "short.json"
    data = metrics_file(0.8)
    del data["per_class"]["brick"]["pixel_ap"]
    short.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"short.json: per_class\['brick'\] lacks metric 'pixel_ap'"
    ):
        load_metrics([short])
    with pytest.raises(ValueError, match="'mddnet' is already loaded"):
        load_metrics([named, named])


def test_every_metric_has_a_table_header() -> None:
    from mddnet.metrics import METRIC_NAMES
    from mddnet.report import HEADERS

    assert tuple(HEADERS) == METRIC_NAMES
