from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from mddnet.config import (
    Config,
    ConfigError,
    Params,
    config_from_dict,
    config_to_dict,
    deep_merge,
    load_config,
    load_params,
    read_params,
)
from mddnet.data.layout import DatasetError
from mddnet.errors import MddnetError
from mddnet.io import CheckpointError


def _write(tmp_path: Path, raw: dict, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _set(raw: dict, key: tuple[str, ...], value: object) -> dict:
    node = raw
    for part in key[:-1]:
        node = node[part]
    node[key[-1]] = value
    return raw


@pytest.fixture
def raw(params_path: Path) -> dict:
    return yaml.safe_load(params_path.read_text())


def test_repo_params_load_with_every_variant_and_seed(params_path: Path) -> None:
    params = load_params(params_path)
    assert isinstance(params, Params) and isinstance(params.base, Config)
    assert params.base.variant is None and params.base.label is None
    assert params.base.seeds == (0, 1, 2) and params.base.seed == 0
    for name, variant in params.variants.items():
        config = params.config(name)
        assert (config.variant, config.label, config.seed) == (name, variant.label, 0)
        assert config.checkpoint_variant == (variant.checkpoint or name)
    assert params.config("mddnet", 2).seed == 2


def test_run_names_the_variant_and_the_seed(params_path: Path) -> None:
    params = load_params(params_path)
    assert params.config("drd_net", 1).run == "drd_net-s1"
    assert params.config().run == "params-s0"
    assert load_config(params_path, "mddnet", seed=2).run == "mddnet-s2"


def test_a_seed_outside_seeds_is_refused(params_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"seed 7 is not in seeds \[0, 1, 2\]; add it there"):
        load_config(params_path, "mddnet", seed=7)


def test_trained_variants_are_those_without_a_checkpoint_key(params_path: Path) -> None:
    params = load_params(params_path)
    trained = params.trained()
    assert "mddnet" in trained and "rd_baseline" in trained
    assert not {"score_tr", "score_ri", "score_fused", "predicted_class"} & set(trained)
    assert params.labels(["mddnet"]) == {"mddnet": "+ class-aware memory (MDD-Net)"}


def test_deep_merge_recurses_and_override_wins() -> None:
    base = {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "f": [1, 2]}
    merged = deep_merge(base, {"a": {"c": {"d": 20}}, "f": [9]})
    assert merged == {"a": {"b": 1, "c": {"d": 20, "e": 3}}, "f": [9]}
    assert base["a"]["c"]["d"] == 2  # the input is not modified


def test_variant_override_is_merged_into_sections(params_path: Path) -> None:
    base = load_config(params_path)
    rd = load_config(params_path, "rd_baseline")
    assert base.model.identity_decoder is True and rd.model.identity_decoder is False
    assert rd.model.memory.enabled is False
    assert rd.data.synthesis.kind == "none"
    # untouched keys of the same section keep the base value
    assert rd.model.memory.prototypes == base.model.memory.prototypes
    assert rd.train == dataclasses.replace(
        base.train,
        loss_weights=dataclasses.replace(
            base.train.loss_weights, identity=0.0, discrepancy=0.0, memory=0.0
        ),
    )


def test_scoring_variant_borrows_the_mddnet_checkpoint(params_path: Path) -> None:
    assert load_config(params_path, "score_tr").checkpoint_variant == "mddnet"
    assert load_config(params_path, "mddnet").checkpoint_variant == "mddnet"


def test_unknown_key_in_variant_override_names_file_and_full_path(tmp_path, raw) -> None:
    raw["variants"]["no_cmm"] = {"label": "x", "override": {"model": {"memroy": {}}}}
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert message.startswith(f"{path}: variants.no_cmm.override.model.memroy: unknown key")
    expected = "backbone, weights, stages, identity_decoder, identity_skips, identity_detached"
    added = "embed_width, bottleneck_blocks, decoder_blocks"
    assert f"expected one of: {expected}, {added}, memory" in message


def test_unknown_key_in_section(tmp_path, raw) -> None:
    raw["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match=r"params.yaml: train.stepz: unknown key"):
        load_params(_write(tmp_path, raw))


def test_epochs_is_gone_and_named_as_unknown(tmp_path, raw) -> None:
    raw["train"]["epochs"] = 3
    with pytest.raises(ConfigError, match=r"train.epochs: unknown key \(expected one of: steps,"):
        load_params(_write(tmp_path, raw))


def test_missing_key_is_named(tmp_path, raw) -> None:
    del raw["evaluate"]["fusion"]["restoration_identity"]
    with pytest.raises(ConfigError, match=r"evaluate.fusion.restoration_identity: missing key"):
        load_params(_write(tmp_path, raw))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (("train", "steps"), "ten", "train.steps: expected an integer, got 'ten'"),
        (("train", "steps"), 2.5, "train.steps: expected an integer, got 2.5"),
        (("train", "steps"), -3, "train.steps: must be >= 1, got -3"),
        (("train", "lr"), "fast", "train.lr: expected a number, got 'fast'"),
        (
            ("model", "identity_decoder"),
            "yes",
            "model.identity_decoder: expected true or false, got 'yes'",
        ),
        (("model", "identity_skips"), 1, "model.identity_skips: expected true or false, got 1"),
        (("model", "stages"), 3, "model.stages: expected list of int, got 3"),
        (("train", "betas"), [0.5], "train.betas: expected list of 2 float, got [0.5]"),
        (("seeds",), True, "seeds: expected list of int, got True"),
        (("seeds",), [1, 1], "seeds: need one or more distinct seeds >= 0, got [1, 1]"),
        (("seeds",), [], "seeds: need one or more distinct seeds >= 0, got []"),
        (("cpu", "threads"), 0, "cpu.threads: must be >= 1, got 0"),
        (("calibration", "holdout"), 1.0, "calibration.holdout: must be < 1"),
        (("calibration", "holdout"), -0.1, "calibration.holdout: must be >= 0.0, got -0.1"),
        (("data", "root"), ["a", 3], "data.root: expected str or list of str, got ['a', 3]"),
        (("model", "memory", "init_at"), -1, "model.memory.init_at: must be >= 0.0, got -1.0"),
    ],
)
def test_wrong_type_or_range_names_file_and_key(tmp_path, raw, key, value, expected) -> None:
    path = _write(tmp_path, _set(raw, key, value))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: {expected}"


