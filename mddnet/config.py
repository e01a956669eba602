"""Typed, validated configuration: a params file loaded into frozen dataclasses.

A params file is the single source of truth of a run. It is either whole (`params.yaml`, the
offline default) or states only what differs from another file it `extends` (`configs/*.yaml`,
`pipelines/<name>/params.yaml`); the chain is merged before validation. The dataclasses carry no
defaults: every key must be present after merging, unknown keys are rejected, and each error names
the file and the full key path. Every option with a fixed set of values is declared once here as a
`Literal`; the components trust the validated config. A variant (`variants.<name>.override`) is
deep-merged into the sections, and every variant is validated when the file is loaded, so a typo
in an ablation fails at once, not hours later. A `Config` holds one applied variant and one seed;
the table of all variants lives in `Params`.
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
from typing import Any, Literal, Union

import yaml

from mddnet.errors import MddnetError

__all__ = [
    "BenchmarkConfig",
    "CalibrationConfig",
    "Config",
    "ConfigError",
    "CpuConfig",
    "DataConfig",
    "EvaluateConfig",
    "FiguresConfig",
    "FusionConfig",
    "LossWeights",
    "MemoryConfig",
    "ModelConfig",
    "Params",
    "ReferenceConfig",
    "ReportConfig",
    "SynthesisConfig",
    "TrainConfig",
    "Variant",
    "config_from_dict",
    "config_to_dict",
    "deep_merge",
    "load_config",
    "load_params",
    "read_params",
]

# Every option's values, declared once ([ours] unless the paper states it; see params.yaml).
Isa = Literal["avx2", "native"]
SynthesisKind = Literal["perlin", "simplex", "cutpaste", "perlin_cutpaste", "none"]
TextureSource = Literal["other_class", "procedural", "mixed"]
MemoryMode = Literal["replace", "mix", "gated"]
MemoryInit = Literal["random", "kmeans"]
Cosine = Literal["flatten", "pixel"]
Reduction = Literal["mean", "balanced"]
DiscrepancyTarget = Literal["mask", "teacher"]
DiscrepancyGradient = Literal["both", "identity"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]
ImageScore = Literal["max", "topk_mean"]
ClassSource = Literal["label", "predicted"]
Validated = Literal["validated"]  # a value chosen on validation data at calibration time
FigureFormat = Literal["png", "pdf", "svg"]


class ConfigError(MddnetError):
    """A params file that cannot be turned into a `Config`; the message names file and key."""


def _min(value: float, *, exclusive: bool = False) -> dict[str, Any]:
    return {"min": value, "exclusive": exclusive}


@dataclass(frozen=True)
class CpuConfig:
    """CPU kernel pinning: the same numbers on x86-64 CPUs of one maker (see `kernels`)."""

    isa: Isa
    threads: int | None = field(metadata=_min(1))


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

    kind: SynthesisKind
    probability: float = field(metadata=_min(0.0))
    strength: tuple[float, float]
    texture_source: TextureSource
    perlin_max_scale: int = field(metadata=_min(1))
    threshold: float


@dataclass(frozen=True)
class DataConfig:
    """Where the MVTec-layout dataset lies and how images are fed to the model."""

    dataset: str
    root: str | tuple[str, ...]
    generate: bool
    classes: tuple[str, ...]
    image_size: int = field(metadata=_min(16))
    num_workers: int = field(metadata=_min(0))
    benchmark: BenchmarkConfig
    synthesis: SynthesisConfig

    def root_paths(self) -> tuple[Path, ...]:
        """Every root with environment variables expanded; an unset variable is an error.

        Several roots are read as one dataset (their class folders side by side), so classes of
        different datasets make one multi-class set without copying or linking files.
        """
        roots = (self.root,) if isinstance(self.root, str) else self.root
        expanded = tuple(os.path.expandvars(r) for r in roots)
        for raw, value in zip(roots, expanded, strict=True):
            if "$" in value:
                raise ConfigError(
                    f"data.root: {raw!r} names an environment variable that is not set; export "
                    f"it (e.g. MDDNET_REAL_DATA=/path/to/data) or write the path in params"
                )
        return tuple(Path(value).expanduser() for value in expanded)


@dataclass(frozen=True)
class MemoryConfig:
    """Class-aware memory module (CMM): per-class prototypes read on the bottleneck embedding."""

    enabled: bool
    prototypes: int = field(metadata=_min(1))
    temperature: float = field(metadata=_min(0.0, exclusive=True))
    mode: MemoryMode
    init: MemoryInit
    init_at: float = field(metadata=_min(0.0))


@dataclass(frozen=True)
class ModelConfig:
    """Teacher, bottleneck, decoders and memory."""

    backbone: str
    weights: str
    stages: tuple[int, ...]
    identity_decoder: bool
    identity_skips: bool
    identity_detached: bool
    embed_width: int = field(metadata=_min(1))  # [ours] D of z = this x the deepest stage channels
    bottleneck_blocks: int = field(metadata=_min(1))  # [ours] residual blocks that make z
    decoder_blocks: int = field(metadata=_min(1))  # [ours] residual blocks per decoder stage
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

    steps: int = field(metadata=_min(1))
    batch_size: int = field(metadata=_min(1))
    lr: float = field(metadata=_min(0.0, exclusive=True))
    betas: tuple[float, float]
    weight_decay: float = field(metadata=_min(0.0))
    lr_step_at: float = field(metadata=_min(0.0))
    lr_gamma: float = field(metadata=_min(0.0, exclusive=True))
    cosine: Cosine
    discrepancy_reduction: Reduction
    discrepancy_target: DiscrepancyTarget
    discrepancy_gradient: DiscrepancyGradient
    loss_weights: LossWeights
    checkpoint_every: int = field(metadata=_min(1))
    cache_teacher: bool
    device: Device
    channels_last: bool
    precision: Precision


@dataclass(frozen=True)
class CalibrationConfig:
    """Per-class map statistics and scoring choices made on held-out training normals."""

    holdout: float = field(metadata=_min(0.0))
    scale_weights: tuple[tuple[float, ...], ...]  # [ours] one weight per teacher scale each
    restoration_identity: tuple[float, ...]
    image_score: tuple[ImageScore, ...]
    margin: float = field(metadata=_min(0.0))


@dataclass(frozen=True)
class FusionConfig:
    """How the two discrepancy maps become one anomaly map."""

    normalise: bool | Validated
    scale_weights: tuple[float, ...] | Validated | None  # None: the plain sum over scales
    teacher_restoration: float = field(metadata=_min(0.0))
    restoration_identity: float | Validated = field(metadata=_min(0.0))


@dataclass(frozen=True)
class EvaluateConfig:
    """Scoring (maps, fusion, blur, image score) and metric settings."""

    batch_size: int = field(metadata=_min(1))
    fusion: FusionConfig
    blur_sigma: float = field(metadata=_min(0.0))
    image_score: ImageScore | Validated
    topk: int = field(metadata=_min(1))
    class_source: ClassSource
    aupro_fpr_limit: float = field(metadata=_min(0.0, exclusive=True))


@dataclass(frozen=True)
class ReferenceConfig:
    """The training-free reference row: per-class nearest-neighbour patch distances."""

    stages: tuple[int, ...]
    coreset: float = field(metadata=_min(0.0, exclusive=True))
    neighbourhood: int = field(metadata=_min(1))


@dataclass(frozen=True)
class ReportConfig:
    """Tables: the main variant, the component chain, the ablation and scoring rows, rounding,
    and the published reference rows."""

    main_variant: str
    chain: tuple[str, ...]
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

    formats: tuple[FigureFormat, ...]
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
    """One run: the validated sections with at most one variant applied, and its seed."""

    seeds: tuple[int, ...]
    cpu: CpuConfig
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    calibration: CalibrationConfig
    evaluate: EvaluateConfig
    reference: ReferenceConfig
    report: ReportConfig
    figures: FiguresConfig
    seed: int = 0  # the run's seed: one of `seeds` (the first unless a stage names another)
    variant: str | None = None
    label: str | None = None  # the applied variant's label
    checkpoint_variant: str | None = None  # whose checkpoint it evaluates (itself by default)

    @property
    def run(self) -> str:
        """The run's file stem, `<variant>-s<seed>`: checkpoints, metrics and losses use it."""
        return f"{self.variant or 'params'}-s{self.seed}"


