"""Loss terms of MDD-Net against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mddnet.config import LossWeights
from mddnet.losses import (
    DiscrepancyOptions,
    compute_losses,
    discrepancy_loss,
    discrepancy_target,
    feature_cosine_loss,
    resize_mask,
)
from mddnet.models.decoder import Decoder
from mddnet.models.mddnet import MDDNetOutput


def _map(*vectors: tuple[float, float], h: int, w: int) -> torch.Tensor:
    """(1, 2, h, w) map whose positions, row-major, hold the given 2-vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 2, h, w)


def _features(seed: int, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=g) for c, s in ((4, 8), (6, 4), (8, 2))]


def _output(identity: bool = True, memory: bool = True) -> MDDNetOutput:
    teacher = _features(0)
    return MDDNetOutput(
        teacher=teacher,
        restoration=_features(1),
        identity=_features(2) if identity else None,
        memory_logits=torch.tensor([[2.0, 0.0], [0.0, 1.0]]) if memory else None,
        class_ids=torch.tensor([0, 0]) if memory else None,
    )


MASK = torch.zeros(2, 1, 16, 16)
CLASS_IDS = torch.tensor([0, 0])


@pytest.mark.parametrize("cosine", ["flatten", "pixel"])
def test_identical_features_give_zero_feature_losses(cosine: str) -> None:
    features = _features(3)
    same = [f.clone() for f in features]
    output = MDDNetOutput(features, same, [f.clone() for f in features], None, None)
    weights = LossWeights(restoration=1.0, identity=1.0, discrepancy=1.0, memory=0.0)
    terms = compute_losses(output, same, torch.zeros(2, 1, 16, 16), CLASS_IDS, weights, cosine)
    for value in terms:
        assert float(value) == pytest.approx(0.0, abs=1e-6)


def test_flatten_and_pixel_cosine_match_hand_values_and_differ() -> None:
    # Sample 0: positions (1, 0), (0, 1) vs (1, 0), (0, 3): parallel at each pixel (pixel loss 0),
    # but flattened [1, 0, 0, 1] vs [1, 0, 0, 3]: cos = 4 / (sqrt(2) sqrt(10)) = 2 / sqrt(5).
    # Sample 1 is identical in both, so the batch means halve sample 0's value.
    predicted = torch.cat([_map((1, 0), (0, 1), h=1, w=2), _map((1, 2), (3, 4), h=1, w=2)])
    target = torch.cat([_map((1, 0), (0, 3), h=1, w=2), _map((1, 2), (3, 4), h=1, w=2)])
    flatten = feature_cosine_loss([predicted], [target], "flatten")
    pixel = feature_cosine_loss([predicted], [target], "pixel")
    assert float(flatten) == pytest.approx((1 - 2 / math.sqrt(5)) / 2, abs=1e-6)  # 0.0527864
    assert float(pixel) == pytest.approx(0.0, abs=1e-6)


def test_pixel_cosine_averages_over_positions_and_sums_over_scales() -> None:
    # Positions (1, 0), (1, 0) vs (1, 0), (0, 1): distances 0 and 1 -> mean 0.5 per scale.
    predicted = _map((1, 0), (1, 0), h=1, w=2)
    target = _map((1, 0), (0, 1), h=1, w=2)
    loss = feature_cosine_loss([predicted, predicted], [target, target], "pixel")
    assert float(loss) == pytest.approx(1.0, abs=1e-6)


def test_mask_is_resized_by_area_to_anomalous_fractions() -> None:
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 0, 2:] = 1  # 2 pixels in the top-right 2x2 cell
    assert resize_mask(mask, (2, 2)).tolist() == [[[0.0, 0.5], [0.0, 0.0]]]
    assert resize_mask(mask, (1, 1)).item() == pytest.approx(2 / 16)


