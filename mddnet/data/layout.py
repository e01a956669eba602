"""Datasets in MVTec AD layout: the normal training images and the labelled test set.

MDD-Net trains one model on the normal images of all classes and evaluates it per class with image
labels and pixel masks [paper: multi-class unsupervised anomaly detection]. Every dataset this
project reads (MVTec AD, converted VisA, a user's own folder, the generated benchmark) uses one
layout::

    <root>/<class>/train/good/<image>
    <root>/<class>/test/good/<image>
    <root>/<class>/test/<defect type>/<image>
    <root>/<class>/ground_truth/<defect type>/<image stem>_mask.png

`scan_dataset` walks the folders and reads file headers only, so it stays fast on the full
datasets; `validate_dataset` decodes every file and collects all problems (`mddnet
check-dataset`). Nothing is skipped silently: hidden files, files without an image extension and
folders outside the layout are logged as warnings; everything else that is wrong raises
`DatasetError` naming the path and the fix.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image
from skimage.util import img_as_ubyte
from tqdm import tqdm

from mddnet.errors import MddnetError

__all__ = [
    "GOOD",
    "IMAGE_EXTENSIONS",
    "MASK_SUFFIX",
    "DatasetError",
    "Sample",
    "decode_image",
    "image_size",
    "list_classes",
    "load_image",
    "load_mask",
    "scan_dataset",
    "split_holdout",
    "summarize",
    "validate_dataset",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask.png"
GOOD = "good"
_LAYOUT_FOLDERS = ("train", "test", "ground_truth")
# What PIL raises on missing, empty, foreign or truncated files, and on headers claiming more
# pixels than Image.MAX_IMAGE_PIXELS (its decompression-bomb guard, not an OSError).
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DatasetError(MddnetError):
    """A dataset folder or file that cannot be used; the message names the path and the fix.

    It can carry several problems (`problems`), so that one run reports all of them instead of
    making the user fix one file per run.
    """

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems:\n" + "\n".join(
                f"  - {problem}" for problem in self.problems
            )
        super().__init__(message)


@dataclass(frozen=True)
class Sample:
    """One image of the dataset, with its label and, for a defective test image, its mask."""

    class_name: str
    split: str  # "train" or "test"
    label: int  # 0 = good, 1 = defective
    defect_type: str  # "good" or the test sub-folder name
    image_path: Path
    mask_path: Path | None  # None for good images


class _Scan(NamedTuple):
    samples: list[Sample]
    problems: list[str]


def _sort_key(sample: Sample) -> tuple[str, str, str, str]:
    return (sample.class_name, sample.split, sample.defect_type, sample.image_path.name)


def _skip(path: Path, reason: str) -> None:
    log.warning("%s: skipped: %s", path, reason)


def _entries(folder: Path) -> list[Path]:
    """Sorted entries of `folder` without hidden ones (.DS_Store, macOS `._*` files), logged."""
    entries = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            _skip(path, "hidden file or folder")
        else:
            entries.append(path)
    return entries


def _images(folder: Path) -> list[Path]:
    """The files with an image extension directly inside `folder`; anything else is logged."""
    images = []
    for path in _entries(folder):
        if path.is_dir():
            _skip(path, f"a folder; images must lie directly in {folder}")
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            _skip(path, f"not an image file (extensions read: {' '.join(IMAGE_EXTENSIONS)})")
        else:
            images.append(path)
    return images


def _unreadable(path: Path, err: Exception) -> DatasetError:
    empty = path.is_file() and path.stat().st_size == 0
    reason = "empty file, 0 bytes" if empty else f"{type(err).__name__}: {err}"
    return DatasetError(
        f"{path}: not a readable image ({reason}); re-export or re-download it, or delete it"
    )


def _size_mismatch(mask: Path, mask_size: tuple[int, int], size: tuple[int, int]) -> str:
    return (
        f"{mask}: mask is {mask_size[0]}x{mask_size[1]} but its image is {size[0]}x{size[1]}; "
        f"resize the mask to the image size with nearest-neighbour interpolation"
    )


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header alone: PIL decodes no pixels until asked."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.size
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from err


def decode_image(path: str | Path) -> Image.Image:
    """Open and fully decode `path` in its stored mode, so truncated files fail here, not later."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from err


