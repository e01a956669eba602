"""Converting VisA's official release into the MVTec AD layout that `layout.scan_dataset` reads.

VisA (Zou et al., "SPot-the-Difference Self-Supervised Pre-training for Anomaly Detection and
Segmentation", ECCV 2022) is the second standard benchmark of multi-class unsupervised anomaly
detection, beside MVTec AD [ours: the benchmarks supported first]. The release lists its standard
split in `split_csv/1cls.csv` (columns object, split, label, image, mask; paths relative to the
release root). The converted tree is::

    <dst>/<object>/train/good/<name>        split train, label normal
    <dst>/<object>/test/good/<name>         split test, label normal
    <dst>/<object>/test/bad/<name>          split test, label anomaly
    <dst>/<object>/ground_truth/bad/<image stem>_mask.png

Decisions [ours]:
- Images are copied byte for byte under their original names (VisA ships JPEG). That is lossless
  by construction and keeps the files checksum-identical to the release; re-encoding to PNG would
  keep the decoded pixels too, but triples disk use and time for no gain, since the layout reader
  accepts .jpg.
- Masks are rewritten as 8-bit PNG, 0 = normal and 255 = defect: VisA masks hold small label
  values (any non-zero pixel is defective), which the layout reader rejects as non-binary.
- The whole csv is checked before anything is written, and all files go into a hidden staging
  folder beside `dst` (`.<dst name>.partial`) that is renamed to `dst` after the last file, so
  an interrupted conversion never leaves a tree that looks complete; the next run removes it.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from mddnet.data.layout import GOOD, MASK_SUFFIX, DatasetError, decode_image, image_size

__all__ = ["SPLIT_CSV", "convert_visa"]

log = logging.getLogger(__name__)

SPLIT_CSV = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
_DEFECT = "bad"
# (split, label) -> (split folder, defect type folder) in the MVTec layout
_TARGETS = {
    ("train", "normal"): ("train", GOOD),
    ("test", "normal"): ("test", GOOD),
    ("test", "anomaly"): ("test", _DEFECT),
}


class _Item(NamedTuple):
    """One checked csv row: its source files and where the image goes (relative to the output)."""

    image: Path
    mask: Path | None  # None for normal images
    target: Path  # <object>/<split>/<type>/<file name>

    @property
    def mask_target(self) -> Path:
        obj, _, defect_type, _ = self.target.parts
        return Path(obj, "ground_truth", defect_type, f"{self.target.stem}{MASK_SUFFIX}")


def _check_row(src: Path, where: str, row: dict[str, str]) -> _Item | str:
    """The row as an `_Item`, or the problem with it (a message naming the csv line and fix)."""
    obj, split, label = row["object"], row["split"], row["label"]
    if split not in ("train", "test"):
        return f"{where}: unknown split {split!r} (expected train or test); fix the row"
    if label not in ("normal", "anomaly"):
        return f"{where}: unknown label {label!r} (expected normal or anomaly); fix the row"
    if (split, label) not in _TARGETS:
        return f"{where}: an anomaly in the train split; VisA's 1cls split trains on normal only"
    if not obj or obj.startswith(".") or Path(obj).name != obj:
        return f"{where}: object {obj!r} is not a plain folder name; fix the row"
    image = src / row["image"]
    if not image.is_file():
        return f"{where}: image {image} not found; re-extract the VisA release"
    split_dir, defect_type = _TARGETS[split, label]
    target = Path(obj, split_dir, defect_type, image.name)
    if defect_type == GOOD:
        return _Item(image, None, target)
    if not row["mask"]:
        return f"{where}: anomaly without a mask path; fill the mask column"
    mask = src / row["mask"]
    if not mask.is_file():
        return f"{where}: mask {mask} not found; re-extract the VisA release"
    return _Item(image, mask, target)


def _read_split(src: Path) -> list[_Item]:
    """Every row of `1cls.csv`, checked; all problems are raised together before any write."""
    csv_path = src / SPLIT_CSV
    if not csv_path.is_file():
        raise DatasetError(
            f"{csv_path}: VisA split file not found; pass the root of the VisA release "
            f"(the folder that holds split_csv/ and one folder per object)"
        )
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetError(
                f"{csv_path}: missing column(s) {', '.join(missing)}; the header must be "
                f"{','.join(_COLUMNS)} (VisA's split_csv/1cls.csv)"
            )
        items, problems, first_line = [], [], {}
        for row in reader:
            line = reader.line_num  # of the row's last line; quoted fields may span lines
            where = f"{csv_path}:{line}"
            checked = _check_row(src, where, row)
            if isinstance(checked, str):
                problems.append(checked)
            elif checked.target in first_line:
                problems.append(
                    f"{where}: duplicate of line {first_line[checked.target]} (both write "
                    f"{checked.target}); remove one of the rows"
                )
            else:
                first_line[checked.target] = line
                items.append(checked)
    if problems:
        raise DatasetError(problems)
    if not items:
        raise DatasetError(f"{csv_path}: no rows; use the split file of the VisA release")
    return items


def _write_binary_mask(mask: Path, image: Path, target: Path) -> None:
    """Save VisA's label mask as 0/255 PNG; any non-zero label (in any channel) is defective."""
    label_image, size = decode_image(mask), image_size(image)
    if label_image.size != size:
        raise DatasetError(
            f"{mask}: mask is {label_image.size} but its image {image} is {size} "
            f"(width, height); the release is damaged, re-extract it"
        )
    if len(label_image.getbands()) > 1:
        label_image = label_image.convert("RGB")  # colour labels; an alpha band is dropped
    labels = np.asarray(label_image)  # (H, W) label values or (H, W, 3)
    defect = labels > 0 if labels.ndim == 2 else labels.any(axis=-1)  # (H, W) bool
    Image.fromarray(np.where(defect, 255, 0).astype(np.uint8)).save(target)


def convert_visa(src: str | Path, dst: str | Path) -> dict[str, dict[str, int]]:
    """Convert the VisA release at `src` into MVTec layout at `dst` (which must be new or empty).

    Returns per object the number of images written: `{"candle": {"train_good": 900,
    "test_good": 100, "test_bad": 100}, ...}`. Run `mddnet check-dataset DST` afterwards to decode
    every file (the images are copied, not decoded, here).
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DatasetError(
            f"{dst}: output already exists and is not empty; delete it or choose another folder "
            f"(a conversion never merges into an old tree)"
        )
    items = _read_split(src)
    staging = dst.with_name(f".{dst.name}.partial")
    if staging.exists():
        log.warning("%s: removing the leftover of an interrupted conversion", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)  # unlike tempfile.mkdtemp, honours the umask (not 0700)
    try:
        for item in tqdm(items, desc="converting VisA", unit="image", disable=None):
            (staging / item.target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item.image, staging / item.target)
            if item.mask is not None:
                (staging / item.mask_target).parent.mkdir(parents=True, exist_ok=True)
                _write_binary_mask(item.mask, item.image, staging / item.mask_target)
        if dst.is_dir():
            dst.rmdir()  # empty (checked above); a rename cannot replace a folder portably
        os.replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    keys = [f"{split_dir}_{defect_type}" for split_dir, defect_type in _TARGETS.values()]
    summary = {obj: dict.fromkeys(keys, 0) for obj in sorted({i.target.parts[0] for i in items})}
    for item in items:
        obj, split_dir, defect_type, _ = item.target.parts
        summary[obj][f"{split_dir}_{defect_type}"] += 1
    log.info("converted %d VisA images of %d objects into %s", len(items), len(summary), dst)
    return summary