# Every option set is a Literal declared once in config.py: a bad value fails at load time with
# the key path and every allowed value.
LITERALS = [
    (
        ("data", "synthesis", "kind"),
        "gauss",
        "data.synthesis.kind: must be one of perlin | simplex | cutpaste | perlin_cutpaste | "
        "none, got 'gauss'",
    ),
    (
        ("data", "synthesis", "texture_source"),
        "dtd",
        "data.synthesis.texture_source: must be one of other_class | procedural | mixed, "
        "got 'dtd'",
    ),
    (
        ("model", "memory", "mode"),
        "add",
        "model.memory.mode: must be one of replace | mix | gated",
    ),
    (("model", "memory", "init"), "zeros", "model.memory.init: must be one of random | kmeans"),
    (("train", "cosine"), "l2", "train.cosine: must be one of flatten | pixel, got 'l2'"),
    (
        ("train", "discrepancy_reduction"),
        "sum",
        "train.discrepancy_reduction: must be one of mean | balanced, got 'sum'",
    ),
    (
        ("train", "discrepancy_target"),
        "both",
        "train.discrepancy_target: must be one of mask | teacher, got 'both'",
    ),
    (
        ("train", "discrepancy_gradient"),
        "none",
        "train.discrepancy_gradient: must be one of both | identity, got 'none'",
    ),
    (("train", "device"), "tpu", "train.device: must be one of auto | cpu | cuda, got 'tpu'"),
    (("train", "precision"), "fp64", "train.precision: must be one of fp32 | bf16 | fp16"),
    (("cpu", "isa"), "avx512", "cpu.isa: must be one of avx2 | native, got 'avx512'"),
    (
        ("evaluate", "image_score"),
        "mean",
        "evaluate.image_score: expected max | topk_mean or validated, got 'mean'",
    ),
    (
        ("evaluate", "class_source"),
        "guess",
        "evaluate.class_source: must be one of label | predicted, got 'guess'",
    ),
    (
        ("evaluate", "fusion", "restoration_identity"),
        "valid",
        "evaluate.fusion.restoration_identity: expected float or validated, got 'valid'",
    ),
    (
        ("calibration", "image_score"),
        ["max", "mean"],
        "calibration.image_score[1]: must be one of max | topk_mean, got 'mean'",
    ),
    (
        ("figures", "formats"),
        ["png", "gif"],
        "figures.formats[1]: must be one of png | pdf | svg, got 'gif'",
    ),
]


