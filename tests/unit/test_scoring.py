"""Anomaly maps, fusion, blur and image scores against hand values and scipy/numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from mddnet.models.mddnet import MDDNetOutput
from mddnet.scoring import (
    AnomalyMaps,
    MapStatistics,
    anomaly_maps,
    blur,
    discrepancy_map,
    fuse,
    image_scores,
    weigh_scales,
)


def _constant(vector: tuple[float, float], h: int, w: int) -> torch.Tensor:
    """(1, 2, h, w) map holding `vector` at every position."""
    return torch.tensor(vector, dtype=torch.float32).reshape(1, 2, 1, 1).expand(1, 2, h, w)


def _features(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, s, s, generator=g) for c, s in ((4, 8), (6, 4), (8, 2))]


def test_identical_features_give_a_zero_map() -> None:
    features = _features(0)
    out = discrepancy_map(features, [f.clone() for f in features], (32, 32))
    assert out.shape == (2, 32, 32)
    assert out.abs().max().item() == pytest.approx(0.0, abs=1e-6)


def test_discrepancy_map_upsamples_bilinearly_and_sums_scales() -> None:
    # Scale 1 (2x2): distance 1 only at row 0, col 1 (orthogonal vectors), 0 elsewhere.
    # Bilinear x2 with half-pixel centres samples at -0.25, 0.25, 0.75, 1.25 (clamped), so the
    # weights of the second row/column are [0, .25, .75, 1]: map = outer([1, .75, .25, 0], [0, .25,
    # .75, 1]). Scale 2 (1x1): orthogonal vectors, distance 1 everywhere.
    a1 = _constant((1.0, 0.0), 2, 2)
    b1 = a1.clone()
    b1[0, :, 0, 1] = torch.tensor([0.0, 1.0])
    a2, b2 = _constant((1.0, 0.0), 1, 1), _constant((0.0, 1.0), 1, 1)
    out = discrepancy_map([a1, a2], [b1, b2], (4, 4))
    expected = np.outer([1, 0.75, 0.25, 0], [0, 0.25, 0.75, 1]) + 1.0
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)


def test_scale_weights_weigh_each_scales_map() -> None:
    # The maps of the test above: scale 1 is the outer product, scale 2 is 1 everywhere.
    a1 = _constant((1.0, 0.0), 2, 2)
    b1 = a1.clone()
    b1[0, :, 0, 1] = torch.tensor([0.0, 1.0])
    a2, b2 = _constant((1.0, 0.0), 1, 1), _constant((0.0, 1.0), 1, 1)
    fine = np.outer([1, 0.75, 0.25, 0], [0, 0.25, 0.75, 1])
    for weights, expected in (((0.5, 2.0), 0.5 * fine + 2.0), ((0.0, 1.0), np.ones((4, 4)))):
        out = discrepancy_map([a1, a2], [b1, b2], (4, 4), weights)
        np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)


def test_weigh_scales_sums_by_default_and_names_the_param_on_a_wrong_count() -> None:
    maps = torch.tensor([1.0, 2.0, 4.0]).reshape(1, 3, 1, 1)
    assert weigh_scales(maps, None).item() == 7.0
    assert weigh_scales(maps, (0.5, 1.0, 0.0)).item() == 2.5
    with pytest.raises(ValueError, match="scale_weights has 2 weights, but the model has 3"):
        weigh_scales(maps, (1.0, 1.0))


def _output(with_identity: bool = True) -> MDDNetOutput:
    return MDDNetOutput(
        teacher=_features(0),
        restoration=_features(1),
        identity=_features(2) if with_identity else None,
        memory_logits=None,
        class_ids=None,
    )


def test_anomaly_maps_are_the_two_blurred_discrepancy_maps() -> None:
    output = _output()
    maps = anomaly_maps(output, (16, 16), blur_sigma=1.0)
    tr = discrepancy_map(output.teacher, output.restoration, (16, 16))
    ri = discrepancy_map(output.restoration, output.identity, (16, 16))
    torch.testing.assert_close(maps.teacher_restoration, blur(tr, 1.0))
    torch.testing.assert_close(maps.restoration_identity, blur(ri, 1.0))
    without_identity = anomaly_maps(_output(with_identity=False), (16, 16), blur_sigma=1.0)
    assert without_identity.restoration_identity is None
    torch.testing.assert_close(without_identity.teacher_restoration, maps.teacher_restoration)


def test_fused_map_is_the_weighted_sum_of_the_two_maps() -> None:
    maps = anomaly_maps(_output(), (16, 16), blur_sigma=0.0)
    fused = fuse(maps, (0.3, 2.0))
    torch.testing.assert_close(
        fused, 0.3 * maps.teacher_restoration + 2.0 * maps.restoration_identity
    )


def test_blurred_fusion_equals_the_blur_of_the_fused_map() -> None:
    output = _output()
    raw = fuse(anomaly_maps(output, (32, 32), blur_sigma=0.0), (1.0, 0.5))
    blurred = fuse(anomaly_maps(output, (32, 32), blur_sigma=2.0), (1.0, 0.5))
    torch.testing.assert_close(blurred, blur(raw, 2.0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(blurred, raw)


def test_zero_weight_map_is_left_out_and_needs_no_identity_decoder() -> None:
    maps = anomaly_maps(_output(with_identity=False), (16, 16), blur_sigma=0.0)
    torch.testing.assert_close(fuse(maps, (1.0, 0.0)), maps.teacher_restoration)
    full = anomaly_maps(_output(), (16, 16), blur_sigma=0.0)
    torch.testing.assert_close(fuse(full, (0.0, 1.0)), full.restoration_identity)


def test_identity_map_weight_without_identity_decoder_is_a_clear_error() -> None:
    maps = anomaly_maps(_output(with_identity=False), (16, 16), 0.0)
    with pytest.raises(ValueError, match="evaluate.fusion.restoration_identity"):
        fuse(maps, (1.0, 1.0))
    with pytest.raises(ValueError, match="at least one weight must be > 0"):
        fuse(maps, (0.0, 0.0))


def test_fuse_z_scores_each_map_with_the_class_statistics() -> None:
    # Both images: TR = [[1, 2], [3, 4]], RI = [[0, 0], [1, 1]].
    # Class 0: TR mean 0, std 1; RI mean 0.5, std 1. Class 1: TR mean 2, std 0.5; RI mean 0, std 2.
    # Image 0 (class 1): TR -> (x - 2) / 0.5 = [-2, 0, 2, 4]; RI -> x / 2 = [0, 0, .5, .5]
    #   fused with weights (1, 2): [-2, 0, 3, 5]
    # Image 1 (class 0): TR -> x = [1, 2, 3, 4]; RI -> x - 0.5 = [-.5, -.5, .5, .5]
    #   fused: [0, 1, 4, 5]
    tr = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(2, 2, 2)
    ri = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).expand(2, 2, 2)
    statistics = MapStatistics(
        teacher_restoration=(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.5])),
        restoration_identity=(torch.tensor([0.5, 0.0]), torch.tensor([1.0, 2.0])),
    )
    fused = fuse(AnomalyMaps(tr, ri), (1.0, 2.0), statistics, torch.tensor([1, 0]))
    expected = torch.tensor([[[-2.0, 0.0], [3.0, 5.0]], [[0.0, 1.0], [4.0, 5.0]]])
    torch.testing.assert_close(fused, expected)
    # one image of the 1x2x2 case alone gives the same
    single = fuse(AnomalyMaps(tr[:1], ri[:1]), (1.0, 2.0), statistics, torch.tensor([1]))
    torch.testing.assert_close(single, expected[:1])
    # without statistics the maps are summed raw
    torch.testing.assert_close(fuse(AnomalyMaps(tr, ri), (1.0, 2.0)), tr + 2 * ri)


def test_blur_preserves_mass_and_matches_scipy_gaussian() -> None:
    maps = torch.zeros(2, 33, 33)
    maps[0, 16, 16] = 1.0
    maps[1, 10:14, 18:25] = 3.0
    out = blur(maps, 2.0)
    torch.testing.assert_close(out.sum(dim=(1, 2)), maps.sum(dim=(1, 2)), atol=1e-4, rtol=1e-5)
    assert out[0].max() < 0.1  # the impulse is spread
    # scipy's radius int(3 sigma + 0.5) = 6 = ceil(3 sigma): kernel 13; torch 'reflect' = 'mirror'
    reference = ndimage.gaussian_filter(
        maps.numpy(), sigma=(0, 2.0, 2.0), truncate=3.0, mode="mirror"
    )
    np.testing.assert_allclose(out.numpy(), reference, atol=1e-6)


def test_blur_sigma_zero_returns_the_maps_unchanged() -> None:
    maps = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(blur(maps, 0.0), maps)


def test_image_scores_match_numpy_on_a_hand_case() -> None:
    maps = torch.tensor(
        [
            [[0.1, 0.9, 0.3], [0.4, 0.2, 0.8], [0.0, 0.5, 0.7]],
            [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.6]],
        ]
    )
    flat = maps.numpy().reshape(2, -1)
    np.testing.assert_allclose(image_scores(maps, "max", 3).numpy(), [0.9, 1.0])
    top3 = np.sort(flat, axis=1)[:, -3:].mean(axis=1)  # (0.9+0.8+0.7)/3, (1+1+0.6)/3
    np.testing.assert_allclose(image_scores(maps, "topk_mean", 3).numpy(), top3, rtol=1e-6)
    np.testing.assert_allclose(top3, [0.8, 2.6 / 3], rtol=1e-6)


def test_topk_larger_than_the_map_is_rejected() -> None:
    with pytest.raises(ValueError, match="evaluate.topk"):
        image_scores(torch.zeros(1, 2, 2), "topk_mean", 5)


@pytest.mark.parametrize(("sigma", "size"), [(0.7, 9), (2.0, 32), (4.0, 64)])
def test_blur_equals_torchvision_gaussian_blur(sigma: float, size: int) -> None:
    """The library reference: our traceable blur (for ONNX) is torchvision's, up to rounding."""
    from torchvision.transforms.v2.functional import gaussian_blur

    maps = torch.rand(3, size, size, generator=torch.Generator().manual_seed(int(sigma * 10)))
    kernel = 2 * math.ceil(3 * sigma) + 1
    expected = gaussian_blur(maps, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    torch.testing.assert_close(blur(maps, sigma), expected, atol=2e-6, rtol=1e-5)
