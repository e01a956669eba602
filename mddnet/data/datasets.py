"""Torch datasets feeding the teacher: training pairs (x_n, x_a, M) and labelled test images.

Paper component: the input side of MDD-Net. Each normal training image x_n comes with its
synthetic anomalous copy x_a and mask M [paper], and the class label that supervises the
class-aware memory [paper]. All transforms live here, in one place: resize to S x S (bilinear with
antialiasing for images, nearest for masks so they stay binary) and ImageNet normalisation, which
the pretrained teacher expects.

Training items are reproducible whatever the worker process or fetch order: item i of epoch e
draws all its randomness from `np.random.default_rng([seed, e, i])`. The epoch and the cache of
decoded, resized images live in shared memory, so DataLoader workers (forked anew each epoch, or
persistent) see `set_epoch` and share one cache: PNGs are decoded once per run, not once per epoch
and worker. The cache holds N x S x S x 3 bytes (MVTec AD at 256 px: 0.7 GB).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as tvf

from mddnet.config import SynthesisConfig
from mddnet.data.anomalies import synthesize
from mddnet.data.layout import Sample, load_image, load_mask
from mddnet.imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "NormalDataset",
    "TestDataset",
    "TrainDataset",
    "normalize",
    "resize_image",
    "transform_image",
    "transform_mask",
]

logger = logging.getLogger(__name__)


def resize_image(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> uint8 (S, S, 3), bilinear; Pillow antialiases when it shrinks."""
    if image.mode != "RGB":
        raise ValueError(
            f"resize_image: expected an RGB image, got mode {image.mode!r}; "
            f"read files with mddnet.data.layout.load_image, which converts them"
        )
    return np.array(image.resize((size, size), Image.Resampling.BILINEAR))  # writable copy


def normalize(image: np.ndarray) -> torch.Tensor:
    """float (H, W, 3) in [0, 1] -> ImageNet-normalised float32 tensor (3, H, W)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    return tvf.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)  # (3, H, W)


def transform_image(image: Image.Image, size: int) -> torch.Tensor:
    """The teacher's input transform: RGB PIL image -> normalised float32 tensor (3, S, S)."""
    return normalize(resize_image(image, size) / np.float32(255.0))


def transform_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """bool (H, W) mask -> float32 tensor (1, S, S) in {0, 1}; nearest keeps it binary."""
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (size, size), Image.Resampling.NEAREST
    )
    return torch.from_numpy(np.asarray(resized) > 0).float()[None]  # (1, S, S)


