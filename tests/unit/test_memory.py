"""Class-aware memory: attention read-out, class logits, prediction and gradients by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mddnet.models.memory import ClassAwareMemory, MemoryUsage, kmeans


def _memory(prototypes: list, temperature: float = 0.1, mode: str = "replace") -> ClassAwareMemory:
    """A memory whose prototypes (classes, K, D) are set to the given values."""
    values = torch.tensor(prototypes, dtype=torch.float32)
    memory = ClassAwareMemory(values.shape[0], values.shape[1], values.shape[2], temperature, mode)
    with torch.no_grad():
        memory.prototypes.copy_(values)
    return memory


def _positions(*vectors: tuple[float, float]) -> torch.Tensor:
    """z (1, 2, 1, N) whose positions hold the given 2-vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 2, 1, len(vectors))


def test_memory_reads_only_the_prototypes_of_the_given_class() -> None:
    # Every prototype of a class is the same constant vector, so whatever the attention, the
    # read-out is that constant: 2 for class 0, -3 for class 1, 7 for class 2.
    memory = _memory([[[2.0] * 4] * 3, [[-3.0] * 4] * 3, [[7.0] * 4] * 3])
    z = torch.randn(3, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    read = memory(z, torch.tensor([1, 0, 1]))
    assert read.class_ids.tolist() == [1, 0, 1]
    for sample, value in enumerate((-3.0, 2.0, -3.0)):
        torch.testing.assert_close(read.readout[sample], torch.full((4, 2, 3), value))


def test_mix_mode_adds_the_read_out_to_z() -> None:
    memory = _memory([[[2.0] * 4] * 3, [[-3.0] * 4] * 3], mode="mix")
    z = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    read = memory(z, torch.tensor([0, 1]))
    torch.testing.assert_close(read.readout[0], z[0] + 2.0)
    torch.testing.assert_close(read.readout[1], z[1] - 3.0)


def test_read_out_is_the_softmax_of_cosine_over_temperature_weighting_raw_prototypes() -> None:
    # z = (1, 0); prototypes (3, 0) and (0, 5) have cosines 1 and 0 with it; temperature 0.5
    # gives softmax([2, 0]) = [e^2, 1] / (e^2 + 1) = [0.880797, 0.119203], and the read-out uses
    # the prototypes unnormalised: 0.880797 * (3, 0) + 0.119203 * (0, 5) = (2.642391, 0.596015).
    memory = _memory([[[3.0, 0.0], [0.0, 5.0]]], temperature=0.5)
    read = memory(_positions((1.0, 0.0)), torch.tensor([0]))
    w = math.exp(2) / (math.exp(2) + 1)
    expected = torch.tensor([3 * w, 5 * (1 - w)]).reshape(1, 2, 1, 1)
    torch.testing.assert_close(read.readout, expected)
    assert expected.flatten().tolist() == pytest.approx([2.642391, 0.596015], abs=1e-6)


PROTOTYPES_CLASS_1_MATCHES = [
    [[0.0, 1.0], [-1.0, 0.0]],  # class 0
    [[1.0, 0.0], [1.0, 1.0]],  # class 1
]


def test_logits_are_pooled_best_prototype_cosine_over_temperature() -> None:
    # Positions (1, 0) and (0, 1).
    # class 0: best cosines 0 (at (1,0)) and 1 (at (0,1)) -> mean 0.5 -> / 0.1 = 5
    # class 1: best cosines 1 and 1/sqrt(2) -> mean 0.853553 -> / 0.1 = 8.53553
    memory = _memory(PROTOTYPES_CLASS_1_MATCHES, temperature=0.1)
    read = memory(_positions((1.0, 0.0), (0.0, 1.0)), torch.tensor([0]))
    expected = [5.0, (1 + 1 / math.sqrt(2)) / 2 / 0.1]
    assert read.logits.tolist()[0] == pytest.approx(expected, abs=1e-5)


def test_predicted_class_is_the_argmax_and_selects_the_prototypes_read() -> None:
    memory = _memory(PROTOTYPES_CLASS_1_MATCHES, temperature=0.1)
    z = _positions((1.0, 0.0), (0.0, 1.0))
    predicted = memory(z, None)
    assert predicted.class_ids.tolist() == [1]
    torch.testing.assert_close(predicted.readout, memory(z, torch.tensor([1])).readout)
    assert not torch.allclose(predicted.readout, memory(z, torch.tensor([0])).readout)


def test_gradients_reach_the_prototypes_of_the_read_class_and_through_logits_all() -> None:
    torch.manual_seed(0)
    memory = ClassAwareMemory(num_classes=3, prototypes=4, dim=8, temperature=0.1, mode="replace")
    z = torch.randn(2, 8, 3, 3)
    memory(z, torch.tensor([0, 0])).readout.square().sum().backward()
    grad = memory.prototypes.grad
    assert grad[0].abs().sum() > 0
    assert grad[1:].abs().sum() == 0  # classes 1 and 2 were not read
    memory.prototypes.grad = None
    read = memory(z, torch.tensor([0, 2]))
    torch.nn.functional.cross_entropy(read.logits, torch.tensor([0, 2])).backward()
    assert all(memory.prototypes.grad[c].abs().sum() > 0 for c in range(3))


def test_prototype_init_is_small_and_fixed_by_the_global_seed() -> None:
    torch.manual_seed(3)
    first = ClassAwareMemory(2, 5, 16, 0.1, "replace").prototypes.detach().clone()
    torch.manual_seed(3)
    second = ClassAwareMemory(2, 5, 16, 0.1, "replace").prototypes.detach()
    assert torch.equal(first, second)
    assert 0.01 < first.std().item() < 0.04


@pytest.mark.parametrize(
    ("class_ids", "message"),
    [
        (torch.tensor([0, 3]), r"\[0, 3\)"),
        (torch.tensor([-1, 0]), r"\[0, 3\)"),
        (torch.tensor([0]), "shape"),
        (torch.tensor([0.0, 1.0]), "integer"),
    ],
)
def test_bad_class_ids_are_rejected(class_ids: torch.Tensor, message: str) -> None:
    memory = ClassAwareMemory(3, 2, 4, 0.1, "replace")
    with pytest.raises(ValueError, match=message):
        memory(torch.zeros(2, 4, 1, 1), class_ids)


def test_attention_is_returned_per_position_over_the_read_class_prototypes() -> None:
    # The hand case above: attention softmax([2, 0]) at the one position.
    memory = _memory([[[3.0, 0.0], [0.0, 5.0]]], temperature=0.5)
    read = memory(_positions((1.0, 0.0)), torch.tensor([0]))
    w = math.exp(2) / (math.exp(2) + 1)
    assert read.attention.shape == (1, 1, 2)
    assert read.attention.flatten().tolist() == pytest.approx([w, 1 - w], abs=1e-6)


def test_only_the_gated_mode_has_a_gate() -> None:
    assert ClassAwareMemory(2, 3, 4, 0.1, "replace").gate is None
    assert ClassAwareMemory(2, 3, 4, 0.1, "mix").gate is None
    gate = ClassAwareMemory(2, 3, 4, 0.1, "gated").gate
    assert (gate.in_channels, gate.out_channels, gate.kernel_size) == (8, 1, (1, 1))


def test_gated_output_lies_between_z_and_the_read_out() -> None:
    prototypes = [
        [[2.0, -1.0, 0.5, 3.0], [-2.0, 1.0, 1.0, 0.0]],
        [[1.0] * 4, [0.0, 1.0, 0.0, 1.0]],
    ]
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    class_ids = torch.tensor([0, 1])
    read = _memory(prototypes, mode="replace")(z, class_ids).readout  # the read-out itself
    gated = _memory(prototypes, mode="gated")
    # A zero gate conv gives g = sigmoid(0) = 1/2 everywhere: exactly the midpoint.
    with torch.no_grad():
        gated.gate.weight.zero_()
        gated.gate.bias.zero_()
    torch.testing.assert_close(gated(z, class_ids).readout, (z + read) / 2)
    # Any gate is in (0, 1): each value lies strictly between z's and the read-out's.
    torch.manual_seed(1)
    with torch.no_grad():
        gated.gate.weight.normal_(0, 0.3)
        gated.gate.bias.fill_(0.2)
    out = gated(z, class_ids).readout
    low, high = torch.minimum(z, read), torch.maximum(z, read)
    assert ((out > low) & (out < high)).all()
    g = (out - z) / (read - z)  # (B, D, h, w): one gate per position, shared by the channels
    torch.testing.assert_close(g, g[:, :1].expand_as(g), atol=1e-5, rtol=1e-4)
    assert g.std() > 0.01  # the gate differs between positions


@pytest.mark.slow
def test_kmeans_finds_the_centres_of_two_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    near = torch.randn(30, 2, generator=g) * 0.5  # around (0, 0)
    far = torch.randn(20, 2, generator=g) * 0.5 + torch.tensor([10.0, -10.0])
    points = torch.cat([near, far])[torch.randperm(50, generator=g)]
    for seed in range(3):
        centroids = kmeans(points, 2, torch.Generator().manual_seed(seed))
        found = centroids[centroids[:, 0].argsort()]
        # Lloyd's fixed point: each centroid is exactly its cluster's mean
        torch.testing.assert_close(found, torch.stack([near.mean(0), far.mean(0)]))


def test_kmeans_with_fewer_points_than_k_starts_every_centroid_on_a_point() -> None:
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    centroids = kmeans(points, 5, torch.Generator().manual_seed(0))
    assert centroids.shape == (5, 2)
    assert all(any(torch.equal(c, p) for p in points) for c in centroids)


def test_initialise_sets_each_class_prototypes_to_its_kmeans_centroids() -> None:
    memory = ClassAwareMemory(2, 2, 2, 0.1, "replace")
    first = torch.tensor([[0.0, 0.0], [0.0, 2.0], [5.0, 5.0], [5.0, 7.0]])  # centres (0,1) (5,6)
    second = torch.tensor([[-4.0, 0.0], [-6.0, 0.0], [3.0, 1.0], [3.0, 3.0]])  # (-5,0) (3,2)
    memory.initialise([first, second], torch.Generator().manual_seed(0))
    found = [p[p[:, 0].argsort()] for p in memory.prototypes.detach()]
    torch.testing.assert_close(found[0], torch.tensor([[0.0, 1.0], [5.0, 6.0]]))
    torch.testing.assert_close(found[1], torch.tensor([[-5.0, 0.0], [3.0, 2.0]]))
    assert memory.prototypes.requires_grad  # still a trained parameter


def test_usage_entropy_is_one_for_uniform_and_zero_for_one_hot_attention() -> None:
    class_ids = torch.tensor([0, 1])
    uniform = ClassAwareMemory.usage(torch.full((2, 3, 4), 0.25), class_ids)
    assert isinstance(uniform, MemoryUsage)
    assert uniform.entropy == pytest.approx(1.0, abs=1e-6)
    assert uniform.used == pytest.approx(0.25)  # ties: every position is won by prototype 0
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 1, 1], [2, 2, 2]]), 4).float()
    assert ClassAwareMemory.usage(one_hot, class_ids).entropy == 0.0
    # two prototypes at 1/2 each: log 2 / log 4
    half = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]])
    assert ClassAwareMemory.usage(half, torch.tensor([0])).entropy == pytest.approx(0.5)


def test_usage_counts_the_prototypes_each_class_uses_over_its_images() -> None:
    # Images 0 and 1 (class 0) win prototypes {0, 1} and {1, 2}: 3 of 4 used. Image 2 (class 1)
    # wins {3}: 1 of 4. Mean over the classes in the batch: (3/4 + 1/4) / 2 = 1/2.
    winners = torch.tensor([[0, 1], [1, 2], [3, 3]])  # (B, N)
    attention = torch.nn.functional.one_hot(winners, 4).float() * 0.7 + 0.075  # argmax kept
    usage = ClassAwareMemory.usage(attention, torch.tensor([0, 0, 1]))
    assert usage.used == pytest.approx(0.5)
    assert 0 < usage.entropy < 1
