"""MDD-Net composition: shapes that mirror the teacher, frozen teacher, ablations, determinism."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from mddnet.config import LossWeights, MemoryConfig, ModelConfig, load_config
from mddnet.errors import MddnetError
from mddnet.losses import compute_losses
from mddnet.models import Bottleneck, Decoder, MDDNet, build_model

NUM_CLASSES = 3
SIZE = 64  # a multiple of the bottleneck stride 32; z is 2x2
WEIGHTS = LossWeights(restoration=1.0, identity=1.0, discrepancy=1.0, memory=0.1)


def _config(params_path: Path, **changes: object) -> ModelConfig:
    """The default model params with a random teacher (fast, offline) and small memory."""
    model = load_config(params_path).model
    small = {"weights": "none", "memory": dataclasses.replace(model.memory, prototypes=4)}
    return dataclasses.replace(model, **{**small, **changes})


def _build(config: ModelConfig, seed: int = 0) -> MDDNet:
    torch.manual_seed(seed)
    return build_model(config, NUM_CLASSES)


def _batch(seed: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    mask = (torch.rand(batch, 1, SIZE, SIZE, generator=g) > 0.8).float()
    class_ids = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return images, mask, class_ids


def _train(model: MDDNet, optimizer_name: str, steps: int) -> None:
    """A few optimisation steps of the full objective on random data."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(trainable, lr=0.005, betas=(0.5, 0.999))
    else:
        optimizer = torch.optim.SGD(trainable, lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        images, mask, class_ids = _batch(step, batch=2)
        normal = images.roll(1, dims=-1)  # a stand-in x_n that differs from x_a
        output = model(images, class_ids)
        terms = compute_losses(output, model.teacher(normal), mask, class_ids, WEIGHTS, "flatten")
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()


def _count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@pytest.mark.slow
def test_decoders_mirror_the_teacher_and_z_has_twice_its_deepest_channels(
    params_path: Path,
) -> None:
    model = _build(_config(params_path)).eval()
    images, _, class_ids = _batch(0, batch=2)
    output = model(images, class_ids)
    # tf_efficientnet_lite0 stages 1-3: 24, 40, 112 channels at strides 4, 8, 16.
    expected = [(2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4)]
    assert [tuple(f.shape) for f in output.teacher] == expected
    assert [tuple(f.shape) for f in output.restoration] == expected
    assert [tuple(f.shape) for f in output.identity] == expected
    z = model.bottleneck(output.teacher)
    assert tuple(z.shape) == (2, 224, 2, 2)  # D = 2 * 112 at stride 32
    assert output.memory_logits.shape == (2, NUM_CLASSES)


def test_bottleneck_fuses_every_teacher_scale() -> None:
    torch.manual_seed(0)
    bottleneck = Bottleneck((8, 12, 16)).eval()
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(2, c, s, s, generator=g) for c, s in ((8, 16), (12, 8), (16, 4))]
    z = bottleneck(features)
    assert tuple(z.shape) == (2, 32, 2, 2)
    for i in range(3):
        changed = [f.clone() for f in features]
        changed[i] += 1.0
        assert not torch.allclose(bottleneck(changed), z), f"scale {i} does not reach z"


def test_bottleneck_rejects_a_wrong_number_of_scales() -> None:
    with pytest.raises(ValueError, match="3 teacher stages"):
        Bottleneck((8, 12, 16))([torch.zeros(1, 8, 8, 8)])


def test_decoder_outputs_are_signed_like_teacher_features() -> None:
    # No ReLU on the outputs: EfficientNet stage outputs are signed, and a decoder restricted to
    # >= 0 could not align with them.
    torch.manual_seed(0)
    decoder = Decoder(32, (8, 12, 16)).eval()
    outputs = decoder(torch.randn(2, 32, 2, 2))
    assert [tuple(f.shape) for f in outputs] == [(2, 8, 16, 16), (2, 12, 8, 8), (2, 16, 4, 4)]
    assert all((f < 0).any() and (f > 0).any() for f in outputs)


