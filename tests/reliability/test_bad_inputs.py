"""The catalogue of bad inputs, through the entry points a user runs (`mddnet ...` and params).

Each case asserts what the user sees: exit status 2, one line that names the file or key and
says what to do, no traceback, and nothing half-written (no checkpoint, no predictions, an
earlier metrics file left as it was). Inputs that are odd but valid (class names with a space or
an accent, grayscale, 16-bit, an image 10x larger than the rest, an anti-aliased mask) must
work, and the numbers they give are checked. The unit tests pin each reader function; this file
pins what reaches the user. tests/reliability/README.md lists every case and its message.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mddnet import __version__
from mddnet.cli import main
from mddnet.config import config_to_dict, load_config
from mddnet.data.layout import DatasetError, load_image
from mddnet.data.prepare import prepare_dataset
from mddnet.io import load_checkpoint, save_checkpoint
from mddnet.models import build_model
from mddnet.pipeline import PipelinePaths, render_pipeline
from mddnet.predictions import load_predictions

REPO = Path(__file__).resolve().parents[2]
SIZE = 24  # side of the hand-made images (pixels)
TRAIN_IMAGE = "bottle/train/good/001.png"
DEFECT_IMAGE = "bottle/test/crack/000.png"
MASK = "bottle/ground_truth/crack/000_mask.png"


class CliRun(NamedTuple):
    """Exit status and captured output of one in-process `mddnet` command."""

    code: int
    out: str
    err: str

    def error(self, command: str) -> str:
        """The one-line error of a failed command; fails on a traceback or a multi-line error.

        Progress bars share stderr (tqdm writes without newlines), so the message is what
        follows `mddnet <command>: error: ` to the end of its line, and only progress-bar
        fragments may follow it.
        """
        assert self.code == 2, f"exit status {self.code}, expected 2; stderr:\n{self.err}"
        assert "Traceback" not in self.err, self.err
        prefix = f"mddnet {command}: error: "
        lines = self.err.splitlines()
        found = [i for i, line in enumerate(lines) if prefix in line]
        assert len(found) == 1, self.err
        rest = [s for s in lines[found[0] + 1 :] if s.strip() and not s.startswith(command)]
        assert not rest, f"the error goes on over several lines:\n{self.err}"
        return lines[found[0]].split(prefix, 1)[1]


@pytest.fixture
def cli(capsys) -> Callable[..., CliRun]:
    """`cli("train", "--params", ...)` runs `mddnet.cli.main` and captures what the user sees."""

    def run(*args: str | Path) -> CliRun:
        capsys.readouterr()  # drop what earlier steps printed
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return run


def _save(path: Path, pixels: np.ndarray) -> Path:
    """Write `pixels` (uint8 or uint16, (H, W) or (H, W, 3)) as PNG, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _square_mask(size: int = SIZE) -> np.ndarray:
    """0/255 mask (H, W) whose top-left quarter is defective."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[: size // 2, : size // 2] = 255
    return mask


def _gray(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)  # (H, W)


def _tree(root: Path, classes: Sequence[str] = ("bottle", "wood")) -> Path:
    """A valid MVTec-layout tree: per class 4 normal images, one good and one defective test
    image (defect type `crack`) with its mask, all 24 x 24 RGB."""
    rng = np.random.default_rng(0)
    for name in classes:
        pixels = rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)  # (6, H, W, 3)
        for i in range(4):
            _save(root / name / "train" / "good" / f"{i:03d}.png", pixels[i])
        _save(root / name / "test" / "good" / "000.png", pixels[4])
        _save(root / name / "test" / "crack" / "000.png", pixels[5])
        _save(root / name / "ground_truth" / "crack" / "000_mask.png", _square_mask())
    return root


# ---------------------------------------------------------------------------------------------
# Broken dataset files: `mddnet check-dataset` (the prepare stage runs the same validation).
# Each breaker damages a fresh tree and returns the path the message must start with.


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_train_image(root: Path) -> Path:
    return _truncated(root / TRAIN_IMAGE)


def _truncated_test_image(root: Path) -> Path:
    return _truncated(root / DEFECT_IMAGE)


def _truncated_mask(root: Path) -> Path:
    return _truncated(root / MASK)


def _zero_bytes(root: Path) -> Path:
    (root / TRAIN_IMAGE).write_bytes(b"")
    return root / TRAIN_IMAGE


def _text_named_png(root: Path) -> Path:
    (root / TRAIN_IMAGE).write_text("not an image", encoding="utf-8")
    return root / TRAIN_IMAGE


def _huge_header(root: Path) -> Path:
    """A PNG header claiming 20000 x 20000 pixels, over PIL's decompression-bomb limit."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)  # 8-bit gray
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    (root / TRAIN_IMAGE).write_bytes(png)
    return root / TRAIN_IMAGE


