"""Why a trained model scores as it does, measured on validation data only [ours].

Three questions of issue 11, answered per class on the normals a run held out of training and on
the calibration's synthetic anomalies made from them (`calibration.validation_anomalies`), never on
test images:

- Does D_R restore normal surfaces? `tr_normal`: the held-out normals' mean TR discrepancy.
- Does the RI map add to TR? `r_normals`, `r_anomalous`: the Pearson correlation of the two maps'
  pixels; `tr_contrast`, `ri_contrast`: each map's mean inside the anomalies over its mean on the
  normals. Two maps that correlate near 1 carry one signal, whatever the fusion weight.
- Does the memory act on D_R's input? `gate_*`: the gated memory's mean g (z + g (read-out - z)) on
  normal positions, inside the anomalies and outside them; g = 0 leaves z as it is.
  `cosine_*`: cosine of z to its class's nearest prototype; a memory can only rewrite the
  positions it tells apart from normal ones.

Maps are the plain sum over scales, blurred as at evaluation. The memory is measured on z's grid,
where a cell is "inside" when the mask covers at least half of it. Not a pipeline stage:
`mddnet diagnose CHECKPOINT --params P` prints the table; the README's diagnostic paragraphs cite
it. CPU only, in float32.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from mddnet.calibration import held_out_samples, validation_anomalies
from mddnet.checkpoint import load_trained_model
from mddnet.config import Config
from mddnet.data.datasets import NormalDataset
from mddnet.data.layout import Sample
from mddnet.io import load_checkpoint
from mddnet.models.mddnet import MDDNet
from mddnet.scoring import anomaly_maps

__all__ = ["COLUMNS", "Moments", "diagnose", "diagnose_checkpoint"]

COLUMNS = (
    "held_out_normals",
    "tr_normal",
    "r_normals",
    "r_anomalous",
    "tr_contrast",
    "ri_contrast",
    "gate_normal",
    "gate_inside",
    "gate_outside",
    "cosine_normal",
    "cosine_inside",
)


class Moments:
    """Running sums of paired values (float64), enough for their means and Pearson correlation
    without keeping every pixel of every map."""

    def __init__(self) -> None:
        self.n = 0
        self.x = self.y = self.xx = self.yy = self.xy = 0.0

    def add(self, x: Tensor, y: Tensor | None = None) -> None:
        x = x.double().flatten()
        y = x if y is None else y.double().flatten()
        self.n += x.numel()
        self.x += float(x.sum())
        self.y += float(y.sum())
        self.xx += float((x * x).sum())
        self.yy += float((y * y).sum())
        self.xy += float((x * y).sum())

    def mean(self) -> float:
        return self.x / self.n if self.n else math.nan

    def mean_y(self) -> float:
        return self.y / self.n if self.n else math.nan

    def correlation(self) -> float:
        if not self.n:
            return math.nan
        mx, my = self.x / self.n, self.y / self.n
        cov = self.xy / self.n - mx * my
        var_x, var_y = self.xx / self.n - mx * mx, self.yy / self.n - my * my
        return cov / math.sqrt(var_x * var_y) if var_x > 0 and var_y > 0 else math.nan


@contextmanager
def _memory_probe(model: MDDNet) -> Iterator[dict[str, Tensor]]:
    """Records, per forward pass, the embedding z the memory reads (`z`) and, in `gated` mode,
    the gate g (`gate`), both (B, 1 or D, h, w)."""
    seen: dict[str, Tensor] = {}
    memory = model.memory
    hooks = []
    if memory is not None:
        hooks.append(memory.register_forward_hook(lambda m, args, out: seen.update(z=args[0])))
        if memory.gate is not None:
            hooks.append(
                memory.gate.register_forward_hook(
                    lambda m, args, out: seen.update(gate=torch.sigmoid(out))
                )
            )
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def _nearest_cosine(model: MDDNet, z: Tensor, class_ids: Tensor) -> Tensor:
    """(B, 1, h, w) cosine of each position of z to its class's nearest prototype."""
    queries = F.normalize(z.flatten(2), dim=1)  # (B, D, N)
    keys = F.normalize(model.memory.prototypes[class_ids], dim=-1)  # (B, K, D)
    return (keys @ queries).amax(dim=1).view(z.shape[0], 1, *z.shape[-2:])


class _Pass:
    """One forward pass: the plain-sum maps (B, H, W) and, with a memory, z's diagnostics."""

    def __init__(self, model: MDDNet, images: Tensor, class_ids: Tensor, blur: float) -> None:
        with _memory_probe(model) as seen:
            output = model(images, class_ids if model.memory is not None else None)
        maps = anomaly_maps(output, images.shape[-2:], blur)
        self.tr = maps.teacher_restoration.float()
        self.ri = maps.restoration_identity
        self.gate = seen.get("gate")
        self.cosine = None if "z" not in seen else _nearest_cosine(model, seen["z"], class_ids)


