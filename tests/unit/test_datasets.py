"""Torch datasets: transforms pinned to hand computations, reproducible synthesis, one decode."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mddnet.config import SynthesisConfig
from mddnet.data import datasets
from mddnet.data.datasets import (
    NormalDataset,
    TestDataset,
    TrainDataset,
    normalize,
    resize_image,
    transform_image,
    transform_mask,
)
from mddnet.data.layout import scan_dataset
from mddnet.imagenet import IMAGENET_MEAN, IMAGENET_STD

SIZE = 32
CLASSES = ["alpha", "beta"]
COLOURS = {"alpha": (200, 30, 30), "beta": (20, 40, 220)}
SYNTHESIS = SynthesisConfig(
    kind="perlin",
    probability=1.0,
    strength=(0.2, 1.0),
    texture_source="mixed",
    perlin_max_scale=4,
    threshold=0.5,
)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Two classes in MVTec layout, 48x40 images: 3 train/good, 1 test/good, 1 test/crack."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        base = tmp_path / name
        for i in range(3):
            image = np.clip(rng.normal(COLOURS[name], 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            _save(base / "train" / "good" / f"{i:03d}.png", image)
        _save(base / "test" / "good" / "000.png", np.full((40, 48, 3), 128, np.uint8))
        _save(base / "test" / "crack" / "000.png", np.full((40, 48, 3), 90, np.uint8))
        mask = np.zeros((40, 48), np.uint8)
        mask[:20, 24:] = 255  # top-right quarter
        _save(base / "ground_truth" / "crack" / "000_mask.png", mask)
    return tmp_path


def _train(root: Path, synthesis: SynthesisConfig = SYNTHESIS, **kwargs) -> TrainDataset:
    samples = [s for s in scan_dataset(root) if s.split == "train"]
    return TrainDataset(samples, kwargs.pop("class_names", CLASSES), SIZE, synthesis, seed=3)


def _assert_items_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        else:
            assert a[key] == b[key]


def test_transform_image_normalises_a_constant_colour_as_computed_by_hand() -> None:
    image = Image.new("RGB", (48, 40), (255, 128, 0))
    tensor = transform_image(image, SIZE)
    assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == torch.float32
    # (value / 255 - mean) / std per channel
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    assert expected == pytest.approx([2.248908, 0.205182, -1.804444], abs=1e-6)
    for channel, value in enumerate(expected):
        torch.testing.assert_close(
            tensor[channel], torch.full((SIZE, SIZE), value), rtol=0, atol=1e-5
        )


def _pixels(normalised: torch.Tensor) -> torch.Tensor:
    """Undo `normalize` by hand: (3, H, W) -> the same in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return normalised * std + mean


def test_normalize_is_channels_first_minus_mean_over_std() -> None:
    image = np.random.default_rng(0).random((8, 9, 3)).astype(np.float32)
    normalised = normalize(image)
    assert normalised.shape == (3, 8, 9) and normalised.dtype == torch.float32
    torch.testing.assert_close(
        _pixels(normalised).permute(1, 2, 0), torch.from_numpy(image), atol=1e-6, rtol=0
    )


def test_image_resize_antialiases_fine_detail() -> None:
    # A 1-px checkerboard shrunk 8x must become grey; point sampling would keep 0 or 255.
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = Image.fromarray(np.stack([board] * 3, axis=-1))
    resized = resize_image(image, 8)
    assert resized.shape == (8, 8, 3) and resized.dtype == np.uint8
    assert np.all(np.abs(resized.astype(int) - 127.5) < 16)


def test_resize_image_refuses_non_rgb_input() -> None:
    with pytest.raises(ValueError, match="load_image"):
        resize_image(Image.new("L", (4, 4)), 2)


def test_mask_resize_is_nearest_and_stays_binary() -> None:
    mask = np.zeros((4, 4), bool)
    mask[:2, 2:] = True  # top-right 2x2 block
    up = transform_mask(mask, 8)  # (1, 8, 8)
    expected = np.zeros((8, 8), np.float32)
    expected[:4, 4:] = 1.0
    np.testing.assert_array_equal(up[0].numpy(), expected)
    # Shrinking 2x, nearest takes the source pixel under each output centre, (2i + 1, 2j + 1):
    # isolated pixels survive or vanish whole, where any averaging would blur or drop them all.
    sparse = np.random.default_rng(0).random((8, 8)) < 0.3
    down = transform_mask(sparse, 4)
    assert down.dtype == torch.float32
    np.testing.assert_array_equal(down[0].numpy(), sparse[1::2, 1::2].astype(np.float32))


