"""MVTec-layout reader: samples, every error case, image and mask decoding, check-dataset CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mddnet.cli import main
from mddnet.data.layout import (
    DatasetError,
    Sample,
    list_classes,
    load_image,
    load_mask,
    scan_dataset,
    split_holdout,
    summarize,
    validate_dataset,
)

SIZE = (12, 8)  # (width, height) of the generated images


def _save(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path)
    return path


def _rgb(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _square_mask(size: tuple[int, int] = SIZE) -> np.ndarray:
    width, height = size
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: height // 2, : width // 2] = 255
    return mask


def _make_class(
    root: Path,
    name: str,
    train: int = 3,
    good: int = 2,
    defects: dict[str, int] | None = None,
    size: tuple[int, int] = SIZE,
) -> Path:
    """A class folder in MVTec layout with random images and square masks."""
    defects = {"crack": 2} if defects is None else defects
    class_dir = root / name
    for i in range(train):
        _save(class_dir / "train" / "good" / f"{i:03d}.png", _rgb(i, size))
    for i in range(good):
        _save(class_dir / "test" / "good" / f"{i:03d}.png", _rgb(100 + i, size))
    for defect, count in defects.items():
        for i in range(count):
            _save(class_dir / "test" / defect / f"{i:03d}.png", _rgb(200 + i, size))
            _save(class_dir / "ground_truth" / defect / f"{i:03d}_mask.png", _square_mask(size))
    return class_dir


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _make_class(root, "bottle", defects={"crack": 2, "scratch": 1})
    _make_class(root, "wood", train=2, good=1, defects={"hole": 1}, size=(16, 16))
    return root


def _error(root: Path, *classes: str) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        scan_dataset(root, classes)
    return info.value


# --- scanning ---------------------------------------------------------------------------------


def test_scan_returns_typed_samples_sorted_with_their_masks(root: Path) -> None:
    samples = scan_dataset(root, ["bottle"])
    cls = root / "bottle"
    assert all(isinstance(s, Sample) and s.class_name == "bottle" for s in samples)
    rows = [
        (
            s.split,
            s.label,
            s.defect_type,
            s.image_path.relative_to(cls).as_posix(),
            s.mask_path.relative_to(cls).as_posix() if s.mask_path else None,
        )
        for s in samples
    ]
    assert rows == [
        ("test", 1, "crack", "test/crack/000.png", "ground_truth/crack/000_mask.png"),
        ("test", 1, "crack", "test/crack/001.png", "ground_truth/crack/001_mask.png"),
        ("test", 0, "good", "test/good/000.png", None),
        ("test", 0, "good", "test/good/001.png", None),
        ("test", 1, "scratch", "test/scratch/000.png", "ground_truth/scratch/000_mask.png"),
        ("train", 0, "good", "train/good/000.png", None),
        ("train", 0, "good", "train/good/001.png", None),
        ("train", 0, "good", "train/good/002.png", None),
    ]


def test_all_classes_are_read_when_none_are_named(root: Path) -> None:
    assert list_classes(root) == ["bottle", "wood"]
    samples = scan_dataset(root)
    assert [s.class_name for s in samples] == ["bottle"] * 8 + ["wood"] * 4


def test_unknown_class_is_an_error_listing_the_available_ones(root: Path) -> None:
    err = _error(root, "bottle", "cable")
    assert "'cable'" in str(err) and "available: bottle, wood" in str(err)


def test_missing_root_is_an_error_naming_it(tmp_path: Path) -> None:
    err = _error(tmp_path / "nowhere")
    assert f"{tmp_path / 'nowhere'}: dataset root not found" in str(err)


def test_root_without_class_folders_is_an_error(tmp_path: Path) -> None:
    assert "no class folders" in str(_error(tmp_path))


def test_a_class_folder_passed_as_root_points_to_its_parent(root: Path) -> None:
    err = _error(root / "bottle")
    assert "looks like a single class folder" in str(err) and f"pass its parent {root}" in str(err)


# --- several roots read as one dataset -----------------------------------------------------------


@pytest.fixture
def other_root(tmp_path: Path) -> Path:
    other = tmp_path / "other"
    _make_class(other, "cable", train=2, good=1, defects={"bent": 1})
    return other


def test_several_roots_are_read_as_one_dataset(root: Path, other_root: Path) -> None:
    samples = scan_dataset([root, other_root])
    assert [s.class_name for s in samples] == ["bottle"] * 8 + ["cable"] * 4 + ["wood"] * 4
    assert samples == sorted(
        scan_dataset(root) + scan_dataset(other_root),
        key=lambda s: (s.class_name, s.split, s.defect_type, s.image_path.name),
    )
    cable = [s for s in samples if s.class_name == "cable"]
    assert all(other_root in s.image_path.parents for s in cable)
    # classes may be picked from any root; a list of one root is that root
    picked = scan_dataset([str(root), other_root], ["wood", "cable"])
    assert sorted({s.class_name for s in picked}) == ["cable", "wood"]
    assert scan_dataset([root]) == scan_dataset(root)


def test_a_class_in_two_roots_is_refused(root: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin"
    _make_class(twin, "bottle")
    with pytest.raises(DatasetError) as err:
        scan_dataset([root, twin])
    assert str(err.value).startswith(f"class 'bottle' is in two dataset roots, {root} and {twin}")
    assert "rename a folder or drop a root" in str(err.value)


def test_an_unknown_class_over_several_roots_lists_them_all(root: Path, other_root) -> None:
    with pytest.raises(DatasetError) as err:
        scan_dataset([root, other_root], ["cable", "screw"])
    message = str(err.value)
    assert "no class folder 'screw'" in message
    assert "(available: bottle, cable, wood); fix data.classes" in message


# --- held-out normals ---------------------------------------------------------------------------


def _train_samples(tmp_path: Path, counts: dict[str, int]) -> list[Sample]:
    root = tmp_path / "holdout"
    for name, count in counts.items():
        _make_class(root, name, train=count, good=1, defects={})
    return [s for s in scan_dataset(root) if s.split == "train"]


def _names(samples: list[Sample]) -> list[str]:
    return [f"{s.class_name}/{s.image_path.stem}" for s in samples]


def test_split_holdout_keeps_a_fraction_of_each_class_out(tmp_path: Path) -> None:
    samples = _train_samples(tmp_path, {"alpha": 10, "beta": 5, "gamma": 1})
    kept, held = split_holdout(samples, 0.2)
    # ceil(0.2 x 10) = 2 of alpha, evenly spaced from the last name: 009 and 000; ceil(1.0) = 1
    # of beta, its last; gamma's only image is never held out
    assert _names(held) == ["alpha/000", "alpha/009", "beta/004"]
    assert len(kept) == 16 - 3 and not set(_names(kept)) & set(_names(held))
    assert "gamma/000" in _names(kept)
    # ceil(0.25 x 10) = 3: indices 9, 4.5 -> 4, 0
    _, held = split_holdout(samples, 0.25)
    assert [n for n in _names(held) if n.startswith("alpha")] == [
        "alpha/000",
        "alpha/004",
        "alpha/009",
    ]


def test_split_holdout_never_takes_a_class_whole_and_zero_takes_none(tmp_path: Path) -> None:
    samples = _train_samples(tmp_path, {"alpha": 2, "beta": 3})
    kept, held = split_holdout(samples, 0.9)
    # alpha: min(2 - 1, ceil(1.8)) = 1, its last; beta: min(3 - 1, ceil(2.7)) = 2, the ends
    assert _names(held) == ["alpha/001", "beta/000", "beta/002"]
    assert _names(kept) == ["alpha/000", "beta/001"]  # each class keeps one
    kept, held = split_holdout(samples, 0.0)
    assert held == [] and kept == samples
    kept, held = split_holdout(samples, 0.01)  # any fraction > 0 holds out one per class
    assert _names(held) == ["alpha/001", "beta/002"]


def test_split_holdout_is_the_same_for_every_call_and_input_order(tmp_path: Path) -> None:
    samples = _train_samples(tmp_path, {"alpha": 7, "beta": 4})
    first = split_holdout(samples, 0.3)
    shuffled = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
    assert split_holdout(shuffled, 0.3) == first == split_holdout(samples, 0.3)


def test_class_without_train_good_images_is_an_error_naming_the_folder(root: Path) -> None:
    for path in (root / "wood" / "train" / "good").iterdir():
        path.unlink()
    err = _error(root)
    assert str(err).startswith(f"{root / 'wood' / 'train' / 'good'}: no training images")


def test_empty_class_folder_is_an_error(root: Path) -> None:
    (root / "empty").mkdir()
    (root / "empty" / ".DS_Store").write_bytes(b"\0")  # hidden files do not count
    assert str(_error(root)).startswith(f"{root / 'empty'}: empty class folder")


def test_class_without_test_images_is_an_error(root: Path) -> None:
    for path in (root / "wood" / "test").rglob("*.png"):
        path.unlink()
    assert str(_error(root)).startswith(f"{root / 'wood' / 'test'}: no test images")


def test_defective_image_without_mask_is_an_error_naming_both_paths(root: Path) -> None:
    mask = root / "bottle" / "ground_truth" / "crack" / "001_mask.png"
    mask.unlink()
    err = _error(root)
    image = root / "bottle" / "test" / "crack" / "001.png"
    assert str(err) == (
        f"{image}: defective test image has no mask; expected {mask} "
        f"(single-channel PNG, 255 = defect, same size as the image)"
    )


def test_mask_of_another_size_is_an_error_naming_the_mask(root: Path) -> None:
    mask = _save(root / "wood" / "ground_truth" / "hole" / "000_mask.png", _square_mask((8, 8)))
    err = _error(root)
    assert str(err).startswith(f"{mask}: mask is 8x8 but its image is 16x16")


def test_scan_reports_every_structural_problem_at_once(root: Path) -> None:
    (root / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()
    (root / "wood" / "ground_truth" / "hole" / "000_mask.png").unlink()
    err = _error(root)
    assert len(err.problems) == 2
    assert str(err).startswith("2 problems:\n  - ")
    assert "crack/000.png" in err.problems[0] and "hole/000.png" in err.problems[1]


def test_class_names_with_spaces_and_unicode_work(tmp_path: Path) -> None:
    names = ["metal nut", "瓶子 café"]
    for name in names:
        _make_class(tmp_path, name)
    samples = scan_dataset(tmp_path, names)
    assert sorted({s.class_name for s in samples}) == sorted(names)
    assert len(samples) == 2 * 7
    assert validate_dataset(samples) == []


def test_non_image_files_are_skipped_with_a_warning_naming_them(root: Path, caplog) -> None:
    (root / "license.txt").write_text("dataset metadata beside the classes is not a class")
    skipped = [
        root / "bottle" / "readme.txt",
        root / "bottle" / "train" / "good" / ".DS_Store",
        root / "bottle" / "train" / "good" / "notes.txt",
        root / "bottle" / "test" / "good" / "._000.png",  # macOS resource fork
        root / "bottle" / "ground_truth" / "crack" / "099_mask.png",  # no image of that stem
    ]
    for path in skipped:
        path.write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="mddnet.data.layout"):
        samples = scan_dataset(root)
    assert len(samples) == 12  # unchanged
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for path in skipped:
        assert any(message.startswith(f"{path}: skipped: ") for message in warned), path
    assert len(warned) == len(skipped)


def test_image_extensions_are_matched_case_insensitively(tmp_path: Path) -> None:
    class_dir = _make_class(tmp_path, "mixed", train=1, good=0, defects={})
    _save(class_dir / "train" / "good" / "a.JPG", _rgb(1))
    _save(class_dir / "train" / "good" / "b.bmp", _rgb(2))
    _save(class_dir / "train" / "good" / "c.tiff", _rgb(3))
    _save(class_dir / "test" / "good" / "d.jpeg", _rgb(4))
    names = [s.image_path.name for s in scan_dataset(tmp_path)]
    assert names == ["d.jpeg", "000.png", "a.JPG", "b.bmp", "c.tiff"]


# --- decoding images --------------------------------------------------------------------------


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("name", "damage", "reason"),
    [
        ("truncated.png", _truncated, "image file is truncated"),
        ("truncated.jpg", _truncated, "image file is truncated"),
        ("empty.png", lambda p: p.write_bytes(b""), "empty file, 0 bytes"),
        ("text.png", lambda p: p.write_text("hello, I am text"), "cannot identify image file"),
    ],
)
def test_unreadable_image_is_an_error_naming_the_file(
    tmp_path: Path, name: str, damage, reason: str
) -> None:
    path = _save(tmp_path / name, _rgb(0, (64, 64)))
    damage(path)
    with pytest.raises(DatasetError) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: not a readable image (")
    assert reason in str(info.value)


def test_validate_collects_every_broken_file(root: Path) -> None:
    samples = scan_dataset(root)
    broken = [s.image_path for s in samples if s.split == "train"][:3]
    broken[0].write_bytes(b"")
    broken[1].write_text("text")
    _truncated(broken[2])
    mask = _save(samples[0].mask_path, _rgb(0))  # a colour mask
    problems = validate_dataset(samples)
    assert len(problems) == 4
    assert sorted(p.split(": ")[0] for p in problems) == sorted(map(str, [*broken, mask]))


def _roundtrip(tmp_path: Path, pixels: np.ndarray, mode: str | None, name: str) -> np.ndarray:
    return np.asarray(load_image(_save(tmp_path / name, pixels, mode)))


def test_grayscale_image_comes_back_rgb_with_equal_channels(tmp_path: Path) -> None:
    gray = np.array([[0, 7, 128, 255]], dtype=np.uint8)
    rgb = _roundtrip(tmp_path, gray, None, "gray.png")
    assert rgb.shape == (1, 4, 3)
    assert (rgb == gray[..., None]).all()


def test_16bit_image_is_scaled_not_clipped(tmp_path: Path) -> None:
    gray = np.array([[0, 255, 257 * 128, 65535]], dtype=np.uint16)
    rgb = _roundtrip(tmp_path, gray, None, "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 0, 128, 255]  # value // 256; PIL alone gives 255 for 255+


def test_rgba_and_palette_images_come_back_rgb(tmp_path: Path) -> None:
    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], dtype=np.uint8)
    assert _roundtrip(tmp_path, rgba, None, "alpha.png").tolist() == [[[10, 20, 30], [40, 50, 60]]]
    rgb = np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8)
    assert _roundtrip(tmp_path, rgb, "P", "palette.png").tolist() == rgb.tolist()
    assert _roundtrip(tmp_path, rgb, None, "lossless.tif").tolist() == rgb.tolist()


# --- masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[0, 255, 255, 0]], dtype=np.uint8), [False, True, True, False]),
        (np.array([[0, 1, 0, 1]], dtype=np.uint8), [False, True, False, True]),
        (np.array([[0, 0, 0, 0]], dtype=np.uint8), [False, False, False, False]),
        (np.array([[0, 65535, 0, 0]], dtype=np.uint16), [False, True, False, False]),
    ],
)
def test_two_level_masks_mark_non_zero_as_defective(
    tmp_path: Path, values: np.ndarray, expected: list[bool], caplog
) -> None:
    path = _save(tmp_path / "m.png", values)
    with caplog.at_level(logging.WARNING):
        mask = load_mask(path, (4, 1))
    assert mask.dtype == bool and mask[0].tolist() == expected
    assert caplog.records == []


def test_gray_mask_saved_as_rgb_is_accepted(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.png", _square_mask(), "RGB")
    assert (load_mask(path, SIZE) == (_square_mask() > 0)).all()


def test_antialiased_mask_is_thresholded_at_128_with_a_warning(tmp_path: Path, caplog) -> None:
    path = _save(tmp_path / "m.png", np.array([[0, 100, 127, 128, 200, 255]], dtype=np.uint8))
    with caplog.at_level(logging.WARNING):
        mask = load_mask(path, (6, 1))
    assert mask[0].tolist() == [False, False, False, True, True, True]
    (record,) = caplog.records
    assert record.getMessage().startswith(
        f"{path}: mask is not binary (6 distinct values, 4 pixels strictly between 0 and 255)"
    )


def test_label_valued_mask_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.png", np.array([[0, 1, 2, 0]], dtype=np.uint8))
    with pytest.raises(DatasetError, match="several small values") as info:
        load_mask(path, (4, 1))
    assert str(info.value).startswith(f"{path}: ")


def test_colour_mask_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.png", _rgb(0))
    with pytest.raises(DatasetError) as info:
        load_mask(path, SIZE)
    assert str(info.value).startswith(f"{path}: mask has colour")


def test_load_mask_refuses_a_size_other_than_the_image(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.png", _square_mask())
    with pytest.raises(DatasetError) as info:
        load_mask(path, (SIZE[0] + 1, SIZE[1]))
    assert str(info.value).startswith(f"{path}: mask is 12x8 but its image is 13x8")


# --- summary and CLI --------------------------------------------------------------------------


def test_summarize_counts_images_types_and_sizes(root: Path) -> None:
    _save(root / "wood" / "train" / "good" / "big.png", _rgb(0, (20, 10)))
    table = summarize(scan_dataset(root))
    assert table.to_dict("records") == [
        {
            "class": "bottle",
            "train_good": 3,
            "test_good": 2,
            "test_defective": 3,
            "defect_types": "crack, scratch",
            "image_sizes": "12x8",
        },
        {
            "class": "wood",
            "train_good": 3,
            "test_good": 1,
            "test_defective": 1,
            "defect_types": "hole",
            "image_sizes": "16x16, 20x10",
        },
    ]


def test_check_dataset_prints_the_table_and_exits_0(root: Path, capsys) -> None:
    assert main(["check-dataset", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "class",
        "train_good",
        "test_good",
        "test_defective",
        "defect_types",
        "image_sizes",
    ]
    assert lines[1].split() == ["bottle", "3", "2", "3", "crack,", "scratch", "12x8"]
    assert lines[2].split() == ["wood", "2", "1", "1", "hole", "16x16"]


def test_check_dataset_limits_to_the_named_classes(root: Path, capsys) -> None:
    assert main(["check-dataset", str(root), "--classes", "wood"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["class", "wood"]


def test_check_dataset_on_a_broken_tree_lists_every_problem_and_exits_2(
    root: Path, capsys
) -> None:
    bad_image = root / "bottle" / "test" / "good" / "000.png"
    bad_image.write_bytes(b"")
    bad_mask = _save(root / "wood" / "ground_truth" / "hole" / "000_mask.png", _rgb(0, (16, 16)))
    assert main(["check-dataset", str(root)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "2 problems:" in captured.err
    assert f"{bad_image}: not a readable image (empty file, 0 bytes)" in captured.err
    assert f"{bad_mask}: mask has colour" in captured.err


def test_check_dataset_on_a_missing_mask_exits_2(root: Path, capsys) -> None:
    mask = root / "wood" / "ground_truth" / "hole" / "000_mask.png"
    mask.unlink()
    assert main(["check-dataset", str(root)]) == 2
    assert f"expected {mask}" in capsys.readouterr().err


# --- real MVTec AD images ---------------------------------------------------------------------


@pytest.mark.real_data
def test_check_dataset_on_mvtec_ad_mini_finds_15_classes_of_10_4_4(real_data: Path, capsys):
    assert main(["check-dataset", str(real_data / "mvtec_ad_mini")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 15
    assert "bottle" in rows[0] and "zipper" in rows[-1]
    assert all(row[1:4] == ["10", "4", "4"] and row[-1] == "256x256" for row in rows)


@pytest.mark.real_data
def test_check_dataset_on_mvtec_ad_bottle_finds_209_20_63(real_data: Path, capsys):
    assert main(["check-dataset", str(real_data / "mvtec_ad_bottle")]) == 0
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert row == [
        "bottle",
        "209",
        "20",
        "63",
        "broken_large,",
        "broken_small,",
        "contamination",
        "256x256",
    ]