@torch.no_grad()
def diagnose(model: MDDNet, class_names: Sequence[str], samples: Sequence[Sample],
             image_size: int, blur: float, batch_size: int = 8) -> pd.DataFrame:  # fmt: skip
    """One row per class (`COLUMNS`): NaN where the model lacks the part a column measures."""
    model = model.eval()
    sums: dict[tuple[int, str], Moments] = defaultdict(Moments)
    images: Counter[int] = Counter()
    loader = DataLoader(NormalDataset(samples, class_names, image_size), batch_size=batch_size)
    for start, batch in enumerate(loader):
        made = [
            pair
            for i, pixels in enumerate(batch["pixels"])
            for pair in validation_anomalies(pixels, start * batch_size + i)
        ]
        ids = batch["class_id"]
        copies = ids.repeat_interleave(len(made) // len(ids))
        masks = torch.stack([mask for _, mask in made]) > 0.5  # (M, H, W)
        normal = _Pass(model, batch["image"], ids, blur)
        anomalous = _Pass(model, torch.stack([image for image, _ in made]), copies, blur)
        for c in ids.unique().tolist():
            own, copy = ids == c, copies == c
            images[c] += int(own.sum())
            _add_maps(sums, c, normal, anomalous, own, copy, masks)
            _add_memory(sums, c, normal, anomalous, own, copy, masks)
    return _table(sums, images, class_names, has_identity=model.identity_decoder is not None)


def _add_maps(sums: dict, c: int, normal: _Pass, anomalous: _Pass, own: Tensor, copy: Tensor,
              masks: Tensor) -> None:  # fmt: skip
    inside = masks[copy]
    sums[c, "normals"].add(*_rows(normal, own))  # without RI, Moments pairs TR with itself
    tr, ri = _rows(anomalous, copy)
    sums[c, "anomalous"].add(tr, ri)
    sums[c, "inside"].add(tr[inside], None if ri is None else ri[inside])


def _rows(maps: _Pass, rows: Tensor) -> tuple[Tensor, Tensor | None]:
    """The TR and RI maps of the images `rows` selects; RI None without an identity decoder."""
    return maps.tr[rows], None if maps.ri is None else maps.ri[rows]


def _add_memory(sums: dict, c: int, normal: _Pass, anomalous: _Pass, own: Tensor, copy: Tensor,
                masks: Tensor) -> None:  # fmt: skip
    if normal.cosine is None:
        return
    cells = F.adaptive_avg_pool2d(masks[copy, None].float(), normal.cosine.shape[-2:]) >= 0.5
    sums[c, "cosine_normal"].add(normal.cosine[own])
    sums[c, "cosine_inside"].add(anomalous.cosine[copy][cells])
    if normal.gate is not None:
        sums[c, "gate_normal"].add(normal.gate[own])
        sums[c, "gate_inside"].add(anomalous.gate[copy][cells])
        sums[c, "gate_outside"].add(anomalous.gate[copy][~cells])


def _table(sums: dict, images: Counter[int], class_names: Sequence[str], has_identity: bool
           ) -> pd.DataFrame:  # fmt: skip
    rows = {}
    for c, name in enumerate(class_names):
        if not images[c]:
            continue  # the class held no normal out
        normals, inside = sums[c, "normals"], sums[c, "inside"]
        row = {key: sums[c, key].mean() for key in COLUMNS if key.startswith(("gate", "cosine"))}
        row |= {
            "held_out_normals": images[c],
            "tr_normal": normals.mean(),
            "r_normals": normals.correlation() if has_identity else math.nan,
            "r_anomalous": sums[c, "anomalous"].correlation() if has_identity else math.nan,
            "tr_contrast": inside.mean() / normals.mean(),
            "ri_contrast": inside.mean_y() / normals.mean_y() if has_identity else math.nan,
        }
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(COLUMNS))


def diagnose_checkpoint(
    config: Config, checkpoint: str | Path, roots: Sequence[str | Path] | None = None
) -> pd.DataFrame:
    """`diagnose` on the normals a checkpoint's training held out, as `calibrate_checkpoint`
    reads them: `config` gives the data roots (unless `roots`), image size and blur; the model
    is the checkpoint's own."""
    trained = load_trained_model(checkpoint, "cpu")
    roots = [Path(r) for r in roots] if roots is not None else list(config.data.root_paths())
    recorded = load_checkpoint(checkpoint).get("held_out", [])
    samples = held_out_samples(recorded, config, roots, str(checkpoint))
    return diagnose(
        trained.model, trained.class_names, samples, config.data.image_size,
        config.evaluate.blur_sigma, config.evaluate.batch_size,
    )  # fmt: skip