_RUNTIME = ("seed", "variant", "label", "checkpoint_variant")  # set by loading, not in params


@dataclass(frozen=True)
class Params:
    """A loaded params file: the base sections and every variant, all validated."""

    source: str
    base: Config
    variants: Mapping[str, Variant]
    _configs: Mapping[str, Config] = field(repr=False)

    def config(self, variant: str | None = None, seed: int | None = None) -> Config:
        """The config of one run: `variant` applied (None: the base) with `seed` (first seed)."""
        if variant is None:
            config = self.base
        elif variant in self._configs:
            config = self._configs[variant]
        else:
            raise ConfigError(
                f"{self.source}: unknown variant {variant!r} "
                f"(valid variants: {', '.join(self.variants) or 'none'})"
            )
        seed = config.seeds[0] if seed is None else seed
        if seed not in config.seeds:
            raise ConfigError(
                f"{self.source}: seed {seed} is not in seeds {list(config.seeds)}; add it there"
            )
        return dataclasses.replace(config, seed=seed)

    def labels(self, names: typing.Iterable[str]) -> dict[str, str]:
        """`{variant: label}` for the named variants, in that order."""
        return {name: self.variants[name].label for name in names}

    def trained(self) -> list[str]:
        """The variants that train a checkpoint of their own, in file order."""
        return [name for name, v in self.variants.items() if v.checkpoint is None]


_SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in _RUNTIME)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
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
        skipped = _RUNTIME if cls is Config else ()
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skipped}
        unknown = sorted(set(raw) - set(fields), key=str)
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
            return self._union(tp, value, path)
        if origin is Literal:
            if value not in typing.get_args(tp):
                raise self.fail(path, f"must be one of {_type_name(tp)}, got {value!r}")
            return value
        if origin is tuple:
            return self._tuple(tp, value, path)
        if origin in (Mapping, dict) or tp is Mapping:
            if not isinstance(value, Mapping):
                raise self.fail(path, f"expected a mapping, got {value!r}")
            return types.MappingProxyType(copy.deepcopy(dict(value)))
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

    def _union(self, tp: Any, value: Any, path: str) -> Any:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise self.fail(path, f"expected {_type_name(tp)}, got null")
        for arg in (a for a in args if a is not type(None)):
            try:
                return self.convert(arg, value, path)
            except ConfigError:
                continue
        raise self.fail(path, f"expected {_type_name(tp)}, got {value!r}")

    def _tuple(self, tp: Any, value: Any, path: str) -> tuple[Any, ...]:
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

    def check_range(self, metadata: Mapping[str, Any], value: Any, path: str) -> None:
        if "min" not in metadata or not isinstance(value, int | float) or value is None:
            return
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


def _require(builder: _Builder, ok: bool, path: str, key: str, message: str) -> None:
    if not ok:
        raise builder.fail(_join(path, key), message)


def _check_parts(builder: _Builder, config: Config, path: str) -> None:
    """Weights and scoring must only name parts the model has."""
    weights, fusion = config.train.loss_weights, config.evaluate.fusion
    if not config.model.identity_decoder:
        _require(
            builder,
            fusion.restoration_identity == 0,
            path,
            "evaluate.fusion.restoration_identity",
            "must be 0 when model.identity_decoder is false (there is no identity map)",
        )
        for term in ("identity", "discrepancy"):
            _require(
                builder,
                getattr(weights, term) == 0,
                path,
                f"train.loss_weights.{term}",
                "must be 0 when model.identity_decoder is false",
            )
    if not config.model.memory.enabled:
        _require(
            builder,
            weights.memory == 0,
            path,
            "train.loss_weights.memory",
            "must be 0 when model.memory.enabled is false",
        )
        _require(
            builder,
            config.evaluate.class_source == "label",
            path,
            "evaluate.class_source",
            "'predicted' needs model.memory.enabled (the memory predicts the class)",
        )
    _require(
        builder,
        fusion.teacher_restoration > 0 or fusion.restoration_identity != 0,
        path,
        "evaluate.fusion",
        "at least one weight must be > 0",
    )


