"""Typed, validated configuration: `params.yaml` loaded into frozen dataclasses.

`params.yaml` is the single source of truth, so the dataclasses carry no defaults: every key must
be present, unknown keys are rejected, and each error names the file and the full key path. A
variant (`variants.<name>.override`) is deep-merged into the sections before validation, and every
variant is validated when the file is loaded, so a typo in an ablation fails at once, not hours
later.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    "BenchmarkConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "FiguresConfig",
    "FusionConfig",
    "LossWeights",
    "MemoryConfig",
    "ModelConfig",
    "ReportConfig",
    "SynthesisConfig",
    "TrainConfig",
    "Variant",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]


class ConfigError(ValueError):
    """A params file that cannot be turned into a `Config`; the message names file and key."""


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


def _min(value: float, *, exclusive: bool = False) -> dict[str, Any]:
    return {"min": value, "exclusive": exclusive}


@dataclass(frozen=True)
class BenchmarkConfig:
    """The offline benchmark that `mddnet make-benchmark` generates (MVTec layout)."""

    classes: tuple[str, ...]
    image_size: int = field(metadata=_min(16))
    train_per_class: int = field(metadata=_min(1))
    test_good_per_class: int = field(metadata=_min(1))
    test_defect_per_class: int = field(metadata=_min(1))


@dataclass(frozen=True)
class SynthesisConfig:
    """Training-time anomaly synthesis that turns a normal x_n into (x_a, M)."""

    kind: str = field(metadata=_choices("perlin", "simplex", "none"))
    probability: float = field(metadata=_min(0.0))
    strength: tuple[float, float]
    texture_source: str = field(metadata=_choices("other_class", "procedural", "mixed"))
    perlin_max_scale: int = field(metadata=_min(1))
    threshold: float


@dataclass(frozen=True)
class DataConfig:
    """Where the MVTec-layout dataset lies and how images are fed to the model."""

    dataset: str
    root: str
    generate: bool
    classes: tuple[str, ...]
    image_size: int = field(metadata=_min(16))
    num_workers: int = field(metadata=_min(0))
    benchmark: BenchmarkConfig
    synthesis: SynthesisConfig

    def root_path(self) -> Path:
        """`root` with environment variables expanded; an unset variable is an error."""
        expanded = os.path.expandvars(self.root)
        if "$" in expanded:
            raise ConfigError(
                f"data.root: {self.root!r} names an environment variable that is not set; "
                f"export it (e.g. MDDNET_DATA_ROOT=/path/to/mvtec) or write the path in params"
            )
        return Path(expanded).expanduser()


@dataclass(frozen=True)
class MemoryConfig:
    """Class-aware memory module (CMM): per-class prototypes read on the bottleneck embedding."""

    enabled: bool
    prototypes: int = field(metadata=_min(1))
    temperature: float = field(metadata=_min(0.0, exclusive=True))
    mode: str = field(metadata=_choices("replace", "mix"))


@dataclass(frozen=True)
class ModelConfig:
    """Teacher, bottleneck, decoders and memory."""

    backbone: str
    weights: str
    stages: tuple[int, ...]
    identity_decoder: bool
    memory: MemoryConfig


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; a zero weight removes the term (a loss ablation)."""

    restoration: float = field(metadata=_min(0.0))
    identity: float = field(metadata=_min(0.0))
    discrepancy: float = field(metadata=_min(0.0))
    memory: float = field(metadata=_min(0.0))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation protocol (Adam with one step decay, the RD family's recipe)."""

    epochs: int = field(metadata=_min(1))
    batch_size: int = field(metadata=_min(1))
    lr: float = field(metadata=_min(0.0, exclusive=True))
    betas: tuple[float, float]
    weight_decay: float = field(metadata=_min(0.0))
    lr_step_at: float = field(metadata=_min(0.0))
    lr_gamma: float = field(metadata=_min(0.0, exclusive=True))
    cosine: str = field(metadata=_choices("flatten", "pixel"))
    discrepancy_reduction: str = field(metadata=_choices("mean", "balanced"))
    loss_weights: LossWeights
    checkpoint_every: int = field(metadata=_min(1))
    device: str = field(metadata=_choices("auto", "cpu", "cuda"))
    channels_last: bool
    precision: str = field(metadata=_choices("fp32", "bf16", "fp16"))


@dataclass(frozen=True)
class FusionConfig:
    """Weights of the two discrepancy maps in the fused anomaly map."""

    teacher_restoration: float = field(metadata=_min(0.0))
    restoration_identity: float = field(metadata=_min(0.0))


@dataclass(frozen=True)
class EvaluateConfig:
    """Scoring (maps, fusion, blur, image score) and metric settings."""

    batch_size: int = field(metadata=_min(1))
    fusion: FusionConfig
    blur_sigma: float = field(metadata=_min(0.0))
    image_score: str = field(metadata=_choices("max", "topk_mean"))
    topk: int = field(metadata=_min(1))
    class_source: str = field(metadata=_choices("label", "predicted"))
    aupro_fpr_limit: float = field(metadata=_min(0.0, exclusive=True))


@dataclass(frozen=True)
class ReportConfig:
    """Tables: the main variant, the rows of the ablation and scoring tables, rounding, and the
    published reference rows."""

    main_variant: str
    ablation: tuple[str, ...]
    scoring: tuple[str, ...]
    decimals: int = field(metadata=_min(0))
    reference: str
    reference_dataset: str
    comparable: bool
    reproduced: tuple[str, ...]


@dataclass(frozen=True)
class FiguresConfig:
    """Figures: formats, resolution, qualitative examples per class, variants in the curves."""

    formats: tuple[str, ...]
    compare: tuple[str, ...]
    dpi: int = field(metadata=_min(10))
    qualitative_per_class: int = field(metadata=_min(1))
    style: str


@dataclass(frozen=True)
class Variant:
    """One named experiment: a label for tables and an override merged into the sections.

    `checkpoint` names the variant whose trained weights this one evaluates; `None` means it trains
    its own (scoring ablations evaluate the `mddnet` checkpoint without retraining).
    """

    label: str
    override: Mapping[str, Any]
    checkpoint: str | None


@dataclass(frozen=True)
class Config:
    """The whole validated params file, with at most one variant applied."""

    seed: int = field(metadata=_min(0))
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    report: ReportConfig
    figures: FiguresConfig
    variants: Mapping[str, Variant]
    variant: str | None = None

    @property
    def checkpoint_variant(self) -> str | None:
        """The variant whose checkpoint this config evaluates (itself unless it borrows one)."""
        if self.variant is None:
            return None
        return self.variants[self.variant].checkpoint or self.variant


_SECTIONS = ("data", "model", "train", "evaluate", "report", "figures")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {_type_name(args[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Builder:
    """Turns nested dicts into the dataclasses, collecting the key path for error messages."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {message}")

    def build(self, cls: type, raw: Any, path: str) -> Any:
        if not isinstance(raw, Mapping):
            raise self.fail(path, f"expected a mapping of {cls.__name__} keys, got {raw!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "variant"}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            key = unknown[0]
            raise self.fail(
                _join(path, key), f"unknown key (expected one of: {', '.join(fields)})"
            )
        missing = [name for name in fields if name not in raw]
        if missing:
            raise self.fail(_join(path, missing[0]), "missing key")
        values = {}
        for name, f in fields.items():
            key_path = _join(path, name)
            value = self.convert(hints[name], raw[name], key_path)
            self.check_range(f.metadata, value, key_path)
            values[name] = value
        return cls(**values)

    def convert(self, tp: Any, value: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, path)
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            return self.convert(inner[0], value, path)
        if origin is tuple:
            args = typing.get_args(tp)
            if not isinstance(value, list | tuple):
                raise self.fail(path, f"expected {_type_name(tp)}, got {value!r}")
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(self.convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
            if len(value) != len(args):
                raise self.fail(path, f"expected {_type_name(tp)}, got {value!r}")
            return tuple(
                self.convert(a, v, f"{path}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        if origin in (Mapping, dict) or tp is Mapping:
            if not isinstance(value, Mapping):
                raise self.fail(path, f"expected a mapping, got {value!r}")
            key_tp, value_tp = typing.get_args(tp) or (str, Any)
            if value_tp is Any:
                return types.MappingProxyType(copy.deepcopy(dict(value)))
            return types.MappingProxyType(
                {k: self.convert(value_tp, v, _join(path, k)) for k, v in value.items()}
            )
        if tp is bool:
            if not isinstance(value, bool):
                raise self.fail(path, f"expected true or false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(path, f"expected an integer, got {value!r}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self.fail(path, f"expected a number, got {value!r}")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise self.fail(path, f"expected a string, got {value!r}")
            return value
        raise TypeError(f"config field type {tp!r} is not supported")  # a bug in this module

    def check_range(self, metadata: Mapping[str, Any], value: Any, path: str) -> None:
        if "choices" in metadata and value not in metadata["choices"]:
            raise self.fail(
                path, f"must be one of {', '.join(metadata['choices'])}, got {value!r}"
            )
        if "min" in metadata:
            low = metadata["min"]
            if metadata["exclusive"] and not value > low:
                raise self.fail(path, f"must be > {low}, got {value!r}")
            if not metadata["exclusive"] and not value >= low:
                raise self.fail(path, f"must be >= {low}, got {value!r}")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return `base` with `override` merged in, recursing into mappings (override wins)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_override_keys(
    builder: _Builder, base: Mapping[str, Any], override: Any, path: str
) -> None:
    """Reject override keys that do not exist in the base params (typos in ablations)."""
    if not isinstance(override, Mapping):
        raise builder.fail(path, f"expected a mapping, got {override!r}")
    for key, value in override.items():
        if key not in base:
            raise builder.fail(
                _join(path, key), f"unknown key (expected one of: {', '.join(map(str, base))})"
            )
        if isinstance(value, Mapping) and isinstance(base[key], Mapping):
            _check_override_keys(builder, base[key], value, _join(path, key))


def _check_consistency(builder: _Builder, config: Config, path: str) -> None:
    """Cross-field rules that one key alone cannot express."""
    if not config.model.identity_decoder:
        if config.evaluate.fusion.restoration_identity > 0:
            raise builder.fail(
                _join(path, "evaluate.fusion.restoration_identity"),
                "must be 0 when model.identity_decoder is false (there is no identity map)",
            )
        for term in ("identity", "discrepancy"):
            if getattr(config.train.loss_weights, term) > 0:
                raise builder.fail(
                    _join(path, f"train.loss_weights.{term}"),
                    "must be 0 when model.identity_decoder is false",
                )
    if not config.model.memory.enabled:
        if config.train.loss_weights.memory > 0:
            raise builder.fail(
                _join(path, "train.loss_weights.memory"),
                "must be 0 when model.memory.enabled is false",
            )
        if config.evaluate.class_source == "predicted":
            raise builder.fail(
                _join(path, "evaluate.class_source"),
                "'predicted' needs model.memory.enabled (the memory predicts the class)",
            )
    low, high = config.train.betas
    if not (0 <= low < 1 and 0 <= high < 1):
        raise builder.fail(
            _join(path, "train.betas"), f"each beta must be in [0, 1), got {low, high}"
        )
    low, high = config.data.synthesis.strength
    if not 0 <= low <= high <= 1:
        raise builder.fail(
            _join(path, "data.synthesis.strength"), f"need 0 <= low <= high <= 1, got {low, high}"
        )
    if config.data.synthesis.probability > 1:
        raise builder.fail(_join(path, "data.synthesis.probability"), "must be <= 1")
    if config.train.lr_step_at > 1:
        raise builder.fail(_join(path, "train.lr_step_at"), "must be a fraction of epochs <= 1")
    if (
        config.evaluate.fusion.teacher_restoration + config.evaluate.fusion.restoration_identity
        <= 0
    ):
        raise builder.fail(_join(path, "evaluate.fusion"), "at least one weight must be > 0")
    if len(set(config.model.stages)) != len(config.model.stages) or not config.model.stages:
        raise builder.fail(_join(path, "model.stages"), "must be distinct stage indices")
    bad_formats = sorted(set(config.figures.formats) - {"png", "pdf", "svg"})
    if bad_formats:
        raise builder.fail(
            _join(path, "figures.formats"), f"unsupported {bad_formats}: use png, pdf, svg"
        )


def _check_variant_names(builder: _Builder, config: Config) -> None:
    """Variant names in report and figures must exist (a typo would silently drop a row)."""
    names = {
        "report.main_variant": (config.report.main_variant,),
        "report.ablation": config.report.ablation,
        "report.scoring": config.report.scoring,
        "report.reproduced": config.report.reproduced,
        "figures.compare": config.figures.compare,
    }
    for key, values in names.items():
        for value in values:
            if value not in config.variants:
                raise builder.fail(
                    key, f"unknown variant {value!r} (valid: {', '.join(config.variants)})"
                )
    untrained = [n for n in config.figures.compare if config.variants[n].checkpoint is not None]
    if untrained:
        raise builder.fail(
            "figures.compare",
            f"{untrained[0]!r} trains no model of its own (no losses to plot): "
            f"list variants without a checkpoint key",
        )
    if config.report.main_variant not in config.figures.compare:
        raise builder.fail(
            "figures.compare", f"must include report.main_variant {config.report.main_variant!r}"
        )


def _from_raw(raw: Any, source: str, variant: str | None) -> Config:
    builder = _Builder(source)
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    sections = {k: v for k, v in raw.items() if k != "variants"}
    raw_variants = raw.get("variants", {})
    if not isinstance(raw_variants, Mapping):
        raise builder.fail(
            "variants", f"expected a mapping of variant names, got {raw_variants!r}"
        )
    base = builder.build(Config, {**sections, "variants": {}}, "")
    _check_consistency(builder, base, "")
    variants = {}
    for name, spec in raw_variants.items():
        path = f"variants.{name}"
        if not isinstance(spec, Mapping):
            raise builder.fail(path, "expected a mapping with keys label, override, checkpoint")
        variants[name] = builder.build(Variant, {"checkpoint": None, **spec}, path)
        _check_override_keys(builder, sections, variants[name].override, f"{path}.override")
    for name, spec in variants.items():
        if spec.checkpoint is not None:
            target = variants.get(spec.checkpoint)
            if target is None or target.checkpoint is not None:
                trainable = [n for n, v in variants.items() if v.checkpoint is None]
                raise builder.fail(
                    f"variants.{name}.checkpoint",
                    f"must name a variant that trains its own checkpoint (one of: "
                    f"{', '.join(trainable)}), got {spec.checkpoint!r}",
                )
    base = dataclasses.replace(base, variants=types.MappingProxyType(variants))
    _check_variant_names(builder, base)
    applied = None
    for name, spec in variants.items():
        merged = {**deep_merge(sections, spec.override), "variants": {}}
        path = f"variants.{name}.override"
        built = builder.build(Config, merged, path)
        built = dataclasses.replace(built, variants=base.variants, variant=name)
        _check_consistency(builder, built, path)
        if name == variant:
            applied = built
    if variant is None:
        return base
    if applied is None:
        raise ConfigError(
            f"{source}: unknown variant {variant!r} "
            f"(valid variants: {', '.join(variants) or 'none'})"
        )
    return applied


def load_config(
    path: str | Path, variant: str | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Load and validate a params file, optionally applying one variant and extra overrides.

    `overrides` (nested dict) is merged into the file before anything else; tests and the CLI use
    it to shrink a run without writing another params file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file not found (pass --params with a YAML file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if overrides:
        builder = _Builder(f"{path} (overrides)")
        _check_override_keys(builder, raw if isinstance(raw, Mapping) else {}, overrides, "")
        raw = deep_merge(raw, overrides)
    return _from_raw(raw, str(path), variant)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict of a config (for checkpoints, provenance and yaml dumps)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return plain(config)


def config_from_dict(raw: Mapping[str, Any], source: str = "<checkpoint>") -> Config:
    """Rebuild a `Config` saved with `config_to_dict` (its variant is already applied).

    The overrides of the stored variants are dropped: they were merged into the sections when the
    config was made, and only the labels and the applied variant's name matter afterwards.
    """
    raw = dict(raw)
    variant = raw.pop("variant", None)
    raw["variants"] = {
        name: {**spec, "override": {}} for name, spec in raw.get("variants", {}).items()
    }
    return dataclasses.replace(_from_raw(raw, source, None), variant=variant)