@pytest.mark.parametrize(("key", "value", "expected"), LITERALS, ids=lambda v: str(v))
def test_an_option_outside_its_literal_names_the_key_and_the_allowed_values(
    tmp_path, raw, key, value, expected
) -> None:
    path = _write(tmp_path, _set(raw, key, value))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: {expected}")


def test_validated_is_accepted_where_calibration_chooses(tmp_path, raw) -> None:
    raw["evaluate"]["fusion"]["restoration_identity"] = "validated"
    raw["evaluate"]["image_score"] = "validated"
    config = load_params(_write(tmp_path, raw)).config("mddnet")
    assert config.evaluate.fusion.restoration_identity == "validated"
    assert config.evaluate.image_score == "validated"
    # but not where there is no identity map to weigh
    with pytest.raises(
        ConfigError, match=r"rd_baseline.override.evaluate.fusion.restoration_identity: must be 0"
    ):
        raw["variants"]["rd_baseline"]["override"]["evaluate"]["fusion"] = {
            "restoration_identity": "validated"
        }
        load_params(_write(tmp_path, raw))


def test_a_list_of_roots_is_read_as_a_tuple(tmp_path, raw) -> None:
    raw["data"]["root"] = [str(tmp_path / "a"), str(tmp_path / "b")]
    config = load_params(_write(tmp_path, raw)).base
    assert config.data.root == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert config.data.root_paths() == (tmp_path / "a", tmp_path / "b")


def test_wrong_type_inside_a_variant_override(tmp_path, raw) -> None:
    raw["variants"]["mddnet"]["override"] = {"train": {"steps": -1}}
    with pytest.raises(ConfigError, match=r"variants.mddnet.override.train.steps: must be >= 1"):
        load_params(_write(tmp_path, raw))


