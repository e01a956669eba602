"""Calibration on held-out normals and the one scoring path (`checkpoint.Scorer`) that uses it."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mddnet.calibration import (
    SMALL_WINDOW,
    _collect,
    calibrate,
    candidates_table,
    held_out_samples,
    statistics_of,
    validation_anomalies,
)
from mddnet.checkpoint import Calibration, Scorer
from mddnet.config import Config, load_config
from mddnet.data.datasets import NormalDataset, normalize
from mddnet.data.layout import scan_dataset
from mddnet.errors import MddnetError
from mddnet.io import CheckpointError
from mddnet.models import build_model
from mddnet.models.mddnet import MDDNetOutput
from mddnet.scoring import AnomalyMaps, anomaly_maps, fuse, image_scores

SIZE = 32
CLASSES = ("alpha", "beta")


def _calibration(**changes: object) -> Calibration:
    """A calibration as a checkpoint stores it: two classes, both maps."""
    values = {
        "statistics": {
            "teacher_restoration": [[0.0, 2.0], [1.0, 0.5]],
            "restoration_identity": [[0.5, 0.0], [1.0, 2.0]],
        },
        "normalise": True,
        "scale_weights": None,
        "restoration_identity": 0.25,
        "image_score": "topk_mean",
        "thresholds": [1.5, 2.5],
        "candidates": [],
        "images": 4,
    }
    return Calibration(**{**values, **changes})


def _config(params_path: Path, **evaluate: object) -> Config:
    return load_config(params_path, "mddnet", overrides={"evaluate": evaluate})


def _untrained(
    params_path: Path, variant: str = "mddnet", **sections: dict
) -> tuple[Config, torch.nn.Module]:
    """A variant's config at SIZE px with `sections` overridden, and its untrained model (no
    teacher weights: every number is checked against a recompute, not a value)."""
    overrides = {"model": {"weights": "none"}, "data": {"image_size": SIZE}, **sections}
    config = load_config(params_path, variant, overrides=overrides)
    torch.manual_seed(0)
    return config, build_model(config.model, len(CLASSES)).eval()


# ---------------------------------------------------------------------------------------------
# Scorer.of: `validated` and `normalise` resolved against the calibration


def test_scorer_of_takes_validated_values_from_the_calibration(params_path: Path) -> None:
    config = _config(
        params_path,
        fusion={"normalise": False, "restoration_identity": "validated"},
        image_score="validated",
    )
    scorer = Scorer.of(config, _calibration())
    assert scorer.weights == (config.evaluate.fusion.teacher_restoration, 0.25)
    assert scorer.image_score == "topk_mean"
    assert scorer.statistics is None  # normalise: false sums the raw maps
    assert scorer.config is config


def test_scorer_of_normalise_uses_the_calibration_statistics(params_path: Path) -> None:
    config = _config(
        params_path, fusion={"normalise": True, "restoration_identity": 0.5}, image_score="max"
    )
    scorer = Scorer.of(config, _calibration())
    assert scorer.weights == (1.0, 0.5) and scorer.image_score == "max"  # the config's own
    mean, std = scorer.statistics.teacher_restoration
    assert mean.tolist() == [0.0, 2.0] and std.tolist() == [1.0, 0.5]
    mean, std = scorer.statistics.restoration_identity
    assert mean.tolist() == [0.5, 0.0] and std.tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "evaluate",
    [
        {"fusion": {"restoration_identity": "validated"}},
        {"image_score": "validated"},
        {"fusion": {"normalise": True}},
        {"fusion": {"scale_weights": "validated"}},
    ],
    ids=["validated weight", "validated image score", "normalise", "validated scales"],
)
def test_scorer_of_refuses_a_missing_calibration(params_path: Path, evaluate) -> None:
    with pytest.raises(CheckpointError, match="needs the calibration .* this checkpoint has none"):
        Scorer.of(_config(params_path, **evaluate), None)


def test_scorer_of_plain_settings_needs_no_calibration(params_path: Path) -> None:
    config = _config(
        params_path,
        fusion={"normalise": False, "scale_weights": [1, 0, 2], "restoration_identity": 0.5},
        image_score="topk_mean",
    )
    expected = Scorer((1.0, 0.5), None, "topk_mean", config, (1.0, 0.0, 2.0))
    assert Scorer.of(config, None) == expected


def test_scorer_of_takes_the_validated_scale_weights(params_path: Path) -> None:
    config = _config(params_path, fusion={"normalise": True, "scale_weights": "validated"})
    scorer = Scorer.of(config, _calibration(scale_weights=[0.5, 1.0, 1.0]))
    assert scorer.scale_weights == [0.5, 1.0, 1.0]
    plain = _config(params_path, fusion={"normalise": False, "scale_weights": None})
    assert Scorer.of(plain, _calibration(scale_weights=[0.5, 1.0, 1.0])).scale_weights is None


def test_statistics_of_other_scale_weights_are_refused(params_path: Path) -> None:
    """The z-score statistics hold only for the scale weights they were measured with."""
    config = _config(params_path, fusion={"normalise": True, "scale_weights": [0, 1, 1]})
    with pytest.raises(CheckpointError, match=r"scale weights \[0.5, 1.0, 1.0\]"):
        Scorer.of(config, _calibration(scale_weights=[0.5, 1.0, 1.0]))
    same = Scorer.of(config, _calibration(scale_weights=[0.0, 1.0, 1.0]))
    assert same.scale_weights == (0.0, 1.0, 1.0)


def test_calibrated_scorer_is_the_calibrations_own_scoring(params_path: Path) -> None:
    config = _config(params_path, fusion={"teacher_restoration": 3.0})
    scorer = Scorer.calibrated(config, _calibration())
    assert scorer.weights == (1.0, 0.25) and scorer.image_score == "topk_mean"
    assert scorer.statistics.teacher_restoration[0].tolist() == [0.0, 2.0]
    with pytest.raises(CheckpointError, match="no calibration"):
        Scorer.calibrated(config, None)


def _fixed_output(identity: bool = True, class_ids: torch.Tensor | None = None):
    """A stand-in model: the same MDDNetOutput whatever the image (2 images, 2-channel maps)."""
    g = torch.Generator().manual_seed(0)
    features = [[torch.randn(2, 2, s, s, generator=g) for s in (8, 4)] for _ in range(3)]
    output = MDDNetOutput(
        features[0], features[1], features[2] if identity else None, None, class_ids
    )
    return lambda image, given: output


def test_a_scorer_call_fuses_the_maps_and_pools_the_scores(params_path: Path) -> None:
    config = _config(params_path, fusion={"normalise": True}, topk=5)
    calibration = _calibration(
        restoration_identity=0.5, image_score="topk_mean", scale_weights=[0.0, 2.0]
    )
    scorer = Scorer.calibrated(config, calibration)
    model = _fixed_output(class_ids=torch.tensor([1, 0]))
    image = torch.zeros(2, 3, SIZE, SIZE)
    scored = scorer(model, image, None)
    output = model(image, None)
    # scale weights [0, 2]: twice the coarse scale's map alone
    coarse = MDDNetOutput(*(None if f is None else f[1:] for f in output[:3]), None, None)
    maps = anomaly_maps(coarse, (SIZE, SIZE), config.evaluate.blur_sigma)
    maps = AnomalyMaps(*(2 * m for m in maps))
    torch.testing.assert_close(scored.maps.teacher_restoration, maps.teacher_restoration)
    fused = fuse(maps, (1.0, 0.5), calibration.map_statistics(), torch.tensor([1, 0]))
    torch.testing.assert_close(scored.fused, fused)
    torch.testing.assert_close(scored.scores, image_scores(fused, "topk_mean", 5))


def test_normalised_scoring_without_a_class_is_refused(params_path: Path) -> None:
    scorer = Scorer.calibrated(_config(params_path), _calibration())
    with pytest.raises(MddnetError, match=r"give it \(mddnet predict --class NAME\)"):
        scorer(_fixed_output(class_ids=None), torch.zeros(2, 3, SIZE, SIZE), None)


# ---------------------------------------------------------------------------------------------
# calibrate(): statistics, candidates, choice and thresholds


def test_statistics_of_is_the_per_class_mean_and_std_over_all_pixels() -> None:
    # Class 0: pixels 1, 2, 3, 5: mean 2.75, std (n - 1) sqrt(8.75 / 3) = 1.707825.
    # Class 1: pixels 4, 6: mean 5, std sqrt(2).
    tr = torch.tensor([[[1.0, 2.0]], [[3.0, 5.0]], [[4.0, 6.0]]])  # (3, 1, 2)
    stats = statistics_of(AnomalyMaps(tr, None), torch.tensor([0, 0, 1]), 2)
    mean, std = stats.teacher_restoration
    assert mean.tolist() == pytest.approx([2.75, 5.0])
    assert std.tolist() == pytest.approx([math.sqrt(8.75 / 3), math.sqrt(2)], abs=1e-6)
    assert math.sqrt(8.75 / 3) == pytest.approx(1.707825, abs=1e-6)
    assert stats.restoration_identity is None


def test_a_calibration_survives_the_checkpoints_plain_dict() -> None:
    calibration = _calibration(scale_weights=[0.5, 1.0, 1.0])
    assert Calibration.from_dict(dataclasses.asdict(calibration)) == calibration
    older = {k: v for k, v in dataclasses.asdict(calibration).items() if k != "scale_weights"}
    assert Calibration.from_dict(older).scale_weights is None  # the plain sum it was made with
    no_identity = _calibration(statistics={"teacher_restoration": [[0.0], [1.0]]})
    assert no_identity.map_statistics().restoration_identity is None


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> list:
    """Three normal images per class, 40 px, of two differently coloured noise textures."""
    root = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(0)
    for name, colour in zip(CLASSES, ((200, 60, 40), (40, 90, 200)), strict=True):
        for i in range(3):
            pixels = np.clip(rng.normal(colour, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            _save(root / name / "train" / "good" / f"{i:03d}.png", pixels)
        _save(root / name / "test" / "good" / "000.png", pixels)
    return [s for s in scan_dataset(root) if s.split == "train"]


@pytest.mark.slow
def test_calibration_thresholds_statistics_and_choice(params_path: Path, held_out) -> None:
    """An untrained model at 32 px: every number is checked against an independent recompute
    (the integration tests check the same on a trained checkpoint)."""
    config, model = _untrained(
        params_path,
        train={"channels_last": False},
        evaluate={"batch_size": 6},  # one batch: one input shape keeps it fast
        calibration={
            "scale_weights": [[1, 1, 1], [0, 1, 1]],
            "restoration_identity": [0.0, 1.0],
            "image_score": ["max", "topk_mean"],
            "margin": 0.0,
        },
    )
    calibration = calibrate(model, config, CLASSES, held_out)

    assert calibration.images == 6 and len(calibration.thresholds) == 2
    # the paper's plain sum, then every candidate of the grid on z-scored maps; with margin 0
    # the chosen one is the first best
    keys = ("normalise", "scale_weights", "restoration_identity", "image_score")
    grid = [tuple(c[k] for k in keys) for c in calibration.candidates]
    plain, fine_dropped = [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]
    assert grid == [
        (False, None, 1.0, "max"),
        *[
            (True, scales, weight, score)
            for scales in (plain, fine_dropped)
            for weight in (0.0, 1.0)
            for score in ("max", "topk_mean")
        ],
    ]
    for candidate in calibration.candidates:
        parts = [candidate[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")]
        assert candidate["score"] == pytest.approx(np.mean(parts))
    best = max(calibration.candidates, key=lambda c: c["score"])  # max keeps the first of ties
    chosen = tuple(getattr(calibration, k) for k in keys)
    assert chosen == tuple(best[k] for k in keys)
    table = candidates_table(calibration)
    assert table["chosen"].sum() == 1 and len(table) == len(grid)
    assert table.loc[table["chosen"], "score"].item() == pytest.approx(100 * best["score"], 1e-3)

    # Recompute the held-out normals' maps and scores with the calibrated scorer.
    batch = next(iter(DataLoader(NormalDataset(held_out, CLASSES, SIZE), batch_size=6)))
    class_ids = batch["class_id"]
    with torch.no_grad():
        output = model(batch["image"], class_ids)
    maps = anomaly_maps(output, (SIZE, SIZE), 2.0, calibration.scale_weights)
    expected = statistics_of(maps, class_ids, 2)
    for key in ("teacher_restoration", "restoration_identity"):
        mean, std = calibration.statistics[key]
        np.testing.assert_allclose(mean, getattr(expected, key)[0].numpy(), rtol=1e-5)
        np.testing.assert_allclose(std, getattr(expected, key)[1].numpy(), rtol=1e-5)
    scores = Scorer.calibrated(config, calibration)(model, batch["image"], class_ids).scores
    for c in range(2):
        own = scores[class_ids == c]
        # the threshold is the highest held-out normal score; the scorer blurs the weighted sum
        # where calibration sums blurred scales, and z-scoring magnifies that float32 rounding
        # (measured: 3.5e-6 relative), hence rel=1e-4 and not exact equality
        assert float(own.max()) == pytest.approx(calibration.thresholds[c], rel=1e-4)


@pytest.mark.slow
def test_calibration_without_identity_decoder_tries_only_the_teacher_map(
    params_path: Path, held_out
) -> None:
    config, model = _untrained(
        params_path, "restoration_only", calibration={"image_score": ["max"]}
    )
    calibration = calibrate(model, config, CLASSES, held_out)
    assert [c["restoration_identity"] for c in calibration.candidates] == [0.0] * 4
    assert set(calibration.statistics) == {"teacher_restoration"}


@pytest.mark.slow
def test_a_candidate_must_beat_the_plain_sum_by_the_margin(params_path: Path, held_out) -> None:
    config, model = _untrained(
        params_path,
        evaluate={"batch_size": 6},
        calibration={"restoration_identity": [0.0, 1.0], "margin": 1.0},
    )
    calibration = calibrate(model, config, CLASSES, held_out)
    # no score can exceed another by a whole unit: the paper's plain sum stays
    assert (calibration.normalise, calibration.restoration_identity) == (False, 1.0)
    assert calibration.image_score == "max"


def test_validation_anomalies_are_a_large_and_a_small_copy() -> None:
    rng = np.random.default_rng(3)
    pixels = torch.from_numpy(rng.uniform(0, 1, (64, 64, 3)).astype(np.float32))
    original = normalize(pixels.numpy())  # (3, 64, 64)
    for index in range(4):  # CutPaste and the noise box, alternating
        (large, large_mask), (small, small_mask) = validation_anomalies(pixels, index)
        assert large.shape == small.shape == (3, 64, 64)
        rows, cols = np.nonzero(small_mask.numpy())
        side = SMALL_WINDOW * 64  # 16 px: the window the small anomaly lies in
        assert len(rows) and np.ptp(rows) < side and np.ptp(cols) < side
        assert large_mask.sum() > small_mask.sum()
        for image, mask in ((large, large_mask), (small, small_mask)):
            outside, inside = mask == 0, mask > 0
            torch.testing.assert_close(image[:, outside], original[:, outside])
            assert not torch.allclose(image[:, inside], original[:, inside])
        again = validation_anomalies(pixels, index)  # a fixed stream per image index
        torch.testing.assert_close(again[1][0], small)


def test_more_validation_copies_keep_the_first_pair_and_add_pairs_of_their_own() -> None:
    rng = np.random.default_rng(5)
    pixels = torch.from_numpy(rng.uniform(0, 1, (48, 48, 3)).astype(np.float32))
    for index in range(2):  # both recipes
        one, three = validation_anomalies(pixels, index), validation_anomalies(pixels, index, 3)
        assert len(one) == 2 and len(three) == 6
        for (image, mask), (same_image, same_mask) in zip(one, three[:2], strict=True):
            torch.testing.assert_close(same_image, image)  # the pipeline's pair comes first
            torch.testing.assert_close(same_mask, mask)
        large_masks = [mask for _, mask in three[0::2]]
        assert not any(torch.equal(large_masks[0], other) for other in large_masks[1:])
        again = validation_anomalies(pixels, index, 3)
        for (image, _), (same_image, _) in zip(three, again, strict=True):
            torch.testing.assert_close(same_image, image)


@pytest.mark.slow
def test_the_validation_set_holds_every_copy_in_order(params_path: Path, held_out) -> None:
    """Six normals, batches of two: two copies make 8 anomalies a batch, scored in two passes
    of 4 (the pass one copy makes); the first pair of each image is the one-copy set's."""
    config, model = _untrained(
        params_path, train={"channels_last": False}, evaluate={"batch_size": 2}
    )
    one = _collect(model, config, CLASSES, held_out, 1)
    two = _collect(model, config, CLASSES, held_out, 2)
    normals = len(held_out)
    assert (one.normals, two.normals) == (normals, normals)
    assert two.labels.tolist() == [0] * normals + [1] * 4 * normals
    ids = [CLASSES.index(s.class_name) for s in held_out]
    assert two.class_ids.tolist() == ids + [i for i in ids for _ in range(4)]
    first_pairs = torch.tensor([4 * i + k for i in range(normals) for k in (0, 1)]) + normals
    ones = torch.arange(normals, 3 * normals)
    torch.testing.assert_close(two.masks[first_pairs], one.masks[ones])
    for many, few in zip(two.maps, one.maps, strict=True):
        torch.testing.assert_close(many[:normals], few[:normals])
        torch.testing.assert_close(many[first_pairs], few[ones])
    with pytest.raises(MddnetError, match="copies: 0 validation pairs"):
        calibrate(model, config, CLASSES, held_out, copies=0)


def test_held_out_samples_are_the_recorded_ones(held_out) -> None:
    roots = [held_out[0].image_path.parents[3]]
    config = load_config(Path(__file__).parents[2] / "params.yaml", "mddnet")
    picked = held_out_samples(["beta/001.png", "alpha/002.png"], config, roots, "ckpt.pt")
    assert [(s.class_name, s.image_path.name) for s in picked] == [
        ("beta", "001.png"),
        ("alpha", "002.png"),
    ]
    assert len(held_out_samples([], config, roots, "ckpt.pt")) == 6  # holdout 0: all normals
    with pytest.raises(MddnetError, match=r"ckpt.pt: 1 held-out .* \(first: alpha/009.png\)"):
        held_out_samples(["alpha/009.png"], config, roots, "ckpt.pt")
