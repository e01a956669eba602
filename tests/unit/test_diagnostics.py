"""`mddnet.diagnostics`: each column against a hand-derived value or an independent recompute."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from mddnet import diagnostics
from mddnet.calibration import validation_anomalies
from mddnet.config import Config, load_config
from mddnet.data.datasets import NormalDataset, normalize
from mddnet.data.layout import scan_dataset
from mddnet.diagnostics import COLUMNS, Moments, diagnose
from mddnet.models import build_model
from mddnet.models.mddnet import MDDNet
from mddnet.scoring import anomaly_maps

SIZE = 32
CLASSES = ("alpha", "beta")
BLUR = 1.0


def test_moments_match_numpy_over_chunks() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=500)
    y = 0.6 * x + rng.normal(size=500)
    moments = Moments()
    for part in np.array_split(np.arange(500), 7):
        moments.add(torch.from_numpy(x[part]).float(), torch.from_numpy(y[part]).float())
    assert moments.n == 500
    assert moments.mean() == pytest.approx(x.astype(np.float32).mean(), rel=1e-6)
    assert moments.mean_y() == pytest.approx(y.astype(np.float32).mean(), rel=1e-6)
    expected = np.corrcoef(x.astype(np.float32), y.astype(np.float32))[0, 1]
    assert moments.correlation() == pytest.approx(expected, rel=1e-6)


def test_moments_of_nothing_or_a_constant_have_no_correlation() -> None:
    empty = Moments()
    assert math.isnan(empty.mean()) and math.isnan(empty.correlation())
    constant = Moments()
    constant.add(torch.ones(4), torch.arange(4.0))
    assert math.isnan(constant.correlation())


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> list:
    """Two normal images per class, 40 px, of two differently coloured noise textures."""
    root = tmp_path_factory.mktemp("diagnostics")
    rng = np.random.default_rng(0)
    for name, colour in zip(CLASSES, ((200, 60, 40), (40, 90, 200)), strict=True):
        folder = root / name / "train" / "good"
        folder.mkdir(parents=True)
        for i in range(2):
            pixels = np.clip(rng.normal(colour, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        (root / name / "test" / "good").mkdir(parents=True)
        Image.fromarray(pixels).save(root / name / "test" / "good" / "000.png")
    return [s for s in scan_dataset(root) if s.split == "train"]


def _config(params_path: Path, variant: str, **model: object) -> Config:
    overrides = {"model": {"weights": "none", **model}, "data": {"image_size": SIZE}}
    return load_config(params_path, variant, overrides=overrides)


def _model(params_path: Path, variant: str = "mddnet", **model: object) -> MDDNet:
    torch.manual_seed(0)
    return build_model(_config(params_path, variant, **model).model, len(CLASSES)).eval()


def _diagnose(model: MDDNet, held_out: list, batch_size: int = 3):
    return diagnose(model, CLASSES, held_out, SIZE, BLUR, batch_size)


def _batches(held_out: list):
    """(images, class_ids, anomalous images, their class_ids) of all held-out normals at once."""
    batch = next(iter(DataLoader(NormalDataset(held_out, CLASSES, SIZE), batch_size=64)))
    made = [pair for i, p in enumerate(batch["pixels"]) for pair in validation_anomalies(p, i)]
    copies = batch["class_id"].repeat_interleave(len(made) // len(batch["class_id"]))
    return batch["image"], batch["class_id"], torch.stack([m[0] for m in made]), copies


@pytest.mark.slow
def test_the_normal_discrepancy_is_the_maps_mean_whatever_the_batching(
    params_path: Path, held_out
) -> None:
    model = _model(params_path)
    table = _diagnose(model, held_out)
    assert list(table.columns) == list(COLUMNS) and list(table.index) == list(CLASSES)
    assert table["held_out_normals"].tolist() == [2, 2]
    images, ids, _, _ = _batches(held_out)
    with torch.no_grad():
        maps = anomaly_maps(model(images, ids), (SIZE, SIZE), BLUR).teacher_restoration
    for c, name in enumerate(CLASSES):
        expected = float(maps[ids == c].double().mean())
        assert table.loc[name, "tr_normal"] == pytest.approx(expected, rel=1e-5)
    # the anomalies depend on each image's place in the list, not on the batch it falls in
    other = _diagnose(model, held_out, batch_size=1)
    np.testing.assert_allclose(other.to_numpy(float), table.to_numpy(float), rtol=1e-5)


class _TeacherCopy(nn.Module):
    """An identity decoder that returns the teacher's maps exactly."""

    def forward(self, z: torch.Tensor, teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(teacher)


@pytest.mark.slow
def test_an_identity_decoder_that_copies_the_teacher_makes_ri_repeat_tr(
    params_path: Path, held_out
) -> None:
    model = _model(params_path)
    model.identity_decoder = _TeacherCopy()  # RI = 1 - cos(D_R, T) = TR, pixel for pixel
    table = _diagnose(model, held_out)
    np.testing.assert_allclose(table["r_normals"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(table["r_anomalous"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(table["ri_contrast"], table["tr_contrast"], rtol=1e-5)
    assert (table["tr_contrast"] > 0).all()


def _left_half_anomaly(pixels: torch.Tensor, index: int) -> list:
    """One anomalous copy whose mask is the left half: at 32 px z is one cell, half covered,
    so it counts as inside (the real validation anomalies rarely cover half of it)."""
    image = normalize(pixels.numpy())
    image[:, :, : SIZE // 2] = torch.linspace(-2, 2, SIZE // 2)
    mask = torch.zeros(SIZE, SIZE)
    mask[:, : SIZE // 2] = 1
    return [(image, mask)]


@pytest.mark.slow
def test_a_constant_gate_is_read_back_everywhere(params_path: Path, held_out, monkeypatch) -> None:
    monkeypatch.setattr(diagnostics, "validation_anomalies", _left_half_anomaly)
    model = _model(params_path)
    assert model.memory.mode == "gated"
    with torch.no_grad():
        model.memory.gate.weight.zero_()
        model.memory.gate.bias.fill_(math.log(0.25 / 0.75))  # sigmoid -> 0.25
    table = _diagnose(model, held_out)
    for column in ("gate_normal", "gate_inside"):
        np.testing.assert_allclose(table[column], 0.25, rtol=1e-6)
    assert table["gate_outside"].isna().all()  # z's one cell is inside


@pytest.mark.slow
def test_the_prototype_cosine_matches_a_direct_recompute(
    params_path: Path, held_out, monkeypatch
) -> None:
    monkeypatch.setattr(diagnostics, "validation_anomalies", _left_half_anomaly)
    model = _model(params_path)
    table = _diagnose(model, held_out)
    images, ids, _, _ = _batches(held_out)
    with torch.no_grad():
        z = model.bottleneck(model.teacher(images))  # (B, D, h, w)
        vectors = z.permute(0, 2, 3, 1)  # (B, h, w, D)
        for c, name in enumerate(CLASSES):
            own = vectors[ids == c].reshape(-1, 1, z.shape[1])  # (P, 1, D)
            cosine = F.cosine_similarity(own, model.memory.prototypes[c][None], dim=-1)
            expected = float(cosine.amax(dim=1).double().mean())
            assert table.loc[name, "cosine_normal"] == pytest.approx(expected, rel=1e-5)
    assert ((table["cosine_inside"] >= -1) & (table["cosine_inside"] <= 1)).all()
    assert (table["cosine_inside"] != table["cosine_normal"]).all()


@pytest.mark.slow
def test_parts_the_model_lacks_are_nan(params_path: Path, held_out) -> None:
    model = _model(params_path, "rd_baseline")
    assert model.identity_decoder is None and model.memory is None
    table = _diagnose(model, held_out)
    lacking = [c for c in COLUMNS if c.startswith(("r_", "ri_", "gate", "cosine"))]
    assert table[lacking].isna().all().all()
    assert table[["tr_normal", "tr_contrast"]].notna().all().all()
    mixed = _diagnose(_model(params_path, memory={"mode": "mix"}), held_out)
    assert mixed.filter(like="gate").isna().all().all()
    assert mixed["cosine_normal"].notna().all()
