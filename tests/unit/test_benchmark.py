"""The generated offline benchmark: determinism, MVTec layout, exact masks, varied normals."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from mddnet import benchmark
from mddnet.benchmark import (
    DEFECT_TYPES,
    KNOWN_CLASSES,
    MASK_TOLERANCE,
    make_benchmark,
    render_sample,
    sample_path,
    writer,
)
from mddnet.cli import main
from mddnet.config import BenchmarkConfig, load_config

SIZE = 64
TINY = BenchmarkConfig(
    classes=KNOWN_CLASSES,
    image_size=SIZE,
    train_per_class=3,
    test_good_per_class=2,
    test_defect_per_class=3,  # one of each defect type
)


REPO = Path(__file__).resolve().parents[2]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_benchmark(tmp_path_factory.mktemp("a") / "bench", TINY, seed=7).root


def test_same_seed_gives_byte_identical_files_and_another_seed_other_images(
    bench: Path, tmp_path: Path
) -> None:
    again = make_benchmark(tmp_path / "again", TINY, seed=7).root
    assert _digests(again) == _digests(bench)
    other = _digests(make_benchmark(tmp_path / "other", TINY, seed=8).root)
    first = _digests(bench)
    images = [k for k in first if k.endswith(".png") and "ground_truth" not in k]
    assert images and all(first[k] != other.get(k) for k in images)


def test_tree_is_in_mvtec_layout_with_a_binary_mask_per_defect_image(bench: Path) -> None:
    for name in KNOWN_CLASSES:
        root = bench / name
        assert sorted(p.name for p in (root / "train" / "good").iterdir()) == [
            "000.png",
            "001.png",
            "002.png",
        ]
        assert len(list((root / "test" / "good").iterdir())) == 2
        defect_dirs = sorted(p.name for p in (root / "test").iterdir() if p.name != "good")
        assert defect_dirs == sorted(DEFECT_TYPES[name])
        assert sorted(p.name for p in (root / "ground_truth").iterdir()) == defect_dirs
        for image in (root / "test").glob("*/*.png"):
            pixels = _read(image)
            assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
            if image.parent.name == "good":
                continue
            mask_path = root / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
            with Image.open(mask_path) as mask:
                assert mask.mode == "L"
                values = set(np.unique(np.asarray(mask)).tolist())
            assert values == {0, 255}
        masks = list((root / "ground_truth").glob("*/*_mask.png"))
        assert len(masks) == 3
        for mask in masks:
            stem = mask.name.removesuffix("_mask.png")
            assert (root / "test" / mask.parent.name / f"{stem}.png").is_file()


def test_benchmark_json_records_generator_seed_and_counts(bench: Path) -> None:
    info = json.loads((bench / "benchmark.json").read_text())
    assert info["generator_version"] == benchmark.GENERATOR_VERSION
    assert info["seed"] == 7 and info["image_size"] == SIZE
    assert list(info["classes"]) == list(KNOWN_CLASSES)
    for name, counts in info["classes"].items():
        assert counts["train_good"] == 3 and counts["test_good"] == 2
        assert counts["test_defects"] == dict.fromkeys(DEFECT_TYPES[name], 1)
        assert counts["kind"] == ("texture" if name in benchmark.TEXTURES else "object")


@pytest.mark.parametrize("name", KNOWN_CLASSES)
def test_mask_is_exactly_the_changed_pixels_of_each_defect(name: str, bench: Path) -> None:
    for index in range(TINY.test_defect_per_class):
        sample = render_sample(name, SIZE, 7, "test_defect", index)
        change = np.abs(sample.defective.astype(int) - sample.normal.astype(int)).max(axis=-1)
        changed = change > MASK_TOLERANCE
        mask = sample.mask > 0
        assert changed.any()
        assert not (changed & ~mask).any(), "a changed pixel lies outside the mask"
        # The mask adds nothing but the holes enclosed by changed pixels.
        np.testing.assert_array_equal(mask, ndimage.binary_fill_holes(changed))
        assert mask.mean() < 0.2, "a defect is local, not most of the image"
        # The files on disk are these renderings.
        image = bench / sample_path(name, "test_defect", index)
        np.testing.assert_array_equal(_read(image), sample.defective)
        mask_file = (
            image.parents[2] / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
        )
        np.testing.assert_array_equal(_read(mask_file), sample.mask)


def test_normal_samples_have_no_defect_rendering() -> None:
    sample = render_sample("gear", SIZE, 0, "train", 0)
    assert sample.defective is None and sample.mask is None and sample.defect_type is None


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


@pytest.mark.parametrize("name", KNOWN_CLASSES)
def test_normals_vary_and_test_good_images_are_not_train_images(name: str, bench: Path) -> None:
    train = [_read(p) for p in sorted((bench / name / "train" / "good").iterdir())]
    good = [_read(p) for p in sorted((bench / name / "test" / "good").iterdir())]
    # Pose, crop, colour and lighting differ from image to image (several grey levels on average),
    # so no two normals are the same picture, and the test set holds new pictures.
    for a, b in itertools.combinations(train + good, 2):
        assert _mean_abs_diff(a, b) > 2.0


def test_a_class_does_not_depend_on_the_other_classes_or_the_counts(
    bench: Path, tmp_path: Path
) -> None:
    alone = BenchmarkConfig(
        classes=("gear",),
        image_size=SIZE,
        train_per_class=1,
        test_good_per_class=1,
        test_defect_per_class=1,
    )
    root = make_benchmark(tmp_path / "gear_only", alone, seed=7).root
    for rel in (
        "gear/train/good/000.png",
        "gear/test/good/000.png",
        "gear/test/broken_tooth/000.png",
    ):
        assert (root / rel).read_bytes() == (bench / rel).read_bytes()


def test_sample_path_cycles_defect_types() -> None:
    # brick's types are (crack, hole, stain): index 4 is the second hole.
    assert DEFECT_TYPES["brick"] == ("crack", "hole", "stain")
    assert sample_path("brick", "test_defect", 4) == "brick/test/hole/001.png"
    assert sample_path("washer", "train", 12) == "washer/train/good/012.png"


def test_unknown_class_is_rejected_naming_the_known_ones(tmp_path: Path) -> None:
    config = BenchmarkConfig(("brick", "carpet"), SIZE, 1, 1, 1)
    with pytest.raises(ValueError, match=r"'carpet'.*brick, grass, gravel, washer, gear, capsule"):
        make_benchmark(tmp_path / "out", config, seed=0)
    assert not (tmp_path / "out").exists()


def test_foreign_folder_is_refused_and_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "mvtec"
    out.mkdir()
    (out / "keep.txt").write_text("real data")
    with pytest.raises(ValueError, match="not a generated benchmark"):
        make_benchmark(out, TINY, seed=0)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_benchmark_written_by_the_former_module_is_still_recognised_and_replaced(
    tmp_path: Path,
) -> None:
    # Benchmarks on disk name the generator's former module, mddnet.data.synthetic.
    out = tmp_path / "bench"
    out.mkdir()
    (out / "benchmark.json").write_text(json.dumps({"generator": "mddnet.data.synthetic"}))
    (out / "stale.png").write_bytes(b"")
    make_benchmark(out, BenchmarkConfig(("washer",), 32, 1, 1, 1), seed=0)
    assert not (out / "stale.png").exists()
    assert json.loads((out / "benchmark.json").read_text())["generator"] == benchmark.GENERATOR


def test_rerun_replaces_an_earlier_benchmark_and_leaves_no_temporary_folders(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bench"
    small = BenchmarkConfig(("washer",), 32, 2, 1, 1)
    make_benchmark(out, small, seed=0)
    assert (out / "washer" / "train" / "good" / "001.png").is_file()
    make_benchmark(out, BenchmarkConfig(("washer",), 32, 1, 1, 1), seed=0)
    assert not (out / "washer" / "train" / "good" / "001.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bench"]


def test_interrupted_run_leaves_no_benchmark_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = writer.render_sample

    def failing(*args: object) -> benchmark.SampleRendering:
        calls.append(args)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(writer, "render_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        make_benchmark(tmp_path / "bench", BenchmarkConfig(("brick",), 32, 3, 1, 1), seed=0)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_tree_with_overridden_sizes(tmp_path: Path, params_path: Path) -> None:
    out = tmp_path / "cli"
    argv = ["make-benchmark", str(out), "--params", str(params_path), "--seed", "3"]
    argv += ["--image-size", "32", "--train-per-class", "1"]
    argv += ["--test-good-per-class", "1", "--test-defect-per-class", "2"]
    assert main(argv) == 0
    info = json.loads((out / "benchmark.json").read_text())
    assert info["seed"] == 3 and info["image_size"] == 32
    images = [p for p in out.rglob("*.png") if "ground_truth" not in p.parts]
    assert len(images) == 4 * len(info["classes"])
    assert _read(out / "capsule" / "train" / "good" / "000.png").shape == (32, 32, 3)


def test_cli_reports_a_bad_size_as_a_one_line_error(
    tmp_path: Path, params_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["make-benchmark", str(tmp_path / "x"), "--params", str(params_path)]
    assert main([*argv, "--image-size", "8"]) == 2
    assert "data.benchmark.image_size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# sha256 over the sorted (path, file sha256) list of a small benchmark: pixels and PNG bytes. The
# renderer's transcendental math goes through benchmark.portable, so this is the same on every
# x86-64 CPU (checked under numpy's AVX-512, AVX2 and SSE kernels; issue 14). A change here changes
# every offline result: bump GENERATOR_VERSION and say why.
GOLDEN_SIZES = {
    "image_size": 64,
    "train_per_class": 2,
    "test_good_per_class": 1,
    "test_defect_per_class": 2,
}
GOLDEN_SHA256 = "fbdfd58d7feaa4b3a72ad64921b3b4e9dd7f412f1eefb17c11a41f76efcaa85b"


def test_the_generated_files_are_the_committed_bytes(tmp_path: Path) -> None:
    config = load_config(REPO / "params.yaml", overrides={"data": {"benchmark": GOLDEN_SIZES}})
    root = make_benchmark(tmp_path / "b", config.data.benchmark, 0).root
    files = sorted(p for p in root.rglob("*") if p.is_file())
    listing = "".join(
        f"{p.relative_to(root).as_posix()} {hashlib.sha256(p.read_bytes()).hexdigest()}\n"
        for p in files
    )
    assert hashlib.sha256(listing.encode()).hexdigest() == GOLDEN_SHA256