def test_discrepancy_loss_equals_hand_computation_on_a_2x2_case() -> None:
    # Scale 1 (2x2): D_R = (1,0) (1,0) (0,1) (1,1), D_I = (1,0) (0,1) (0,1) (1,0)
    #   cos = 1, 0, 1, 1/sqrt(2)  ->  M_RI = 0, 1, 0, 1 - 1/sqrt(2) = 0.2928932
    # Mask 4x4: top-right 2x2 block anomalous, one more pixel in the bottom-right block
    #   area-resized to 2x2: [[0, 1], [0, 0.25]]
    #   L1 mean = (0 + 0 + 0 + |0.2928932 - 0.25|) / 4 = 0.0107233
    # Scale 2 (1x1): D_R = (1,1), D_I = (1,0): M_RI = 0.2928932; mask mean = 5/16 = 0.3125
    #   L1 = |0.2928932 - 0.3125| = 0.0196068
    # Sum over scales = 0.0303301
    restoration = [_map((1, 0), (1, 0), (0, 1), (1, 1), h=2, w=2), _map((1, 1), h=1, w=1)]
    identity = [_map((1, 0), (0, 1), (0, 1), (1, 0), h=2, w=2), _map((1, 0), h=1, w=1)]
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, 2:] = 1
    mask[0, 0, 3, 3] = 1
    m_ri = 1 - 1 / math.sqrt(2)
    expected = abs(m_ri - 0.25) / 4 + abs(m_ri - 5 / 16)
    assert expected == pytest.approx(0.0303301, abs=1e-7)
    assert float(discrepancy_loss(restoration, identity, mask)) == pytest.approx(
        expected, abs=1e-6
    )


def test_balanced_discrepancy_equals_hand_computation_on_the_2x2_case() -> None:
    # Same features and mask as above. Scale 1: targets t = [[0, 1], [0, .25]], errors
    #   e = [[0, 0], [0, |m_ri - .25|]]; anomalous part sum(t e) / sum(t) = .25 e4 / 1.25,
    #   normal part sum((1 - t) e) / sum(1 - t) = .75 e4 / 2.75; loss = (a + n) / 2.
    # Scale 2 (1x1): t = 5/16, e = |m_ri - 5/16|: both parts equal e, so the loss is e.
    restoration = [_map((1, 0), (1, 0), (0, 1), (1, 1), h=2, w=2), _map((1, 1), h=1, w=1)]
    identity = [_map((1, 0), (0, 1), (0, 1), (1, 0), h=2, w=2), _map((1, 0), h=1, w=1)]
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, 2:] = 1
    mask[0, 0, 3, 3] = 1
    m_ri = 1 - 1 / math.sqrt(2)
    e4 = abs(m_ri - 0.25)
    expected = (0.25 * e4 / 1.25 + 0.75 * e4 / 2.75) / 2 + abs(m_ri - 5 / 16)
    loss = discrepancy_loss(restoration, identity, mask, reduction="balanced")
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_balanced_discrepancy_without_anomalies_is_the_plain_mean() -> None:
    restoration = [_map((1, 0), (1, 1), h=1, w=2)]
    identity = [_map((0, 1), (1, 1), h=1, w=2)]
    mask = torch.zeros(1, 1, 2, 4)
    plain = discrepancy_loss(restoration, identity, mask, reduction="mean")
    assert float(plain) == pytest.approx(0.5)  # errors 1 and 0
    assert float(discrepancy_loss(restoration, identity, mask, reduction="balanced")) == 0.5


# The `teacher` target on one 2x2 scale. Mask 4x4: the top-right 2x2 block anomalous, two pixels
# of the bottom-left block and one of the bottom-right: area fractions [[0, 1], [0.5, 0.25]].
# T(x_n) = (1, 0) everywhere; T(x_a) = (0, 1), (-1, 0), (0, 1), (1, 1), so the teacher's own
# discrepancy 1 - cos is 1, 2 (clamped to 1), 1, 1 - 1/sqrt(2) = 0.2928932.
# Target = mask x (1 - cos) = [[0, 1], [0.5, 0.0732233]]: M (the `mask` target) where the teacher
# sees a full change, less where the anomaly changed the features only a little.
def _teacher_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, 2:] = 1
    mask[0, 0, 2:, 0] = 1
    mask[0, 0, 3, 3] = 1
    normal = _map((1, 0), (1, 0), (1, 0), (1, 0), h=2, w=2)
    anomalous = _map((0, 1), (-1, 0), (0, 1), (1, 1), h=2, w=2)
    return mask, normal, anomalous