def _check_ranges(builder: _Builder, config: Config, path: str) -> None:
    """Cross-field and interval rules that one key's type cannot express."""
    low, high = config.train.betas
    _require(
        builder,
        0 <= low < 1 and 0 <= high < 1,
        path,
        "train.betas",
        f"each beta must be in [0, 1), got {low, high}",
    )
    low, high = config.data.synthesis.strength
    _require(
        builder,
        0 <= low <= high <= 1,
        path,
        "data.synthesis.strength",
        f"need 0 <= low <= high <= 1, got {low, high}",
    )
    _require(
        builder, config.data.synthesis.probability <= 1, path, "data.synthesis.probability", "<= 1"
    )
    _require(builder, config.train.lr_step_at <= 1, path, "train.lr_step_at", "a fraction <= 1")
    _require(builder, config.calibration.holdout < 1, path, "calibration.holdout", "must be < 1")
    _require(
        builder, config.model.memory.init_at < 1, path, "model.memory.init_at", "a fraction < 1"
    )
    stages = config.model.stages
    _require(
        builder, len(set(stages)) == len(stages) > 0, path, "model.stages", "distinct indices"
    )
    fixed = config.evaluate.fusion.scale_weights
    candidates = {
        "calibration.scale_weights": config.calibration.scale_weights,
        "evaluate.fusion.scale_weights": (fixed,) if isinstance(fixed, tuple) else (),
    }
    for key, weights in candidates.items():
        _require(
            builder,
            all(len(w) == len(stages) and min(w) >= 0 < max(w) for w in weights),
            path,
            key,
            f"each entry needs one weight >= 0 per teacher scale ({len(stages)}, model.stages), "
            f"not all 0; got {[list(w) for w in weights]}",
        )
    _require(
        builder,
        len(config.calibration.scale_weights) > 0,
        path,
        "calibration.scale_weights",
        "list at least one candidate (e.g. [[1, 1, 1]], the plain sum over three scales)",
    )
    seeds = config.seeds
    _require(
        builder,
        len(set(seeds)) == len(seeds) > 0 and min(seeds) >= 0,
        path,
        "seeds",
        f"need one or more distinct seeds >= 0, got {list(seeds)}",
    )


def _check_variant_names(builder: _Builder, config: Config, variants: Mapping[str, Any]) -> None:
    """Variant names in report and figures must exist (a typo would silently drop a row)."""
    names = {
        "report.main_variant": (config.report.main_variant,),
        "report.chain": config.report.chain,
        "report.ablation": config.report.ablation,
        "report.scoring": config.report.scoring,
        "report.reproduced": config.report.reproduced,
        "figures.compare": config.figures.compare,
    }
    for key, values in names.items():
        for value in values:
            if value not in variants:
                raise builder.fail(
                    key, f"unknown variant {value!r} (valid: {', '.join(variants)})"
                )
    borrowed = [
        n for n in (*config.figures.compare, *config.report.chain) if variants[n].checkpoint
    ]
    if borrowed:
        raise builder.fail(
            "figures.compare" if borrowed[0] in config.figures.compare else "report.chain",
            f"{borrowed[0]!r} trains no model of its own: list variants without a checkpoint key",
        )
    if config.report.main_variant not in config.figures.compare:
        raise builder.fail(
            "figures.compare", f"must include report.main_variant {config.report.main_variant!r}"
        )


