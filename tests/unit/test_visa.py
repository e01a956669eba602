"""VisA conversion: layout, lossless images, 0/255 masks, csv errors, atomicity, CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mddnet.cli import main
from mddnet.data import visa
from mddnet.data.layout import DatasetError, scan_dataset, validate_dataset
from mddnet.data.visa import convert_visa

OBJECTS = ("candle", "pcb1")
SIZE = (10, 8)  # (width, height)
COUNTS = {"train_good": 3, "test_good": 1, "test_bad": 2}


def _labels(seed: int) -> np.ndarray:
    """A VisA-style mask: small instance labels 1 and 2 on a zero background, (H, W) uint8."""
    labels = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
    labels[1:3, 2 : 4 + seed] = 1
    labels[6, 7] = 2
    return labels


def _write_csv(src: Path, rows: list[dict[str, str]]) -> None:
    path = src / "split_csv" / "1cls.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)


def _fake_visa(src: Path) -> None:
    """Two objects: 4 normal JPGs (3 train, 1 test) and 2 anomalous JPGs with label masks."""
    rng = np.random.default_rng(0)
    rows = []
    for obj in OBJECTS:
        for i in range(6):
            normal = i < 4
            kind = "Normal" if normal else "Anomaly"
            name = f"{i:04d}" if normal else f"{i - 4:03d}"
            image = f"{obj}/Data/Images/{kind}/{name}.JPG"
            (src / image).parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / image, "JPEG")
            mask = ""
            if not normal:
                mask = f"{obj}/Data/Masks/Anomaly/{name}.png"
                (src / mask).parent.mkdir(parents=True, exist_ok=True)
                labels = Image.fromarray(_labels(i - 4))
                if obj == "pcb1":  # palette masks: labels are the palette indices
                    labels = labels.convert("P")
                labels.save(src / mask)
            split = "train" if i < 3 else "test"
            label = "normal" if normal else "anomaly"
            rows.append(dict(object=obj, split=split, label=label, image=image, mask=mask))
    _write_csv(src, rows)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    _fake_visa(tmp_path / "visa")
    return tmp_path / "visa"


def _convert_error(src: Path, dst: Path) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        convert_visa(src, dst)
    assert not dst.exists()
    return info.value


def test_conversion_writes_the_mvtec_layout(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    assert convert_visa(src, dst) == {obj: COUNTS for obj in OBJECTS}
    files = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    expected = []
    for obj in OBJECTS:
        expected += [
            f"{obj}/ground_truth/bad/000_mask.png",
            f"{obj}/ground_truth/bad/001_mask.png",
            f"{obj}/test/bad/000.JPG",
            f"{obj}/test/bad/001.JPG",
            f"{obj}/test/good/0003.JPG",
            f"{obj}/train/good/0000.JPG",
            f"{obj}/train/good/0001.JPG",
            f"{obj}/train/good/0002.JPG",
        ]
    assert files == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "visa"]  # no staging left


def test_images_are_copied_byte_for_byte(src: Path, tmp_path: Path) -> None:
    convert_visa(src, tmp_path / "out")
    for obj in OBJECTS:
        for name in ("0000", "0003"):
            original = src / obj / "Data" / "Images" / "Normal" / f"{name}.JPG"
            split = "train" if name == "0000" else "test"
            copy = tmp_path / "out" / obj / split / "good" / f"{name}.JPG"
            assert copy.read_bytes() == original.read_bytes()


def test_label_masks_become_0_255_with_every_label_defective(src: Path, tmp_path: Path) -> None:
    convert_visa(src, tmp_path / "out")
    for obj in OBJECTS:
        for i in range(2):
            mask = Image.open(tmp_path / "out" / obj / "ground_truth" / "bad" / f"00{i}_mask.png")
            assert mask.mode == "L"
            expected = np.where(_labels(i) > 0, 255, 0)
            np.testing.assert_array_equal(np.asarray(mask), expected)
            assert np.count_nonzero(expected) == 2 * (2 + i) + 1  # both labels kept


def test_converted_tree_reads_back_with_scan_dataset(src: Path, tmp_path: Path) -> None:
    convert_visa(src, tmp_path / "out")
    samples = scan_dataset(tmp_path / "out")
    assert len(samples) == 12
    defective = [s for s in samples if s.label == 1]
    assert [(s.class_name, s.defect_type, s.image_path.name) for s in defective] == [
        ("candle", "bad", "000.JPG"),
        ("candle", "bad", "001.JPG"),
        ("pcb1", "bad", "000.JPG"),
        ("pcb1", "bad", "001.JPG"),
    ]
    assert validate_dataset(samples) == []


def test_missing_csv_is_an_error_naming_it(tmp_path: Path) -> None:
    err = _convert_error(tmp_path, tmp_path / "out")
    assert str(err).startswith(f"{tmp_path / 'split_csv' / '1cls.csv'}: VisA split file not found")


def test_missing_column_is_an_error(src: Path, tmp_path: Path) -> None:
    csv_path = src / "split_csv" / "1cls.csv"
    csv_path.write_text("object,split,label,image\ncandle,train,normal,x.JPG\n")
    assert "missing column(s) mask" in str(_convert_error(src, tmp_path / "out"))


def test_every_missing_file_listed_in_the_csv_is_reported(src: Path, tmp_path: Path) -> None:
    image = src / "candle" / "Data" / "Images" / "Normal" / "0001.JPG"
    mask = src / "pcb1" / "Data" / "Masks" / "Anomaly" / "001.png"
    image.unlink()
    mask.unlink()
    err = _convert_error(src, tmp_path / "out")
    csv_path = src / "split_csv" / "1cls.csv"
    assert err.problems == [
        f"{csv_path}:3: image {image} not found; re-extract the VisA release",
        f"{csv_path}:13: mask {mask} not found; re-extract the VisA release",
    ]


@pytest.mark.parametrize(
    ("line", "change", "message"),
    [
        (2, {"split": "val"}, "unknown split 'val' (expected train or test)"),
        (2, {"label": "bad"}, "unknown label 'bad' (expected normal or anomaly)"),
        (2, {"label": "anomaly"}, "an anomaly in the train split"),
        (6, {"mask": ""}, "anomaly without a mask path"),
        (2, {"object": "../evil"}, "object '../evil' is not a plain folder name"),
        (3, {"image": "candle/Data/Images/Normal/0000.JPG"}, "duplicate of line 2"),
    ],
)
def test_bad_csv_rows_are_errors_naming_the_line(
    src: Path, tmp_path: Path, line: int, change: dict[str, str], message: str
) -> None:
    with (src / "split_csv" / "1cls.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[line - 2].update(change)
    _write_csv(src, rows)
    (problem,) = _convert_error(src, tmp_path / "out").problems
    assert problem.startswith(f"{src / 'split_csv' / '1cls.csv'}:{line}: {message}")


def test_non_empty_output_folder_is_refused(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="already exists and is not empty"):
        convert_visa(src, dst)
    assert [p.name for p in dst.iterdir()] == ["old.txt"]


def test_empty_output_folder_is_filled(src: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert convert_visa(src, tmp_path / "out") == {obj: COUNTS for obj in OBJECTS}


def test_interrupted_conversion_leaves_no_tree(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def interrupt(*args: object) -> None:
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(visa, "_write_binary_mask", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_visa(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["visa"]


def test_leftover_of_a_killed_conversion_is_replaced(src: Path, tmp_path: Path) -> None:
    leftover = tmp_path / ".out.partial" / "candle" / "train" / "good"
    leftover.mkdir(parents=True)
    (leftover / "half.JPG").write_bytes(b"\xff\xd8")
    convert_visa(src, tmp_path / "out")
    assert not (tmp_path / ".out.partial").exists()
    assert not (tmp_path / "out" / "candle" / "train" / "good" / "half.JPG").exists()


def test_convert_visa_cli_prints_the_converted_dataset(src: Path, tmp_path: Path, capsys) -> None:
    dst = tmp_path / "out"
    assert main(["convert-visa", str(src), str(dst)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [
        ["candle", "3", "1", "2", "bad", "10x8"],
        ["pcb1", "3", "1", "2", "bad", "10x8"],
    ]
    assert main(["check-dataset", str(dst)]) == 0


def test_convert_visa_cli_error_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["convert-visa", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "VisA split file not found" in capsys.readouterr().err