def test_teacher_target_is_the_mask_times_the_teachers_own_discrepancy() -> None:
    mask, normal, anomalous = _teacher_case()
    m = 1 - 1 / math.sqrt(2)
    expected = torch.tensor([[[0.0, 1.0], [0.5, 0.25 * m]]])
    assert 0.25 * m == pytest.approx(0.0732233, abs=1e-7)
    target = discrepancy_target(mask, (2, 2), normal, anomalous)
    torch.testing.assert_close(target, expected, atol=1e-6, rtol=0)
    # without the teacher pair the target is the mask's area fraction (the `mask` target)
    assert discrepancy_target(mask, (2, 2), None, None).tolist() == [[[0.0, 1.0], [0.5, 0.25]]]


def test_discrepancy_loss_with_the_teacher_target_equals_hand_computation() -> None:
    # D_R, D_I as in the 2x2 case above: M_RI = 0, 1, 0, m with m = 1 - 1/sqrt(2).
    # Targets 0, 1, 0.5, 0.25 m: errors 0, 0, 0.5, 0.75 m; mean = (0.5 + 0.75 m) / 4 = 0.1799175
    mask, normal, anomalous = _teacher_case()
    restoration = [_map((1, 0), (1, 0), (0, 1), (1, 1), h=2, w=2)]
    identity = [_map((1, 0), (0, 1), (0, 1), (1, 0), h=2, w=2)]
    m = 1 - 1 / math.sqrt(2)
    expected = (0.5 + 0.75 * m) / 4
    assert expected == pytest.approx(0.1799175, abs=1e-7)
    loss = discrepancy_loss(restoration, identity, mask, "mean", ([normal], [anomalous]))
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    # the options read T(x_n) from the caller and T(x_a) from the model's output
    output = MDDNetOutput([anomalous], restoration, identity, None, None)
    teacher = DiscrepancyOptions(reduction="mean", target="teacher")
    assert float(teacher.loss(output, [normal], mask)) == pytest.approx(expected, abs=1e-6)
    plain = float(DiscrepancyOptions(reduction="mean", target="mask").loss(output, [normal], mask))
    assert plain == pytest.approx(float(discrepancy_loss(restoration, identity, mask)))
    assert plain != pytest.approx(expected)


def _decoded(gradient: str) -> tuple[Decoder, Decoder, torch.Tensor]:
    """L_dist alone, backpropagated through two real decoders that read the same z."""
    torch.manual_seed(0)
    restoration_decoder, identity_decoder = Decoder(8, (4, 6)), Decoder(8, (4, 6))
    z = torch.randn(2, 8, 2, 2, requires_grad=True)
    teacher = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    output = MDDNetOutput(teacher, restoration_decoder(z), identity_decoder(z), None, None)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    weights = LossWeights(restoration=0.0, identity=0.0, discrepancy=1.0, memory=0.0)
    options = DiscrepancyOptions(reduction="balanced", gradient=gradient)
    terms = compute_losses(output, teacher, mask, CLASS_IDS, weights, "flatten", options)
    terms.total.backward()
    return restoration_decoder, identity_decoder, terms.discrepancy.detach()