def _as_uint16(image: Image.Image) -> np.ndarray:
    """Pixels of an integer grayscale image (PIL modes I;16*, I) as uint16 (H, W)."""
    return np.clip(np.asarray(image), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def load_image(path: str | Path) -> Image.Image:
    """Decode an image and return it as 8-bit RGB, the teacher's input format.

    Grayscale is replicated to three channels and alpha is dropped. 16-bit grayscale is scaled
    to 8 bits (scikit-image's `img_as_ubyte`, value // 256) because PIL's own conversion clips it
    to 255, which would turn most 16-bit images white.
    """
    image = decode_image(path)
    if image.mode.startswith("I"):
        image = Image.fromarray(img_as_ubyte(_as_uint16(image)))  # (H, W) uint8, mode L
    return image.convert("RGB")


def _mask_channel(image: Image.Image, path: Path) -> np.ndarray:
    """The single channel of a mask: uint8 or uint16 (H, W); colour masks are rejected."""
    if image.mode in ("1", "L"):
        return np.asarray(image.convert("L"))
    if image.mode.startswith("I"):
        return _as_uint16(image)
    rgb = np.asarray(image.convert("RGB"))  # (H, W, 3): palette, LA, RGB and RGBA masks
    if not (rgb == rgb[..., :1]).all():
        raise DatasetError(
            f"{path}: mask has colour (its channels differ); save it as single-channel "
            f"grayscale, 0 = normal, 255 = defect"
        )
    return rgb[..., 0]


def _binarise(values: np.ndarray, path: Path) -> np.ndarray:
    levels = np.unique(values)
    if np.count_nonzero(levels) <= 1:
        return values > 0
    full = int(np.iinfo(values.dtype).max)
    half = full // 2 + 1
    if levels[-1] < half:
        raise DatasetError(
            f"{path}: mask holds several small values {levels[:8].tolist()} (instance or class "
            f"labels?), not a binary mask; save it as 0 = normal, 255 = defect "
            f"(`mddnet convert-visa` does this for VisA)"
        )
    between = int(np.count_nonzero((values > 0) & (values < full)))
    log.warning(
        "%s: mask is not binary (%d distinct values, %d pixels strictly between 0 and %d); "
        "thresholded at %d. Save masks as 0/%d to silence this.",
        path,
        len(levels),
        between,
        full,
        half,
        full,
    )
    return values >= half


def load_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Read a defect mask as a bool (H, W) array, True = defective pixel.

    `size` is its image's (width, height); a different mask size is an error because resizing
    here would hide a mask that belongs to another image. The rule that turns a mask into bool:

    1. It must have one channel: modes 1, L and 16-bit grayscale, or palette/colour/alpha files
       whose colour channels are equal everywhere (gray saved as colour). Colour is an error.
    2. At most one non-zero value (0/255, 0/1, all zero, all one value): non-zero is defective.
    3. Several non-zero values reaching half of full scale (anti-aliased edges of a resized
       mask, JPEG noise): thresholded at half scale (128, or 32768 for 16-bit), with a WARNING
       naming the file.
    4. Several non-zero values all below half scale (instance labels, e.g. raw VisA masks): an
       error, since no single threshold is right for labels.
    """
    path = Path(path)
    actual = image_size(path)
    if actual != tuple(size):
        raise DatasetError(_size_mismatch(path, actual, tuple(size)))
    return _binarise(_mask_channel(decode_image(path), path), path)


def list_classes(root: str | Path) -> list[str]:
    """Sorted class folder names under `root`; loose files there are logged and skipped."""
    root = Path(root)
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "not found"
        raise DatasetError(
            f"{root}: dataset root {state}; pass the folder that holds one sub-folder per class "
            f"(<root>/<class>/train/good/...)"
        )
    classes = []
    for path in _entries(root):
        if path.is_dir():
            classes.append(path.name)
        else:  # dataset metadata (MVTec's license.txt, the benchmark's benchmark.json)
            log.debug("%s: not a class folder, ignored", path)
    if "train" in classes and "test" in classes:
        raise DatasetError(
            f"{root}: looks like a single class folder (it holds train/ and test/); pass its "
            f"parent {root.parent} as the dataset root"
        )
    if not classes:
        raise DatasetError(
            f"{root}: no class folders; the layout is <root>/<class>/train/good/<images>"
        )
    return classes


def _train_samples(class_dir: Path) -> _Scan:
    train, good = class_dir / "train", class_dir / "train" / GOOD
    if train.is_dir():
        for path in _entries(train):
            if path != good:
                _skip(path, "only train/good is read (training uses normal images only)")
    images = _images(good) if good.is_dir() else []
    if not images:
        return _Scan(
            [], [f"{good}: no training images; every class needs its normal images there"]
        )
    return _Scan([Sample(class_dir.name, "train", 0, GOOD, p, None) for p in images], [])


def _test_samples(class_dir: Path) -> _Scan:
    test = class_dir / "test"
    fix = "put normal test images in test/good and defective ones in test/<defect type>"
    if not test.is_dir():
        return _Scan([], [f"{test}: test folder not found; {fix}"])
    samples = []
    for type_dir in _entries(test):
        if not type_dir.is_dir():
            _skip(type_dir, "test images must lie in test/<type>/")
            continue
        images = _images(type_dir)
        if not images:
            _skip(type_dir, "no images in this test folder")
        defect_type = type_dir.name
        for image in images:
            if defect_type == GOOD:
                samples.append(Sample(class_dir.name, "test", 0, GOOD, image, None))
            else:
                mask = class_dir / "ground_truth" / defect_type / f"{image.stem}{MASK_SUFFIX}"
                samples.append(Sample(class_dir.name, "test", 1, defect_type, image, mask))
    return _Scan(samples, [] if samples else [f"{test}: no test images; {fix}"])


def _mask_problem(image: Path, mask: Path) -> str | None:
    """Why a defective image's mask is unusable, from headers only; None when it is fine."""
    if not mask.is_file():
        return (
            f"{image}: defective test image has no mask; expected {mask} "
            f"(single-channel PNG, 255 = defect, same size as the image)"
        )
    try:
        size, mask_size = image_size(image), image_size(mask)
    except DatasetError as err:
        return str(err)
    return None if mask_size == size else _size_mismatch(mask, mask_size, size)


def _warn_unused_masks(class_dir: Path, used: set[Path]) -> None:
    ground_truth = class_dir / "ground_truth"
    if not ground_truth.is_dir():
        return
    for type_dir in _entries(ground_truth):
        paths = _entries(type_dir) if type_dir.is_dir() else [type_dir]
        for path in paths:
            if path not in used:
                _skip(path, "matches no defective test image (test/<type>/<stem>.<ext>)")


def _scan_class(class_dir: Path) -> _Scan:
    entries = _entries(class_dir)
    if not entries:
        return _Scan(
            [], [f"{class_dir}: empty class folder; add train/good and test/ or remove it"]
        )
    for path in entries:
        if path.name not in _LAYOUT_FOLDERS:
            _skip(path, f"not part of the layout ({', '.join(_LAYOUT_FOLDERS)})")
    train, test = _train_samples(class_dir), _test_samples(class_dir)
    samples = train.samples + test.samples
    problems = train.problems + test.problems
    masks = {s.image_path: s.mask_path for s in samples if s.mask_path is not None}
    problems += [p for image, mask in masks.items() if (p := _mask_problem(image, mask))]
    _warn_unused_masks(class_dir, set(masks.values()))
    return _Scan(samples, problems)


def scan_dataset(
    root: str | Path | Sequence[str | Path], classes: Sequence[str] = ()
) -> list[Sample]:
    """All samples of the given classes (all when empty), sorted by class, split, type, name.

    Reads folder listings and the headers of defective images and masks (to match their sizes),
    never the pixels, so it takes seconds on the full datasets. All structural problems are
    collected and raised together as one `DatasetError`. Several roots are read as one dataset
    (their class folders side by side); a class name in two roots is an error.
    """
    if not isinstance(root, str | Path):
        return _scan_roots([Path(r) for r in root], classes)
    root = Path(root)
    available = list_classes(root)
    wanted = sorted(set(classes)) if classes else available
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise DatasetError(
            f"{root}: no class folder {', '.join(map(repr, unknown))} (available: "
            f"{', '.join(available)}); fix the class names (--classes or data.classes)"
        )
    samples, problems = [], []
    for name in wanted:
        scan = _scan_class(root / name)
        samples += scan.samples
        problems += scan.problems
    if problems:
        raise DatasetError(problems)
    return sorted(samples, key=_sort_key)


def _scan_roots(roots: Sequence[Path], classes: Sequence[str]) -> list[Sample]:
    if len(roots) == 1:
        return scan_dataset(roots[0], classes)
    owner: dict[str, Path] = {}
    for root in roots:
        for name in list_classes(root):
            if name in owner:
                raise DatasetError(
                    f"class {name!r} is in two dataset roots, {owner[name]} and {root}; "
                    f"a class must come from one root (rename a folder or drop a root)"
                )
            owner[name] = root
    unknown = sorted(set(classes) - owner.keys())
    if unknown:
        raise DatasetError(
            f"no class folder {', '.join(map(repr, unknown))} in {', '.join(map(str, roots))} "
            f"(available: {', '.join(sorted(owner))}); fix data.classes"
        )
    wanted = set(classes) or owner.keys()
    samples = []
    for root in roots:
        names = [name for name in list_classes(root) if name in wanted]
        samples += scan_dataset(root, names) if names else []
    return sorted(samples, key=_sort_key)


def split_holdout(samples: Sequence[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """(kept, held out): `fraction` of each class's training normals held out, at least one
    image per class when the fraction is > 0, and never a class's only image.

    The split is a fixed function of the file names (every 1/fraction-th image in name order,
    from the last), so every seed and variant holds out the same images.
    """
    kept, held = [], []
    for _, group in itertools.groupby(sorted(samples, key=_sort_key), lambda s: s.class_name):
        group = list(group)
        count = min(len(group) - 1, math.ceil(fraction * len(group))) if fraction > 0 else 0
        chosen = set(np.linspace(len(group) - 1, 0, count, dtype=int).tolist()) if count else set()
        for index, sample in enumerate(group):
            (held if index in chosen else kept).append(sample)
    return kept, held


def validate_dataset(samples: Sequence[Sample]) -> list[str]:
    """Decode every image and mask; return all problems found (empty when the data is sound).

    The slow, complete check behind `mddnet check-dataset`: it reports every broken file at once
    rather than the first one a training run happens to reach.
    """
    problems = []
    for sample in tqdm(samples, desc="decoding", unit="image", disable=None):
        try:
            image = load_image(sample.image_path)
            if sample.mask_path is not None:
                load_mask(sample.mask_path, image.size)
        except DatasetError as err:
            problems.append(str(err))
    return problems


def summarize(samples: Sequence[Sample]) -> pd.DataFrame:
    """One row per class: image counts, defect types and the distinct image sizes (headers)."""
    rows = []
    for name, group in itertools.groupby(sorted(samples, key=_sort_key), lambda s: s.class_name):
        group = list(group)
        sizes = sorted({image_size(s.image_path) for s in group})
        rows.append(
            {
                "class": name,
                "train_good": sum(s.split == "train" for s in group),
                "test_good": sum(s.split == "test" and s.label == 0 for s in group),
                "test_defective": sum(s.label == 1 for s in group),
                "defect_types": ", ".join(sorted({s.defect_type for s in group if s.label})),
                "image_sizes": ", ".join(f"{w}x{h}" for w, h in sizes),
            }
        )
    columns = ["class", "train_good", "test_good", "test_defective", "defect_types", "image_sizes"]
    return pd.DataFrame(rows, columns=columns)