@pytest.mark.slow
def test_teacher_has_no_trainable_params_and_does_not_change_during_training(
    params_path: Path,
) -> None:
    model = _build(_config(params_path))
    assert _count(model.teacher) > 0
    assert not any(p.requires_grad for p in model.teacher.parameters())
    probe, _, _ = _batch(99, batch=2)
    before = [f.clone() for f in model.teacher(probe)]
    teacher_state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    fuse_weight = model.bottleneck.fuse[0].weight.detach().clone()
    prototypes = model.memory.prototypes.detach().clone()
    _train(model, "adam", steps=3)
    assert not model.teacher.training  # model.train() left the teacher in eval mode
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key  # weights and BN statistics
    for old, new in zip(before, model.teacher(probe), strict=True):
        assert torch.equal(old, new)
    # ... while the trainable parts did move, including the memory's prototypes.
    assert not torch.equal(model.bottleneck.fuse[0].weight.detach(), fuse_weight)
    assert not torch.equal(model.memory.prototypes.detach(), prototypes)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("identity_decoder", "memory_enabled"), [(False, True), (True, False), (False, False)]
)
def test_each_ablation_drops_exactly_its_module(
    params_path: Path, identity_decoder: bool, memory_enabled: bool
) -> None:
    full_config = _config(params_path)
    full = _build(full_config)
    memory = dataclasses.replace(full_config.memory, enabled=memory_enabled)
    ablated = _build(
        dataclasses.replace(full_config, identity_decoder=identity_decoder, memory=memory)
    )
    assert (ablated.identity_decoder is None) == (not identity_decoder)
    assert (ablated.memory is None) == (not memory_enabled)
    dropped = 0 if identity_decoder else _count(full.identity_decoder)
    # prototypes (classes * K * D) and, in gated mode, the 1x1 gate over [z, read-out] (2D + 1)
    gate = 2 * 224 + 1 if full_config.memory.mode == "gated" else 0
    dropped += 0 if memory_enabled else NUM_CLASSES * 4 * 224 + gate
    assert _count(full) - _count(ablated) == dropped
    for part in ("teacher", "bottleneck", "restoration_decoder"):
        assert _count(getattr(ablated, part)) == _count(getattr(full, part))
    images, _, class_ids = _batch(0, batch=2)
    output = ablated.eval()(images, class_ids)
    assert (output.identity is None) == (not identity_decoder)
    assert (output.memory_logits is None) == (output.class_ids is None) == (not memory_enabled)
    assert (output.attention is None) == (not memory_enabled)


def test_restoration_reads_the_memory_and_identity_reads_z(params_path: Path) -> None:
    # With every prototype of class 1 the same vector, replace mode hands D_R the same embedding
    # whatever the image: its output cannot depend on the image, while D_I's does.
    memory = dataclasses.replace(load_config(params_path).model.memory, mode="replace")
    model = _build(_config(params_path, memory=dataclasses.replace(memory, prototypes=4))).eval()
    with torch.no_grad():
        model.memory.prototypes[1] = 0.5
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 3, SIZE, SIZE, generator=g)
    class_ids = torch.tensor([1])
    out_a, out_b = model(a, class_ids), model(b, class_ids)
    for r_a, r_b in zip(out_a.restoration, out_b.restoration, strict=True):
        torch.testing.assert_close(r_a, r_b)
    assert not torch.allclose(out_a.identity[0], out_b.identity[0])


@pytest.mark.slow
def test_output_class_ids_are_the_given_ones_or_the_memory_prediction(params_path: Path) -> None:
    model = _build(_config(params_path)).eval()
    images, _, _ = _batch(5)
    given = torch.tensor([2, 0, 1, 2])
    assert model(images, given).class_ids.tolist() == given.tolist()
    predicted = model(images, None)
    assert predicted.class_ids.tolist() == predicted.memory_logits.argmax(dim=1).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
def test_same_seed_gives_identical_weights_after_three_steps(
    params_path: Path, optimizer_name: str
) -> None:
    config = _config(params_path)
    first, second = _build(config, seed=0), _build(config, seed=0)
    other_seed = _build(config, seed=1)
    assert not torch.equal(  # the seed does reach the weights, so the check below can fail
        first.memory.prototypes, other_seed.memory.prototypes
    )
    _train(first, optimizer_name, steps=3)
    _train(second, optimizer_name, steps=3)
    trained, repeated = first.state_dict(), second.state_dict()
    assert trained.keys() == repeated.keys()
    for key, value in trained.items():
        assert torch.equal(value, repeated[key]), key
    assert not torch.equal(
        trained["memory.prototypes"], other_seed.state_dict()["memory.prototypes"]
    )