def test_same_seed_epoch_and_index_give_identical_items_in_any_fetch_order(root: Path) -> None:
    first, second = _train(root), _train(root)
    for dataset in (first, second):
        dataset.set_epoch(2)
    forward = [first[i] for i in range(len(first))]
    backward = [second[i] for i in reversed(range(len(second)))][::-1]
    for a, b in zip(forward, backward, strict=True):
        _assert_items_equal(a, b)


def test_a_different_epoch_gives_a_different_anomaly(root: Path) -> None:
    dataset = _train(root)
    epoch0 = [dataset[i]["mask"] for i in range(len(dataset))]
    dataset.set_epoch(1)
    epoch1 = [dataset[i]["mask"] for i in range(len(dataset))]
    assert all(not torch.equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))
    dataset.set_epoch(0)
    assert all(torch.equal(a, dataset[i]["mask"]) for i, a in enumerate(epoch0))


@pytest.mark.parametrize(
    "synthesis",
    [SYNTHESIS, dataclasses.replace(SYNTHESIS, kind="simplex")],
    ids=["perlin", "simplex"],
)
def test_anomalous_equals_normal_exactly_outside_the_mask(root: Path, synthesis) -> None:
    dataset = _train(root, synthesis)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            item = dataset[i]
            changed = (item["anomalous"] != item["normal"]).any(dim=0)  # (S, S)
            assert item["mask"].shape == (1, SIZE, SIZE) and item["mask"].any()
            torch.testing.assert_close(changed.float(), item["mask"][0], rtol=0, atol=0)


def test_other_class_texture_is_a_training_image_of_another_class(root: Path) -> None:
    constant = root / "constant"
    for name in CLASSES:
        for i in range(2):
            _save(
                constant / name / "train" / "good" / f"{i}.png",
                np.full((40, 48, 3), COLOURS[name], np.uint8),
            )
        _save(constant / name / "test" / "good" / "0.png", np.zeros((40, 48, 3), np.uint8))
    synthesis = dataclasses.replace(SYNTHESIS, texture_source="other_class", strength=(1.0, 1.0))
    dataset = _train(constant, synthesis)
    for i in range(len(dataset)):
        item = dataset[i]
        other = "beta" if dataset.samples[i].class_name == "alpha" else "alpha"
        inside = _pixels(item["anomalous"])[:, item["mask"][0] == 1] * 255  # (3, P)
        expected = torch.tensor(COLOURS[other], dtype=torch.float32)[:, None]
        torch.testing.assert_close(inside, expected.expand_as(inside), atol=1e-3, rtol=0)


def test_class_ids_follow_the_order_of_class_names(root: Path) -> None:
    dataset = _train(root, class_names=["beta", "alpha"])
    ids = {s.class_name: dataset[i]["class_id"] for i, s in enumerate(dataset.samples)}
    assert ids == {"beta": 0, "alpha": 1}
    with pytest.raises(ValueError, match=r"lack the sample classes \['beta'\]"):
        _train(root, class_names=["alpha"])


def test_train_dataset_refuses_test_samples(root: Path) -> None:
    test_samples = [s for s in scan_dataset(root) if s.split == "test"]
    with pytest.raises(ValueError, match="not train/good"):
        TrainDataset(test_samples, CLASSES, SIZE, SYNTHESIS, seed=0)


def test_one_class_falls_back_to_procedural_textures(root: Path, caplog) -> None:
    samples = [s for s in scan_dataset(root, ["alpha"]) if s.split == "train"]
    synthesis = dataclasses.replace(SYNTHESIS, texture_source="other_class")
    with caplog.at_level(logging.WARNING, logger="mddnet.data.datasets"):
        dataset = TrainDataset(samples, ["alpha"], SIZE, synthesis, seed=0)
    assert "procedural textures" in caplog.text
    assert all(dataset[i]["mask"].any() for i in range(len(dataset)))