def test_unknown_variant_lists_the_valid_ones(params_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(params_path, "no_cmm")
    assert "unknown variant 'no_cmm'" in str(err.value)
    assert "rd_baseline" in str(err.value) and "mddnet" in str(err.value)


def test_inconsistent_ablation_is_rejected(tmp_path, raw) -> None:
    raw["variants"]["bad"] = {"label": "x", "override": {"model": {"identity_decoder": False}}}
    with pytest.raises(ConfigError, match=r"variants.bad.override.evaluate.fusion.restoration_id"):
        load_params(_write(tmp_path, raw))


def test_checkpoint_must_name_a_training_variant(tmp_path, raw) -> None:
    raw["variants"]["score_tr"]["checkpoint"] = "score_ri"
    with pytest.raises(ConfigError, match=r"variants.score_tr.checkpoint: must name a variant"):
        load_params(_write(tmp_path, raw))


def test_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml: params file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_overrides_apply_and_are_checked(params_path: Path) -> None:
    config = load_config(params_path, "mddnet", overrides={"train": {"steps": 2}})
    assert config.train.steps == 2
    with pytest.raises(ConfigError, match=r"\(overrides\): train.stpes: unknown key"):
        load_config(params_path, overrides={"train": {"stpes": 2}})


def test_config_round_trips_through_a_plain_dict(params_path: Path) -> None:
    params = load_params(params_path)
    for variant in (None, "score_ri", "rd_baseline"):
        config = params.config(variant, 2)
        plain = config_to_dict(config)
        yaml.safe_dump(plain)  # plain python types only
        assert "variants" not in plain  # a config carries its own variant, not the table
        assert config_from_dict(plain) == config
    rebuilt = config_from_dict(config_to_dict(params.config("score_ri", 1)))
    assert (rebuilt.variant, rebuilt.seed, rebuilt.checkpoint_variant) == ("score_ri", 1, "mddnet")


@pytest.mark.parametrize(
    ("key", "trained_with", "other"),
    [("embed_width", 2, 4), ("bottleneck_blocks", 1, 3), ("decoder_blocks", 1, 2)],
)
def test_checkpoint_config_from_before_a_model_key_loads_with_the_value_it_was_trained_at(
    params_path: Path, key: str, trained_with: int, other: int
) -> None:
    plain = config_to_dict(load_config(params_path))
    del plain["model"][key]  # what checkpoints written before the key hold
    assert getattr(config_from_dict(plain).model, key) == trained_with
    plain["model"][key] = other  # a present value is kept
    assert getattr(config_from_dict(plain).model, key) == other


def test_config_is_frozen(params_path: Path) -> None:
    config = load_config(params_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]


def test_data_root_expands_environment_variables(params_path, monkeypatch, tmp_path) -> None:
    config = load_config(
        params_path, overrides={"data": {"root": ["$MDDNET_TEST_ROOT/x", str(tmp_path / "y")]}}
    )
    monkeypatch.setenv("MDDNET_TEST_ROOT", str(tmp_path))
    assert config.data.root_paths() == (tmp_path / "x", tmp_path / "y")
    monkeypatch.delenv("MDDNET_TEST_ROOT")
    with pytest.raises(ConfigError, match="data.root: .* environment variable that is not set"):
        config.data.root_paths()


@pytest.mark.parametrize(
    "key", [("report", "ablation"), ("report", "chain"), ("figures", "compare")]
)
def test_table_and_figure_variant_lists_must_name_variants(tmp_path, raw, key) -> None:
    raw[key[0]][key[1]] = ["mddnet", "mdnet"]
    with pytest.raises(ConfigError, match=rf"{key[0]}.{key[1]}: unknown variant 'mdnet'"):
        load_params(_write(tmp_path, raw))


def test_the_chain_lists_only_variants_that_train(tmp_path, raw) -> None:
    raw["report"]["chain"] = ["mddnet", "score_tr"]
    with pytest.raises(ConfigError, match=r"report.chain: 'score_tr' trains no model of its own"):
        load_params(_write(tmp_path, raw))


def test_project_errors_are_value_errors_the_cli_prints_as_one_line() -> None:
    for error in (ConfigError, DatasetError, CheckpointError):
        assert issubclass(error, MddnetError) and issubclass(error, ValueError)


# ---------------------------------------------------------------------------------------------
# `extends`: a params file that states only what differs from another


def test_extends_merges_the_chain_and_states_only_the_differences(tmp_path, raw) -> None:
    _write(tmp_path, raw, "base.yaml")
    (tmp_path / "sub").mkdir()
    middle = _write(
        tmp_path / "sub",
        {"extends": "../base.yaml", "train": {"steps": 7}, "seeds": [4]},
        "middle.yaml",
    )
    child = _write(
        tmp_path / "sub",
        {"extends": "middle.yaml", "model": {"memory": {"mode": "gated"}}},
        "child.yaml",
    )
    merged, chain = read_params(child)
    assert chain == (tmp_path / "sub" / "../base.yaml", middle, child)
    assert "extends" not in merged
    config = load_params(child).config("mddnet")
    base = load_params(tmp_path / "base.yaml").config("mddnet", 0)
    assert (config.train.steps, config.seeds, config.seed) == (7, (4,), 4)
    assert config.model.memory.mode == "gated"
    # everything not stated is the base's
    assert config.data == base.data and config.evaluate == base.evaluate
    assert dataclasses.replace(config.train, steps=base.train.steps) == base.train
    assert load_params(child).variants == load_params(tmp_path / "base.yaml").variants


def test_extends_refuses_a_key_the_base_does_not_have(tmp_path, raw) -> None:
    _write(tmp_path, raw, "base.yaml")
    child = _write(tmp_path, {"extends": "base.yaml", "train": {"stepz": 7}}, "child.yaml")
    with pytest.raises(ConfigError) as err:
        load_params(child)
    assert str(err.value).startswith(f"{child}: train.stepz: unknown key (expected one of: steps")


def test_extends_of_a_missing_base_names_it(tmp_path) -> None:
    child = _write(tmp_path, {"extends": "gone.yaml", "seeds": [0]}, "child.yaml")
    with pytest.raises(FileNotFoundError, match="gone.yaml: params file not found"):
        load_params(child)


def _keys(node: object, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    if prefix == "variants":  # variant names differ by design; their shape is validated
        return {prefix}
    return set().union(*(_keys(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in node.items()))


@pytest.mark.parametrize(
    "name", ["paper_mvtec.yaml", "paper_visa.yaml", "mvtec_folder.yaml", "mvtec_folder_256.yaml"]
)
def test_configs_extend_params_and_load_with_every_variant(
    repo: Path, params_path: Path, name: str, monkeypatch
) -> None:
    path = repo / "configs" / name
    params = load_params(path)  # validates every variant too
    merged, chain = read_params(path)
    assert chain[0].resolve() == params_path.resolve() and chain[-1] == path
    assert _keys(merged) == _keys(yaml.safe_load(params_path.read_text()))
    config = params.config("mddnet")
    if name.startswith("paper"):
        assert (config.data.image_size, config.train.batch_size) == (256, 16)
        assert config.model.backbone.startswith("wide_resnet50_2") and config.report.comparable
    else:
        monkeypatch.setenv("MDDNET_DATA_ROOT", "/somewhere")
        assert config.data.root_paths() == (Path("/somewhere"),)
        assert config.model.weights == "efficientnet_lite0" and not config.data.generate
        size, sigma = (256, 4.0) if name.endswith("_256.yaml") else (128, 2.0)
        assert (config.data.image_size, config.evaluate.blur_sigma) == (size, sigma)


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(node, Mapping):  # config dicts and variant overrides (read-only mappings)
        return {prefix: node}
    out: dict[str, object] = {}
    for key, value in node.items():
        out |= _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    return out


SCREENS = sorted((Path(__file__).resolve().parents[2] / "configs" / "screens").glob("*.yaml"))


@pytest.mark.parametrize("path", SCREENS, ids=lambda p: p.name)
def test_a_screen_config_changes_exactly_the_keys_it_states(path: Path) -> None:
    """A screen (README: "Screened and not adopted") must be its pipeline's settings plus the
    one change it documents, for RD and MDD-Net, so rerunning it repeats the screen. A key the
    variant sets itself (RD's memory loss weight is 0 whatever the screen says) stays the
    variant's."""
    own = yaml.safe_load(path.read_text())
    base = load_params((path.parent / own.pop("extends")).resolve())
    screen = load_params(path)
    for variant in ("rd_baseline", "mddnet"):
        before = _leaves(config_to_dict(base.config(variant)))
        after = _leaves(config_to_dict(screen.config(variant)))
        changed = {key for key in before if before[key] != after[key]}
        overridden = set(_leaves(base.variants[variant].override))
        assert changed == set(_leaves(own)) - overridden, variant


def test_there_are_screen_configs() -> None:
    assert len(SCREENS) >= 2