@pytest.mark.slow
def test_gradients_are_bit_identical_on_every_repeat_at_training_size(params_path: Path) -> None:
    """The tiny test above runs single-threaded kernels; at the default's size (batch 16, 128 px,
    classes repeated in the batch) torch's CPU ops run on several threads. The memory's class
    selection by indexing accumulated its gradients in a thread-dependent order there (3
    distinct gradient sets in 10 repeats); as a one-hot product it is deterministic."""
    config = _config(
        params_path, memory=dataclasses.replace(load_config(params_path).model.memory)
    )
    torch.manual_seed(0)
    model = build_model(config, 6).train()
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(16, 3, 128, 128, generator=g)
    anomalous = normal + torch.randn(16, 3, 128, 128, generator=g)
    mask = (torch.rand(16, 1, 128, 128, generator=g) > 0.8).float()
    class_ids = torch.arange(16) % 6
    with torch.no_grad():
        teacher_normal = model.teacher(normal)
    gradients = set()
    for _ in range(10):
        model.zero_grad()
        output = model(anomalous, class_ids)
        compute_losses(
            output, teacher_normal, mask, class_ids, WEIGHTS, "flatten"
        ).total.backward()
        grads = [p.grad.numpy().tobytes() for p in model.parameters() if p.grad is not None]
        gradients.add(b"".join(grads))
    assert len(gradients) == 1


def test_embed_width_sets_the_channels_of_z_memory_and_decoder_input(params_path: Path) -> None:
    model = _build(_config(params_path, embed_width=4))
    images, _, class_ids = _batch(0, batch=2)
    z = model.bottleneck(model.teacher(images))
    assert tuple(z.shape) == (2, 448, 2, 2)  # 4 x the deepest stage's 112 channels
    assert model.memory.prototypes.shape[-1] == 448
    assert model(images, class_ids).restoration[-1].shape == (2, 112, 4, 4)


def test_one_block_each_builds_the_model_from_before_the_keys(params_path: Path) -> None:
    # bottleneck_blocks = decoder_blocks = 1 (the default until 2026-12-05, and the checkpoint
    # backfill): same parameter names (so old checkpoints load), no extra modules (same initial
    # values).
    names = set(_build(_config(params_path, bottleneck_blocks=1, decoder_blocks=1)).state_dict())
    assert not any(".refine." in name for name in names)
    bigger = set(_build(_config(params_path, bottleneck_blocks=3, decoder_blocks=2)).state_dict())
    assert names < bigger
    assert {name.split(".")[0] for name in bigger - names} == {
        "bottleneck",
        "restoration_decoder",
        "identity_decoder",
    }


def test_extra_blocks_add_the_hand_counted_parameters_and_keep_the_shapes() -> None:
    # RefineBlock(c): two bias-free 3x3 convs (9 c^2 each) and two BatchNorms (2c each)
    decoder = Decoder(32, CHANNELS, blocks=2)
    added = sum(18 * c * c + 4 * c for c in CHANNELS)
    assert _count(decoder) - _count(Decoder(32, CHANNELS)) == added
    outputs = decoder.eval()(torch.randn(2, 32, 2, 2))
    assert [tuple(f.shape) for f in outputs] == [(2, 8, 16, 16), (2, 12, 8, 8), (2, 16, 4, 4)]
    # a stride-1 ResNet bottleneck at D = 32 (width 8): 1x1 32->8, 3x3 8->8, 1x1 8->32, 3 BNs
    per_block = 32 * 8 + 9 * 8 * 8 + 8 * 32 + 2 * (8 + 8 + 32)
    bottleneck = Bottleneck((8, 16), 32, blocks=3)
    assert _count(bottleneck) - _count(Bottleneck((8, 16), 32)) == 2 * per_block
    z = bottleneck.eval()([torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)])
    assert tuple(z.shape) == (2, 32, 2, 2)