def test_test_dataset_returns_labels_paths_and_zero_masks_for_good_images(root: Path) -> None:
    samples = [s for s in scan_dataset(root) if s.split == "test"]
    dataset = TestDataset(samples, CLASSES, SIZE)
    items = [dataset[i] for i in range(len(dataset))]
    assert [(it["label"], it["class_id"]) for it in items] == [(1, 0), (0, 0), (1, 1), (0, 1)]
    assert [Path(it["path"]) for it in items] == [s.image_path for s in samples]
    expected = torch.zeros((1, SIZE, SIZE))
    expected[0, : SIZE // 2, SIZE // 2 :] = 1.0  # the top-right quarter, resized
    for item in items:
        assert item["image"].shape == (3, SIZE, SIZE)
        torch.testing.assert_close(item["mask"], expected * item["label"], rtol=0, atol=0)
    # 90 grey of the crack image, normalised: channel 0 is (90/255 - 0.485) / 0.229
    assert items[0]["image"][0, 0, 0].item() == pytest.approx((90 / 255 - 0.485) / 0.229, 1e-5)


def test_each_training_image_is_decoded_once_across_epochs(root: Path, monkeypatch) -> None:
    calls: list[Path] = []

    def counting_load(path):
        calls.append(Path(path))
        return Image.open(path).convert("RGB")

    monkeypatch.setattr(datasets, "load_image", counting_load)
    dataset = _train(root)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            dataset[i]
    assert sorted(calls) == sorted(s.image_path for s in dataset.samples)


def test_normal_dataset_gives_the_image_its_pixels_and_class(root: Path) -> None:
    samples = [s for s in scan_dataset(root) if s.split == "train"]
    dataset = NormalDataset(samples, ["beta", "alpha"], SIZE)
    assert len(dataset) == 6
    for i, sample in enumerate(samples):
        item = dataset[i]
        assert item["class_id"] == ["beta", "alpha"].index(sample.class_name)
        assert item["pixels"].shape == (SIZE, SIZE, 3) and item["pixels"].dtype == torch.float32
        assert item["pixels"].min() >= 0 and item["pixels"].max() <= 1
        # the image is the pixels normalised, as the teacher reads them in training
        torch.testing.assert_close(item["image"], normalize(item["pixels"].numpy()))
        expected = resize_image(Image.open(sample.image_path).convert("RGB"), SIZE) / 255
        np.testing.assert_allclose(item["pixels"].numpy(), expected, atol=1e-6)
    # held-out images may be test images too: the class is all it needs
    test = [s for s in scan_dataset(root) if s.split == "test"]
    assert NormalDataset(test, CLASSES, SIZE)[0]["image"].shape == (3, SIZE, SIZE)


def test_dataloader_collates_batches_of_two(root: Path) -> None:
    train = next(iter(DataLoader(_train(root), batch_size=2)))
    assert train["normal"].shape == train["anomalous"].shape == (2, 3, SIZE, SIZE)
    assert train["mask"].shape == (2, 1, SIZE, SIZE)
    assert train["class_id"].tolist() == [0, 0]
    samples = [s for s in scan_dataset(root) if s.split == "test"]
    test = next(iter(DataLoader(TestDataset(samples, CLASSES, SIZE), batch_size=2)))
    assert test["image"].shape == (2, 3, SIZE, SIZE) and test["label"].tolist() == [1, 0]
    assert len(test["path"]) == 2 and test["path"][0].endswith("crack/000.png")


@pytest.mark.parametrize("persistent", [False, True])
def test_worker_processes_see_set_epoch_and_share_the_cache(
    root: Path, monkeypatch, persistent: bool
) -> None:
    dataset, reference = _train(root), _train(root)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, persistent_workers=persistent)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        reference.set_epoch(epoch)
        batches = list(loader)
        expected = list(DataLoader(reference, batch_size=2))
        for got, want in zip(batches, expected, strict=True):
            _assert_items_equal(got, want)

    def refuse(path):
        raise AssertionError(f"{path} decoded again: the workers' cache was not shared")

    monkeypatch.setattr(datasets, "load_image", refuse)
    for i in range(len(dataset)):
        dataset[i]


@pytest.mark.real_data
def test_real_mvtec_images_give_exact_masks_and_binary_test_masks(real_data: Path) -> None:
    root = real_data / "mvtec_ad_mini"
    samples = scan_dataset(root, ["bottle", "carpet"])
    train = TrainDataset(
        [s for s in samples if s.split == "train"], ["bottle", "carpet"], 64, SYNTHESIS, seed=0
    )
    for i in range(0, len(train), 3):
        item = train[i]
        changed = (item["anomalous"] != item["normal"]).any(dim=0)
        torch.testing.assert_close(changed.float(), item["mask"][0], rtol=0, atol=0)
        assert item["normal"].min() > -2.2 and item["normal"].max() < 2.7  # ImageNet range
    test = TestDataset([s for s in samples if s.split == "test"], ["bottle", "carpet"], 64)
    for i in range(len(test)):
        item = test[i]
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert bool(item["mask"].any()) == bool(item["label"])