def _class_ids(samples: Sequence[Sample], class_names: Sequence[str]) -> list[int]:
    """Class index of each sample in `class_names`: the memory's rows follow that order."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({s.class_name for s in samples} - index.keys())
    if unknown:
        raise ValueError(
            f"class_names {list(class_names)} lack the sample classes {unknown}; pass the class "
            f"list the model was built with (it must name every class in the samples)"
        )
    return [index[s.class_name] for s in samples]


class TrainDataset(Dataset):
    """Normal training images with their synthetic anomalous copies, at `image_size`.

    Item: {"normal": (3, S, S), "anomalous": (3, S, S) normalised float32, "mask": (1, S, S)
    float32 in {0, 1}, "class_id": int}. Synthesis runs on the resized image (cheap, and the mask
    is then exact at S). For texture_source other_class the foreign texture is a random training
    image of another class; with a single class there is none and synthesis uses procedural
    textures instead (logged once).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_names: Sequence[str],
        image_size: int,
        synthesis: SynthesisConfig,
        seed: int,
    ) -> None:
        wrong = [s.image_path for s in samples if s.split != "train" or s.label != 0]
        if wrong:
            raise ValueError(
                f"TrainDataset takes normal training images only; {wrong[0]} (and "
                f"{len(wrong) - 1} more) is not train/good; pass the samples with split 'train'"
            )
        if not samples:
            raise ValueError("TrainDataset got no samples; scan a dataset with train/good images")
        self.samples = list(samples)
        self.class_names = tuple(class_names)
        self.class_ids = _class_ids(self.samples, class_names)
        self.image_size = image_size
        self.synthesis = synthesis
        self.seed = seed
        ids = np.asarray(self.class_ids)
        # Indices of the training images of every OTHER class: the foreign-texture candidates.
        self._others = {cid: np.flatnonzero(ids != cid) for cid in set(self.class_ids)}
        self._uses_foreign = synthesis.kind in (
            "perlin",
            "perlin_cutpaste",
        ) and synthesis.texture_source in ("other_class", "mixed")
        if self._uses_foreign and len(self._others) == 1:
            logger.warning(
                "texture_source %s needs a second class; only %s is present, so anomalies use "
                "procedural textures",
                synthesis.texture_source,
                self.samples[0].class_name,
            )
        # Shared memory, so DataLoader workers see set_epoch and fill one common cache.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._cache = torch.zeros(
            (len(self.samples), image_size, image_size, 3), dtype=torch.uint8
        ).share_memory_()  # (N, S, S, 3)
        self._cached = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose anomalies items get; call it before each epoch's loader."""
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int) -> np.ndarray:
        """Resized uint8 (S, S, 3) image, decoded from disk on first use only."""
        if not self._cached[index]:
            image = load_image(self.samples[index].image_path)
            self._cache[index] = torch.from_numpy(resize_image(image, self.image_size))
            self._cached[index] = True
        return self._cache[index].numpy()

    def _foreign(self, index: int, rng: np.random.Generator) -> np.ndarray | None:
        """A random training image of another class as float (S, S, 3), or None if none is."""
        others = self._others[self.class_ids[index]]
        if not self._uses_foreign or len(others) == 0:
            return None
        return self._image(int(rng.choice(others))) / np.float32(255.0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        normal = self._image(index) / np.float32(255.0)  # (S, S, 3) in [0, 1]
        anomalous, mask = synthesize(normal, self.synthesis, rng, self._foreign(index, rng))
        return {
            "normal": normalize(normal),
            "anomalous": normalize(anomalous),
            "mask": torch.from_numpy(mask)[None],  # (1, S, S)
            "class_id": self.class_ids[index],
            "index": index,  # where the trainer's cache keeps T(x_n)
        }


class NormalDataset(Dataset):
    """Normal images (training or held-out) as the teacher reads them, with the resized pixels.

    Item: {"image": (3, S, S) normalised float32, "pixels": (S, S, 3) float32 in [0, 1] (the
    input of anomaly synthesis), "class_id": int}.
    """

    def __init__(
        self, samples: Sequence[Sample], class_names: Sequence[str], image_size: int
    ) -> None:
        self.samples = list(samples)
        self.class_ids = _class_ids(self.samples, class_names)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixels = resize_image(load_image(self.samples[index].image_path), self.image_size)
        pixels = pixels / np.float32(255.0)  # (S, S, 3) in [0, 1]
        return {
            "image": normalize(pixels),
            "pixels": torch.from_numpy(pixels),
            "class_id": self.class_ids[index],
        }


class TestDataset(Dataset):
    """Test images with labels and masks (all-zero for good images), at `image_size`.

    Item: {"image": (3, S, S) normalised float32, "mask": (1, S, S) float32 in {0, 1},
    "label": int, "class_id": int, "path": str}. No cache: evaluation reads each image once.
    """

    __test__ = False  # a pytest collection hint: this class is not a test case

    def __init__(
        self, samples: Sequence[Sample], class_names: Sequence[str], image_size: int
    ) -> None:
        self.samples = list(samples)
        self.class_names = tuple(class_names)
        self.class_ids = _class_ids(self.samples, class_names)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = load_image(sample.image_path)
        if sample.mask_path is None:
            mask = torch.zeros((1, self.image_size, self.image_size))
        else:
            mask = transform_mask(load_mask(sample.mask_path, image.size), self.image_size)
        return {
            "image": transform_image(image, self.image_size),
            "mask": mask,  # (1, S, S)
            "label": sample.label,
            "class_id": self.class_ids[index],
            "path": str(sample.image_path),
        }