def _gradient_sum(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.slow
def test_identity_gradient_keeps_the_discrepancy_loss_out_of_the_restoration_decoder() -> None:
    restoration, identity, identity_loss = _decoded("identity")
    assert _gradient_sum(restoration) == 0.0  # exactly: D_R's maps were detached
    assert _gradient_sum(identity) > 0
    restoration, identity, both_loss = _decoded("both")
    assert _gradient_sum(restoration) > 0 and _gradient_sum(identity) > 0
    assert float(identity_loss) == float(both_loss)  # the value is the same, only the gradient


def test_discrepancy_loss_rejects_a_mask_without_channel_axis() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        discrepancy_loss(_features(0), _features(1), torch.zeros(2, 16, 16))


def test_total_is_the_weighted_sum_of_the_terms() -> None:
    weights = LossWeights(restoration=1.0, identity=0.5, discrepancy=2.0, memory=0.1)
    output = _output()
    teacher_normal = _features(4)
    terms = compute_losses(output, teacher_normal, MASK, CLASS_IDS, weights, "flatten")
    assert float(terms.restoration) == pytest.approx(
        float(feature_cosine_loss(output.restoration, teacher_normal, "flatten"))
    )
    assert float(terms.identity) == pytest.approx(
        float(feature_cosine_loss(output.identity, output.teacher, "flatten"))
    )
    # Cross-entropy by hand: logits (2, 0) and (0, 1), both of class 0.
    memory = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    assert float(terms.memory) == pytest.approx(memory, abs=1e-6)
    expected = (
        float(terms.restoration)
        + 0.5 * float(terms.identity)
        + 2.0 * float(terms.discrepancy)
        + 0.1 * memory
    )
    assert float(terms.total) == pytest.approx(expected, abs=1e-5)


def test_zero_weight_terms_are_skipped_and_reported_as_zero() -> None:
    weights = LossWeights(restoration=1.0, identity=0.0, discrepancy=0.0, memory=0.0)
    output = _output(identity=False, memory=False)  # absent parts are fine at weight 0
    terms = compute_losses(output, _features(4), MASK, CLASS_IDS, weights, "pixel")
    assert float(terms.restoration) > 0
    assert (float(terms.identity), float(terms.discrepancy), float(terms.memory)) == (0, 0, 0)
    assert float(terms.total) == pytest.approx(float(terms.restoration))


@pytest.mark.parametrize(
    ("term", "output"),
    [
        ("identity", _output(identity=False)),
        ("discrepancy", _output(identity=False)),
        ("memory", _output(memory=False)),
    ],
)
def test_a_weighted_term_without_its_module_is_a_clear_error(
    term: str, output: MDDNetOutput
) -> None:
    weights = LossWeights(
        restoration=1.0,
        identity=float(term == "identity"),
        discrepancy=float(term == "discrepancy"),
        memory=float(term == "memory"),
    )
    with pytest.raises(ValueError, match=f"train.loss_weights.{term}"):
        compute_losses(output, _features(4), MASK, CLASS_IDS, weights, "flatten")


def test_all_zero_weights_are_rejected() -> None:
    weights = LossWeights(restoration=0.0, identity=0.0, discrepancy=0.0, memory=0.0)
    with pytest.raises(ValueError, match="every weight is 0"):
        compute_losses(_output(), _features(4), MASK, CLASS_IDS, weights, "flatten")


def test_gradients_flow_from_the_total_into_decoder_outputs_only_where_weighted() -> None:
    output = _output()
    for f in (*output.restoration, *output.identity):
        f.requires_grad_(True)
    weights = LossWeights(restoration=1.0, identity=0.0, discrepancy=0.0, memory=0.0)
    compute_losses(output, _features(4), MASK, CLASS_IDS, weights, "flatten").total.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in output.restoration)
    assert all(f.grad is None for f in output.identity)


def test_mismatched_feature_shapes_are_refused_even_when_flattening_would_hide_them() -> None:
    # (2, 3) and (3, 2) maps have the same number of values, so flattened cosines would run.
    with pytest.raises(ValueError, match="multiple of the bottleneck stride"):
        feature_cosine_loss([torch.ones(1, 2, 2, 3)], [torch.ones(1, 2, 3, 2)], "flatten")