def _build_variants(
    builder: _Builder, sections: Mapping[str, Any], raw_variants: Any
) -> dict[str, Variant]:
    if not isinstance(raw_variants, Mapping):
        raise builder.fail(
            "variants", f"expected a mapping of variant names, got {raw_variants!r}"
        )
    variants = {}
    for name, spec in raw_variants.items():
        path = f"variants.{name}"
        if not isinstance(spec, Mapping):
            raise builder.fail(path, "expected a mapping with keys label, override, checkpoint")
        variants[name] = builder.build(Variant, {"checkpoint": None, **spec}, path)
        _check_override_keys(builder, sections, variants[name].override, f"{path}.override")
    trainable = [n for n, v in variants.items() if v.checkpoint is None]
    for name, spec in variants.items():
        if spec.checkpoint is not None and spec.checkpoint not in trainable:
            raise builder.fail(
                f"variants.{name}.checkpoint",
                f"must name a variant that trains its own checkpoint (one of: "
                f"{', '.join(trainable)}), got {spec.checkpoint!r}",
            )
    return variants


def _from_raw(raw: Any, source: str, *, whole_file: bool = True) -> Params:
    """Validate raw params; `whole_file=False` for a stored run config, which has no variants
    table to check the report's variant names against."""
    builder = _Builder(source)
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    sections = {k: v for k, v in raw.items() if k != "variants"}
    base = builder.build(Config, sections, "")
    _check_parts(builder, base, "")
    _check_ranges(builder, base, "")
    variants = _build_variants(builder, sections, raw.get("variants", {}))
    if whole_file:
        _check_variant_names(builder, base, variants)
    configs = {}
    for name, spec in variants.items():
        path = f"variants.{name}.override"
        built = builder.build(Config, deep_merge(sections, spec.override), path)
        _check_parts(builder, built, path)
        _check_ranges(builder, built, path)
        configs[name] = dataclasses.replace(
            built, variant=name, label=spec.label, checkpoint_variant=spec.checkpoint or name
        )
    return Params(source, base, types.MappingProxyType(variants), types.MappingProxyType(configs))


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file not found (pass --params with a YAML file)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err


def read_params(path: str | Path) -> tuple[dict[str, Any], tuple[Path, ...]]:
    """The raw params of `path` with its `extends` chain merged in, and the chain's files.

    `extends: <file>` (relative to the extending file) makes a file state only what differs
    from its base; each of its keys must exist in the base, so a typo cannot add a setting.
    """
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, Mapping) or "extends" not in raw:
        return raw, (path,)
    raw = dict(raw)
    base_file = path.parent / str(raw.pop("extends"))
    base, chain = read_params(base_file)
    _check_override_keys(_Builder(str(path)), base, raw, "")
    return deep_merge(base, raw), (*chain, path)


def load_params(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Params:
    """Load and validate a params file (its `extends` chain merged) and every variant in it.

    `overrides` (nested dict) is merged in last; tests and the CLI use it to shrink a run
    without writing another params file.
    """
    raw, _ = read_params(path)
    if overrides:
        builder = _Builder(f"{path} (overrides)")
        _check_override_keys(builder, raw if isinstance(raw, Mapping) else {}, overrides, "")
        raw = deep_merge(raw, overrides)
    return _from_raw(raw, str(path))


def load_config(
    path: str | Path,
    variant: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> Config:
    """The config of one run: `path` loaded, `variant` applied, with `seed` (default first)."""
    return load_params(path, overrides).config(variant, seed)


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


# Keys added after checkpoints were first written, with the value those checkpoints were trained
# with; `config_from_dict` fills them in, so older checkpoints still load.
_CHECKPOINT_DEFAULTS = {
    ("model", "embed_width"): 2,
    ("model", "bottleneck_blocks"): 1,
    ("model", "decoder_blocks"): 1,
}


def config_from_dict(raw: Mapping[str, Any], source: str = "<checkpoint>") -> Config:
    """Rebuild a `Config` saved with `config_to_dict` (its variant and seed already applied)."""
    raw = dict(raw)
    for (section, key), value in _CHECKPOINT_DEFAULTS.items():
        if isinstance(raw.get(section), Mapping) and key not in raw[section]:
            raw[section] = {**raw[section], key: value}
    runtime = {key: raw.pop(key, None) for key in _RUNTIME}
    config = _from_raw(raw, source, whole_file=False).base
    return dataclasses.replace(config, **{k: v for k, v in runtime.items() if v is not None})
