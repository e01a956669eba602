"""The command line a user without notebooks runs: train, evaluate, predict, diagnose."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from mddnet.checkpoint import load_trained_model
from mddnet.cli import main
from mddnet.io import CheckpointError, load_checkpoint, save_checkpoint
from mddnet.metrics import METRIC_NAMES
from mddnet.predict import CSV_COLUMNS, predict_images

pytestmark = pytest.mark.slow


@pytest.fixture
def images(tiny_root: Path, tmp_path: Path) -> Path:
    """A user's folder: two washer test images, one nested brick image and one broken file."""
    folder = tmp_path / "mine"
    (folder / "nested").mkdir(parents=True)
    washers = sorted((tiny_root / "washer" / "test").rglob("*.png"))[:2]
    shutil.copy(washers[0], folder / "a.png")
    shutil.copy(washers[1], folder / "b.png")
    shutil.copy(
        next((tiny_root / "brick" / "test" / "good").glob("*.png")), folder / "nested" / "a.png"
    )
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def test_predict_scores_the_readable_images_and_lists_the_broken(
    tiny_checkpoint, images, tmp_path
) -> None:
    run = predict_images(tiny_checkpoint, [images], tmp_path / "out", progress=False)
    assert [Path(r["image"]).name for r in run.rows] == ["a.png", "b.png", "a.png"]
    assert [p.name for p, _ in run.failures] == ["broken.png"]
    assert "broken.png" in run.failures[0][1]
    with run.scores_csv.open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert CSV_COLUMNS[:4] == ("image", "verdict", "score", "threshold")
    assert len(rows) == 3
    assert {r["class_source"] for r in rows} == {"predicted by the memory"}
    calibration = load_trained_model(tiny_checkpoint).calibration
    names = load_trained_model(tiny_checkpoint).class_names
    for row in rows:
        # the verdict compares the calibrated score with its class's held-out threshold
        score, threshold = float(row["score"]), float(row["threshold"])
        assert row["verdict"] == ("anomalous" if score > threshold else "normal")
        assert threshold == pytest.approx(calibration.thresholds[names.index(row["class"])])
        assert row["threshold_source"] == (
            f"highest score of the 6 held-out normal training images ({row['class']}: its own)"
        )
        assert Path(row["overlay"]).parent == tmp_path / "out" / "overlays"
    overlays = sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir())
    assert overlays == ["a.png", "a_1.png", "b.png"]  # same stems do not overwrite each other
    overlay = (tmp_path / "out" / "overlays" / "a.png").read_bytes()
    assert overlay[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_with_a_given_class_reads_that_class(tiny_checkpoint, images, tmp_path) -> None:
    run = predict_images(
        tiny_checkpoint, [images / "a.png"], tmp_path, class_name="washer", progress=False
    )
    assert run.rows[0]["class"] == "washer" and run.rows[0]["class_source"] == "given"
    assert run.rows[0]["verdict"] in ("anomalous", "normal")
    with pytest.raises(
        ValueError, match=r"--class 'bolt': the checkpoint knows the classes brick"
    ):
        predict_images(tiny_checkpoint, [images / "a.png"], tmp_path, class_name="bolt")


def test_predict_cli_exit_status_and_errors(tiny_checkpoint, images, tmp_path, capsys) -> None:
    assert main(["predict", str(tiny_checkpoint), str(images), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "1 unreadable images were skipped" in err and "broken.png" in err
    assert main(["predict", str(tmp_path / "none.pt"), str(images), "--out", str(tmp_path)]) == 2
    assert "none.pt: checkpoint not found" in capsys.readouterr().err
    assert main(["predict", str(tiny_checkpoint), str(tmp_path / "nothing"), "--out", "x"]) == 2
    assert "nothing: no such file or folder" in capsys.readouterr().err


def test_train_and_evaluate_cli(tiny_params, tmp_path, capsys) -> None:
    params = tiny_params
    ckpt = tmp_path / "rd.pt"
    assert (
        main(["train", "--params", str(params), "--variant", "rd_baseline", "--out", str(ckpt)])
        == 0
    )
    trained = load_checkpoint(ckpt)
    assert trained["complete"] is True and trained["calibration"]["images"] > 0  # calibrated
    # calibrating again with other settings writes a new calibration beside it, weights unchanged
    again = tmp_path / "again.pt"
    code = main(["calibrate", str(ckpt), "--params", str(params), "--variant", "rd_baseline"]
                + ["--out", str(again)])  # fmt: skip
    assert code == 0 and "held-out normals" in capsys.readouterr().out
    recalibrated = load_checkpoint(again)
    assert recalibrated["calibration"] == trained["calibration"]  # the same settings, the same
    assert recalibrated["state_dict"].keys() == trained["state_dict"].keys()
    metrics = tmp_path / "m.json"
    code = main(
        [
            "evaluate",
            "--params",
            str(params),
            "--variant",
            "rd_baseline",
            "--checkpoint",
            str(ckpt),
            "--metrics-out",
            str(metrics),
        ]
    )
    assert code == 0
    data = json.loads(metrics.read_text())
    assert set(data["mean"]) == set(METRIC_NAMES) and data["variant"] == "rd_baseline"
    assert "mean" in capsys.readouterr().out
    # evaluating the rd_baseline checkpoint as the full model is refused, not silently wrong
    code = main(
        [
            "evaluate",
            "--params",
            str(params),
            "--variant",
            "mddnet",
            "--checkpoint",
            str(ckpt),
            "--metrics-out",
            str(tmp_path / "x.json"),
        ]
    )
    assert code == 2
    assert "rd.pt: trained with model =" in capsys.readouterr().err


def test_a_checkpoint_from_another_backbone_is_explained(tiny_checkpoint, tmp_path) -> None:
    data = load_checkpoint(tiny_checkpoint)
    data["config"]["model"]["backbone"] = "efficientnet_lite0"  # same shapes, other padding
    data["config"]["model"]["stages"] = [1, 2]
    data["config"]["calibration"]["scale_weights"] = [[1.0, 1.0]]  # one weight per scale
    other = tmp_path / "other.pt"
    save_checkpoint(other, data)
    with pytest.raises(ValueError, match=r"other.pt: weights do not fit the model its config"):
        load_trained_model(other)


def test_an_unfinished_checkpoint_is_refused(tiny_checkpoint, tmp_path) -> None:
    data = load_checkpoint(tiny_checkpoint)
    data["complete"] = False
    partial = tmp_path / "partial.pt"
    save_checkpoint(partial, data)
    with pytest.raises(ValueError, match="partial.pt: training did not finish"):
        load_trained_model(partial)
    torch.save({"format": 1}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare.pt: checkpoint lacks 'state_dict'"):
        load_checkpoint(tmp_path / "bare.pt")


def test_validate_cli_repeats_the_stored_calibration_on_one_copy_and_writes_nothing(
    tiny_checkpoint, tiny_params, tmp_path, capsys
) -> None:
    before = tiny_checkpoint.read_bytes()
    stored = load_trained_model(tiny_checkpoint).calibration.candidates
    scores = {}
    for copies in (1, 2):
        out = tmp_path / f"candidates-{copies}.csv"
        args = ["validate", str(tiny_checkpoint), "--params", str(tiny_params)]
        assert main([*args, "--copies", str(copies), "--out", str(out)]) == 0
        assert f"with {copies} pair(s) of synthetic anomalies each; nothing written" in (
            capsys.readouterr().out
        )
        with out.open() as handle:
            scores[copies] = [float(row["score"]) for row in csv.DictReader(handle)]
    assert scores[1] == [round(100 * c["score"], 2) for c in stored]
    assert len(scores[2]) == len(stored) and scores[2] != scores[1]
    assert tiny_checkpoint.read_bytes() == before


def test_diagnose_cli_prints_and_writes_one_row_per_class(
    tiny_checkpoint, tiny_params, tmp_path, capsys
) -> None:
    out = tmp_path / "diagnosis.csv"
    args = ["diagnose", str(tiny_checkpoint), "--params", str(tiny_params), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(r["class"] for r in rows) == load_trained_model(tiny_checkpoint).class_names
    assert all(r["class"] in printed for r in rows)
    # the checkpoint held out 2 of each class's 6 training normals (HOLDOUT)
    assert {r["held_out_normals"] for r in rows} == {"2"}
    assert all(0.0 <= float(r["gate_normal"]) <= 1.0 for r in rows)
    assert all(-1.0 <= float(r["r_normals"]) <= 1.0 for r in rows)
    assert main(["diagnose", str(tmp_path / "none.pt"), "--params", str(tiny_params)]) == 2
    assert "none.pt: checkpoint not found" in capsys.readouterr().err