def test_a_refine_block_with_zeroed_last_batchnorm_is_the_identity() -> None:
    # so a decoder with extra blocks computes its stages through them, not beside them
    torch.manual_seed(0)
    plain = Decoder(32, CHANNELS).eval()
    deeper = Decoder(32, CHANNELS, blocks=2).eval()
    deeper.load_state_dict(plain.state_dict(), strict=False)
    z = torch.randn(2, 32, 2, 2)
    changed = [torch.equal(a, b) for a, b in zip(plain(z), deeper(z), strict=True)]
    assert not any(changed)
    with torch.no_grad():
        for stage in deeper.refine:
            stage[0].main[-1].weight.zero_()
            stage[0].main[-1].bias.zero_()
    for a, b in zip(plain(z), deeper(z), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_consecutive_stages_are_rejected_naming_the_param(params_path: Path) -> None:
    with pytest.raises(MddnetError, match="model.stages"):
        build_model(_config(params_path, stages=(1, 3)), NUM_CLASSES)


def test_unpretrained_build_does_not_need_the_weight_source(
    params_path: Path, tmp_path: Path, caplog
) -> None:
    config = _config(params_path, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model(config, NUM_CLASSES)
    with caplog.at_level(logging.WARNING):
        model = build_model(config, NUM_CLASSES, pretrained=False)
    assert model.teacher.weights_id == "restored from checkpoint"
    assert not caplog.records  # no "random teacher" warning when a checkpoint follows


def test_memory_params_reach_the_module(params_path: Path) -> None:
    memory = MemoryConfig(
        enabled=True, prototypes=7, temperature=0.05, mode="gated", init="kmeans", init_at=0.1
    )
    model = _build(_config(params_path, memory=memory))
    assert tuple(model.memory.prototypes.shape) == (NUM_CLASSES, 7, 224)
    assert (model.memory.temperature, model.memory.mode) == (0.05, "gated")
    assert model.memory.gate is not None


@pytest.mark.slow
def test_output_carries_the_memory_attention(params_path: Path) -> None:
    model = _build(_config(params_path)).eval()
    images, _, class_ids = _batch(0, batch=2)
    attention = model(images, class_ids).attention
    assert attention.shape == (2, 2 * 2, 4)  # (B, h*w of z, K)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4))


CHANNELS = (8, 12, 16)


def _decoders(skips_zeroed: bool = False) -> tuple[Decoder, Decoder]:
    """A plain decoder and one with teacher skips whose blocks have the same weights."""
    torch.manual_seed(0)
    plain = Decoder(32, CHANNELS).eval()
    torch.manual_seed(0)
    skipped = Decoder(32, CHANNELS, skips=True).eval()
    if skips_zeroed:
        with torch.no_grad():
            for projection in skipped.skips:
                projection.weight.zero_()
                projection.bias.zero_()
    return plain, skipped


def _decoder_inputs() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 32, 2, 2, generator=g)
    teacher = [
        torch.randn(2, c, s, s, generator=g) for c, s in zip(CHANNELS, (16, 8, 4), strict=True)
    ]
    return z, teacher


def test_a_decoder_without_skips_ignores_the_teacher() -> None:
    plain, _ = _decoders()
    assert plain.skips is None
    z, teacher = _decoder_inputs()
    for alone, given in zip(plain(z), plain(z, teacher), strict=True):
        assert torch.equal(alone, given)


def test_skips_add_a_projection_of_the_teacher_at_each_scale() -> None:
    plain, skipped = _decoders()
    z, teacher = _decoder_inputs()
    expected, got = plain(z), skipped(z, teacher)
    assert [f.shape for f in got] == [f.shape for f in expected]
    # The deepest block reads z alone: its output is the plain one plus the 1x1 projection.
    deepest = skipped.skips[0]
    torch.testing.assert_close(got[-1], expected[-1] + deepest(teacher[-1]))
    # The shallower blocks read what the skips changed, so every scale differs.
    assert all(not torch.allclose(a, b) for a, b in zip(got, expected, strict=True))
    # With the projections at zero, the skip decoder is the plain one.
    plain, zeroed = _decoders(skips_zeroed=True)
    for a, b in zip(zeroed(z, teacher), plain(z), strict=True):
        torch.testing.assert_close(a, b)


def test_a_decoder_with_skips_needs_the_teacher_maps() -> None:
    _, skipped = _decoders()
    z, _ = _decoder_inputs()
    with pytest.raises(ValueError, match="teacher skips: pass the teacher's maps"):
        skipped(z)


@pytest.mark.slow
def test_identity_skips_reach_the_identity_decoder_only(params_path: Path) -> None:
    model = _build(_config(params_path, identity_skips=True)).eval()
    assert model.identity_decoder.skips is not None and model.restoration_decoder.skips is None
    images, _, class_ids = _batch(0, batch=2)
    output = model(images, class_ids)
    assert [f.shape for f in output.identity] == [f.shape for f in output.teacher]
    plain = _build(_config(params_path, identity_skips=False)).eval()
    skip_parameters = sum(p.numel() for p in model.identity_decoder.skips.parameters())
    assert _count(model) - _count(plain) == skip_parameters == 24 * 25 + 40 * 41 + 112 * 113