def _small_mask(root: Path) -> Path:
    return _save(root / MASK, _square_mask(SIZE // 2))


def _label_mask(root: Path) -> Path:
    labels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    labels[:8, :8], labels[12:, 12:] = 1, 2  # two defect instances, as raw VisA masks hold
    return _save(root / MASK, labels)


def _no_mask(root: Path) -> Path:
    (root / MASK).unlink()
    return root / DEFECT_IMAGE


def _empty_class(root: Path) -> Path:
    (root / "wood").mkdir()
    return root / "wood"


_REDOWNLOAD = "; re-export or re-download it, or delete it"
# case: (breaker, what the message says is wrong, the fix it ends with)
BROKEN_FILES: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    "truncated PNG": (_truncated_train_image, "(OSError: image file is truncated", _REDOWNLOAD),
    "truncated test image": (
        _truncated_test_image,
        "(OSError: image file is truncated",
        _REDOWNLOAD,
    ),
    "truncated mask": (_truncated_mask, "(OSError: image file is truncated", _REDOWNLOAD),
    "zero-byte file": (_zero_bytes, "not a readable image (empty file, 0 bytes)", _REDOWNLOAD),
    "text file named .png": (_text_named_png, "(UnidentifiedImageError: cannot", _REDOWNLOAD),
    "20000 x 20000 header": (_huge_header, "(DecompressionBombError: Image size", _REDOWNLOAD),
    "mask of the wrong size": (
        _small_mask,
        "mask is 12x12 but its image is 24x24",
        "resize the mask to the image size with nearest-neighbour interpolation",
    ),
    "mask of labels 0/1/2": (
        _label_mask,
        "mask holds several small values [0, 1, 2] (instance or class labels?), not a binary",
        "save it as 0 = normal, 255 = defect (`mddnet convert-visa` does this for VisA)",
    ),
    "defect image without mask": (
        _no_mask,
        f"defective test image has no mask; expected {{root}}/{MASK}",
        "(single-channel PNG, 255 = defect, same size as the image)",
    ),
    "empty class folder": (
        _empty_class,
        "empty class folder",
        "add train/good and test/ or remove it",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_check_dataset_names_the_broken_file_and_the_fix(case, cli, tmp_path) -> None:
    root = _tree(tmp_path / "data", classes=("bottle",))
    breaker, problem, fix = BROKEN_FILES[case]
    named = breaker(root)
    message = cli("check-dataset", root).error("check-dataset")
    assert message.startswith(f"{named}: "), message
    assert problem.format(root=root) in message
    assert message.endswith(fix), message


def test_an_anti_aliased_mask_is_binarised_at_128_with_a_warning(cli, tmp_path, caplog) -> None:
    root = _tree(tmp_path / "data", classes=("bottle",))
    mask = _square_mask()
    mask[SIZE // 2, : SIZE // 2] = 128  # an edge row at half scale: defective
    mask[SIZE // 2 + 1, : SIZE // 2] = 40  # a faint one: normal
    _save(root / MASK, mask)
    with caplog.at_level(logging.WARNING, logger="mddnet.data.layout"):
        run = cli("check-dataset", root)
    assert run.code == 0, run.err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = f"{root / MASK}: mask is not binary (4 distinct values, 24 pixels strictly between"
    assert any(w.startswith(expected) for w in warnings), warnings
    assert any("thresholded at 128. Save masks as 0/255" in w for w in warnings), warnings


# ---------------------------------------------------------------------------------------------
# The prepare stage runs the same validation, so bad real data stops the pipeline before training


def test_the_prepare_stage_lists_every_broken_file_and_writes_no_summary(params, tmp_path) -> None:
    root = _tree(tmp_path / "data")
    broken = [_zero_bytes(root), _truncated(root / "wood" / "test" / "good" / "000.png")]
    config = load_config(params(tmp_path / "params.yaml", root))
    summary = tmp_path / "results" / "summary.csv"
    with pytest.raises(DatasetError) as error:
        prepare_dataset(config, [root], summary)
    assert sorted(p.split(": ")[0] for p in error.value.problems) == sorted(map(str, broken))
    assert not summary.parent.exists()


@pytest.mark.real_data
def test_the_prepare_stage_passes_real_images_and_stops_on_a_damaged_one(
    real_data, params, tmp_path
) -> None:
    root = tmp_path / "mvtec"
    for name in ("bottle", "grid"):  # grid's images are grayscale in MVTec AD
        shutil.copytree(real_data / "mvtec_ad_mini" / name, root / name)
    config = load_config(params(tmp_path / "params.yaml", root))
    prepared = prepare_dataset(config, [root])
    assert list(prepared.summary["image_sizes"]) == ["256x256", "256x256"]
    damaged = _truncated(root / "grid" / "train" / "good" / "003.png")
    with pytest.raises(DatasetError, match=re.escape(f"{damaged}: not a readable image")):
        prepare_dataset(config, [root])


def _real_data_pipeline(repo: Path) -> PipelinePaths:
    """A pipeline of a user's folder (`data.generate: false`) in a copy of the repo's params."""
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    paths = PipelinePaths.for_dataset("mine")
    (repo / paths.params).parent.mkdir(parents=True)
    (repo / paths.params).write_text(
        "extends: ../../params.yaml\ndata: {dataset: mine, root: /data/mine, generate: false}\n",
        encoding="utf-8",
    )
    return paths


@pytest.mark.parametrize("generate", [True, False], ids=["generated", "real data"])
def test_every_training_stage_depends_on_an_output_of_the_prepare_stage(
    generate, tmp_path
) -> None:
    repo, paths = (
        (REPO, PipelinePaths()) if generate else (tmp_path, _real_data_pipeline(tmp_path))
    )
    stages = render_pipeline(repo, paths)["stages"]
    prepared = {next(iter(o)) if isinstance(o, dict) else o for o in stages["prepare"]["outs"]}
    assert prepared & set(stages["train"]["do"]["deps"])


# ---------------------------------------------------------------------------------------------
# A broken image reached by training without the prepare stage: one line, nothing written


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1], ids=["main process", "DataLoader worker"])
def test_training_on_a_truncated_image_stops_with_one_line_and_writes_nothing(
    workers, params, cli, files_under, tmp_path
) -> None:
    # One class of 4 images in batches of 4: the broken image is in the first batch.
    root = _tree(tmp_path / "data", classes=("bottle",))
    broken = _truncated(root / TRAIN_IMAGE)
    params_file = params(tmp_path / "params.yaml", root, {"data": {"num_workers": workers}})
    out = tmp_path / "out"
    message = cli("train", "--params", params_file, "--out", out / "mddnet.pt").error("train")
    assert message == (
        f"{broken}: not a readable image (OSError: image file is truncated){_REDOWNLOAD}"
    )
    assert files_under(out) == []


# ---------------------------------------------------------------------------------------------
# Odd but valid data: it must work, and give the numbers it should


def _odd_tree(root: Path) -> dict[str, Path]:
    """Class names with a space and an accent; grayscale, 16-bit and 240 px images; a 0/128/255
    mask. The three `gray*` test images hold the same picture as 8-bit gray, RGB and 16-bit."""
    _tree(root, classes=("metal nut", "café"))
    nut, cafe = root / "metal nut", root / "café"
    gray = _gray(1)
    big = np.kron(_gray(2), np.ones((10, 10), dtype=np.uint8))  # (240, 240): 10x the others
    _save(nut / "train" / "good" / "100_gray.png", _gray(3))
    _save(nut / "train" / "good" / "101_16bit.png", _gray(4).astype(np.uint16) * 257)
    _save(cafe / "train" / "good" / "102_big.png", np.stack([big] * 3, axis=-1))
    soft = _square_mask()
    soft[SIZE // 2, : SIZE // 2] = 128  # defective rows 0..12 once binarised at 128
    _save(nut / "ground_truth" / "crack" / "000_mask.png", soft)
    _save(cafe / "ground_truth" / "crack" / "001_big_mask.png", _square_mask(10 * SIZE))
    return {
        "gray": _save(nut / "test" / "good" / "gray.png", gray),
        "gray_rgb": _save(nut / "test" / "good" / "gray_rgb.png", np.stack([gray] * 3, -1)),
        # v * 257 in 16 bits is (v << 8) | v, which 8-bit scaling turns back into v exactly
        "gray_16bit": _save(
            nut / "test" / "good" / "gray_16bit.png", gray.astype(np.uint16) * 257
        ),
        "big": _save(cafe / "test" / "crack" / "001_big.png", big),
        "soft_mask_image": nut / "test" / "crack" / "000.png",
    }


@pytest.mark.slow
def test_odd_but_valid_data_trains_evaluates_and_predicts(params, cli, tmp_path) -> None:
    root = tmp_path / "data"
    odd = _odd_tree(root)
    summary = cli("check-dataset", root)
    assert summary.code == 0, summary.err
    assert [line.split()[0] for line in summary.out.splitlines()[1:]] == ["café", "metal"]
    assert "24x24, 240x240" in summary.out

    params_file = params(tmp_path / "params.yaml", root)
    checkpoint = tmp_path / "out" / "mddnet.pt"
    assert cli("train", "--params", params_file, "--out", checkpoint).code == 0
    assert load_checkpoint(checkpoint)["class_names"] == ["café", "metal nut"]
    metrics, predictions = tmp_path / "metrics.json", tmp_path / "predictions.npz"
    run = cli(
        "evaluate", "--params", params_file, "--checkpoint", checkpoint,
        "--metrics-out", metrics, "--predictions-out", predictions,
    )  # fmt: skip
    assert run.code == 0, run.err
    per_class = json.loads(metrics.read_text(encoding="utf-8"))["per_class"]
    assert list(per_class) == ["café", "metal nut"]
    result = load_predictions(predictions)
    index = {Path(p): i for i, p in enumerate(result.paths)}
    kinds = ("gray", "gray_rgb", "gray_16bit")
    # Gray, RGB and 16-bit files of one picture decode to the same RGB pixels...
    pixels = [np.asarray(load_image(odd[k])) for k in kinds]
    assert all(np.array_equal(pixels[0], other) for other in pixels[1:])
    # ... and so score alike, to float32 rounding: once, in a shuffled run under load, they
    # differed in the 7th digit (2.5245478 vs 2.5245469). They sit at other batch positions, and
    # in this process the AVX2 pin comes too late (torch already runs its AVX-512 kernels).
    gray = [result.scores[index[odd[k]]] for k in kinds]
    assert gray[1] == pytest.approx(gray[0], rel=1e-5) and gray[2] == pytest.approx(
        gray[0], rel=1e-5
    )
    size = load_config(params_file).data.image_size
    assert result.fused.shape[1:] == (size, size) == (32, 32)
    # the 240 px mask's top-left quarter at 32 px: 16 x 16 pixels
    assert result.masks[index[odd["big"]]].sum() == 16 * 16
    # defective rows 0..12 and columns 0..11 of 24 cover rows 0..16 and columns 0..15 at 32 px
    # (nearest neighbour samples source pixel floor((i + 0.5) * 24 / 32))
    assert result.masks[index[odd["soft_mask_image"]]].sum() == 17 * 16

    out = tmp_path / "predicted"
    run = cli(
        "predict", checkpoint, odd["big"], odd["gray_16bit"], "--class", "café", "--out", out
    )
    assert run.code == 0, run.err
    with (out / "scores.csv").open(encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    assert [r["class"] for r in written] == ["café", "café"]
    with Image.open(written[0]["overlay"]) as overlay:
        assert overlay.size == (10 * SIZE, 10 * SIZE)  # an overlay keeps its image's size


# ---------------------------------------------------------------------------------------------
# Bad params: the file and the full key path, and nothing trained


def _misspell_steps(raw: dict[str, Any]) -> None:
    raw["train"]["step"] = raw["train"].pop("steps")


def _negative_steps(raw: dict[str, Any]) -> None:
    raw["train"]["steps"] = -3


def _unknown_memory_mode(raw: dict[str, Any]) -> None:
    raw["model"]["memory"]["mode"] = "gate"


def _unchanged(raw: dict[str, Any]) -> None:
    del raw  # the bad input is the --variant argument


@pytest.mark.parametrize(
    ("edit", "variant", "expected"),
    [
        (_misspell_steps, "mddnet", "train.step: unknown key (expected one of: steps, batch"),
        (_negative_steps, "mddnet", "train.steps: must be >= 1, got -3"),
        (
            _unknown_memory_mode,
            "mddnet",
            "model.memory.mode: must be one of replace | mix | gated, got 'gate'",
        ),
        (_unchanged, "mdd_net", "unknown variant 'mdd_net' (valid variants: rd_baseline, "),
    ],
    ids=["misspelled key", "negative step count", "unknown option", "unknown variant"],
)
def test_bad_params_name_the_file_and_key_and_train_nothing(
    edit, variant, expected, params, cli, files_under, tmp_path
) -> None:
    params_file = params(tmp_path / "params.yaml", _tree(tmp_path / "data"))
    raw = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    edit(raw)
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    out = tmp_path / "out"
    message = cli(
        "train", "--params", params_file, "--variant", variant, "--out", out / "x.pt"
    ).error("train")
    assert message.startswith(f"{params_file}: {expected}"), message
    assert files_under(out) == []


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: evaluate and predict refuse them and leave earlier results as they were


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker file exists if the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _untrained_checkpoint(path: Path, params_file: Path, **model: object) -> Path:
    """A complete checkpoint of an untrained model, as `mddnet train` writes one."""
    config = load_config(params_file, "mddnet", overrides={"model": model} if model else None)
    network = build_model(config.model, 2, pretrained=False)
    payload = {
        "state_dict": network.state_dict(),
        "config": config_to_dict(config),
        "class_names": ["bottle", "wood"],
        "complete": True,
        "step": 0,
    }
    save_checkpoint(path, payload)
    return path


class Evaluation(NamedTuple):
    """A dataset's params and an earlier metrics file that a failed evaluate must keep."""

    params: Path
    metrics: Path
    data: Path


EARLIER = '{"earlier": "result"}\n'


@pytest.fixture
def evaluation(params, tmp_path) -> Evaluation:
    data = _tree(tmp_path / "data")
    metrics = tmp_path / "results" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text(EARLIER, encoding="utf-8")
    return Evaluation(params(tmp_path / "params.yaml", data), metrics, data)


def _refused_by_evaluate_and_predict(cli, checkpoint: Path, evaluation, tmp_path) -> list[str]:
    """Run evaluate and predict on `checkpoint`: both must fail cleanly and write nothing."""
    predictions, predicted = tmp_path / "p.npz", tmp_path / "predicted"
    evaluated = cli(
        "evaluate", "--params", evaluation.params, "--checkpoint", checkpoint,
        "--metrics-out", evaluation.metrics, "--predictions-out", predictions,
    )  # fmt: skip
    scored = cli("predict", checkpoint, evaluation.data, "--out", predicted)
    messages = [evaluated.error("evaluate"), scored.error("predict")]
    assert evaluation.metrics.read_text(encoding="utf-8") == EARLIER
    assert [p.name for p in evaluation.metrics.parent.iterdir()] == ["metrics.json"]
    assert not predictions.exists() and not predicted.exists()
    return messages


@pytest.mark.slow
def test_a_checkpoint_of_another_backbone_is_refused_naming_it(cli, evaluation, tmp_path) -> None:
    resnet = _untrained_checkpoint(
        tmp_path / "resnet.pt", evaluation.params, backbone="resnet18", weights="none"
    )
    message = cli(
        "evaluate", "--params", evaluation.params, "--checkpoint", resnet,
        "--metrics-out", evaluation.metrics,
    ).error("evaluate")  # fmt: skip
    assert message.startswith(f"{resnet}: trained with model = ModelConfig(backbone='resnet18'")
    assert message.endswith("retrain (dvc repro) or fix the params")
    assert evaluation.metrics.read_text(encoding="utf-8") == EARLIER

    # The same weights under a config that names another backbone (a mislabelled file).
    mislabelled = load_checkpoint(resnet)
    mislabelled["config"]["model"]["backbone"] = "tf_efficientnet_lite0"
    path = tmp_path / "mislabelled.pt"
    save_checkpoint(path, mislabelled)
    for message in _refused_by_evaluate_and_predict(cli, path, evaluation, tmp_path):
        assert message.startswith(f"{path}: weights do not fit the model its config describes")
        assert "Missing key(s) in state_dict" in message  # what does not fit
        assert message.endswith(
            f"written by another mddnet version ({__version__}): retrain it with `mddnet train`"
        )


def _json_text(path: Path) -> None:
    path.write_text('{"state_dict": {}}', encoding="utf-8")


def _png_image(path: Path) -> None:
    Image.fromarray(_square_mask()).save(path, format="PNG")


def _plain_state_dict(path: Path) -> None:
    torch.save({"weight": torch.zeros(3)}, path)


NOT_CHECKPOINTS = {
    "JSON text": (_json_text, "not a loadable mddnet checkpoint (UnpicklingError: Unsupported"),
    "PNG image": (_png_image, "not a loadable mddnet checkpoint (UnpicklingError: Unsupported"),
    "plain state dict": (
        _plain_state_dict,
        "not an mddnet checkpoint (no format 1 header); pass a file written by `mddnet train`",
    ),
}


@pytest.mark.parametrize("kind", list(NOT_CHECKPOINTS))
def test_a_file_that_is_not_a_checkpoint_is_refused_naming_it(
    kind, cli, evaluation, tmp_path
) -> None:
    write, expected = NOT_CHECKPOINTS[kind]
    checkpoint = tmp_path / "model.pt"
    write(checkpoint)
    for message in _refused_by_evaluate_and_predict(cli, checkpoint, evaluation, tmp_path):
        assert message.startswith(f"{checkpoint}: {expected}"), message


@pytest.mark.slow
def test_a_truncated_checkpoint_is_refused_naming_it(cli, evaluation, tmp_path) -> None:
    checkpoint = _truncated(_untrained_checkpoint(tmp_path / "cut.pt", evaluation.params))
    for message in _refused_by_evaluate_and_predict(cli, checkpoint, evaluation, tmp_path):
        assert message.startswith(f"{checkpoint}: not a loadable mddnet checkpoint")
        assert message.endswith("retrain or pass the right file.")


@pytest.mark.slow
def test_predict_refuses_a_checkpoint_without_calibration(cli, evaluation, tmp_path) -> None:
    """A complete checkpoint that was never calibrated (as the train stage writes it): predict's
    verdicts need the thresholds."""
    checkpoint = _untrained_checkpoint(tmp_path / "old.pt", evaluation.params)
    predicted = tmp_path / "predicted"
    message = cli("predict", checkpoint, evaluation.data, "--out", predicted).error("predict")
    assert message == (
        "this checkpoint has no calibration: run `mddnet calibrate` on it (or train it with "
        "`mddnet train`, which calibrates)"
    )
    assert not predicted.exists()


def test_pickled_code_in_a_checkpoint_is_refused_and_never_runs(cli, evaluation, tmp_path) -> None:
    marker = tmp_path / "code_ran"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"format": 1, "state_dict": _Payload(marker)}, checkpoint)
    for message in _refused_by_evaluate_and_predict(cli, checkpoint, evaluation, tmp_path):
        assert message.startswith(f"{checkpoint}: not a loadable mddnet checkpoint")
        assert "GLOBAL io.open was not an allowed global" in message  # what it refused
        assert "Files are read with weights_only=True, so pickled code is refused" in message
    assert not marker.exists()


@pytest.mark.slow
def test_pickled_code_in_teacher_weights_is_refused_and_never_runs(
    params, cli, files_under, tmp_path
) -> None:
    marker = tmp_path / "code_ran"
    weights = tmp_path / "teacher.pth"
    torch.save({"conv1.weight": _Payload(marker)}, weights)
    overrides = {"model": {"backbone": "resnet18", "weights": str(weights)}}
    params_file = params(tmp_path / "params.yaml", _tree(tmp_path / "data"), overrides)
    out = tmp_path / "out"
    message = cli("train", "--params", params_file, "--out", out / "x.pt").error("train")
    assert message.startswith(f"{weights}: model.weights is not a readable state dict")
    assert "files are read with weights_only=True" in message
    assert not marker.exists()
    assert files_under(out) == []
