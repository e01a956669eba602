from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mddnet.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    deep_merge,
    load_config,
)


def _write(tmp_path: Path, raw: dict, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def raw(params_path: Path) -> dict:
    return yaml.safe_load(params_path.read_text())


def test_repo_params_load_with_every_variant(params_path: Path) -> None:
    base = load_config(params_path)
    assert isinstance(base, Config)
    assert base.variant is None
    for name in base.variants:
        config = load_config(params_path, name)
        assert config.variant == name


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
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: variants.no_cmm.override.model.memroy: unknown key")
    assert "expected one of: backbone, weights, stages, identity_decoder, memory" in message


def test_unknown_key_in_section(tmp_path, raw) -> None:
    raw["train"]["epochz"] = 3
    with pytest.raises(ConfigError, match=r"params.yaml: train.epochz: unknown key"):
        load_config(_write(tmp_path, raw))


def test_missing_key_is_named(tmp_path, raw) -> None:
    del raw["evaluate"]["fusion"]["restoration_identity"]
    with pytest.raises(ConfigError, match=r"evaluate.fusion.restoration_identity: missing key"):
        load_config(_write(tmp_path, raw))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (("train", "epochs"), "ten", r"train.epochs: expected an integer, got 'ten'"),
        (("train", "epochs"), 2.5, r"train.epochs: expected an integer"),
        (("train", "epochs"), -3, r"train.epochs: must be >= 1, got -3"),
        (("train", "lr"), "fast", r"train.lr: expected a number"),
        (("model", "identity_decoder"), "yes", r"model.identity_decoder: expected true or false"),
        (("model", "stages"), 3, r"model.stages: expected list of int"),
        (("train", "betas"), [0.5], r"train.betas: expected list of 2 float"),
        (("data", "synthesis", "kind"), "gauss", r"data.synthesis.kind: must be one of perlin"),
        (("seed",), True, r"seed: expected an integer, got True"),
    ],
)
def test_wrong_type_or_range_names_file_and_key(tmp_path, raw, key, value, expected) -> None:
    node = raw
    for part in key[:-1]:
        node = node[part]
    node[key[-1]] = value
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(path)
    assert str(err.value).startswith(str(path))


def test_wrong_type_inside_a_variant_override(tmp_path, raw) -> None:
    raw["variants"]["mddnet"]["override"] = {"train": {"epochs": -1}}
    with pytest.raises(ConfigError, match=r"variants.mddnet.override.train.epochs: must be >= 1"):
        load_config(_write(tmp_path, raw))


def test_unknown_variant_lists_the_valid_ones(params_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(params_path, "no_cmm")
    assert "unknown variant 'no_cmm'" in str(err.value)
    assert "rd_baseline" in str(err.value) and "mddnet" in str(err.value)


def test_inconsistent_ablation_is_rejected(tmp_path, raw) -> None:
    raw["variants"]["bad"] = {"label": "x", "override": {"model": {"identity_decoder": False}}}
    with pytest.raises(ConfigError, match=r"variants.bad.override.evaluate.fusion.restoration_id"):
        load_config(_write(tmp_path, raw))


def test_checkpoint_must_name_a_training_variant(tmp_path, raw) -> None:
    raw["variants"]["score_tr"]["checkpoint"] = "score_ri"
    with pytest.raises(ConfigError, match=r"variants.score_tr.checkpoint: must name a variant"):
        load_config(_write(tmp_path, raw))


def test_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml: params file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_overrides_apply_and_are_checked(params_path: Path) -> None:
    config = load_config(params_path, "mddnet", overrides={"train": {"epochs": 2}})
    assert config.train.epochs == 2
    with pytest.raises(ConfigError, match=r"\(overrides\): train.epohcs: unknown key"):
        load_config(params_path, overrides={"train": {"epohcs": 2}})


def test_config_round_trips_through_a_plain_dict(params_path: Path) -> None:
    config = load_config(params_path, "score_ri")
    plain = config_to_dict(config)
    yaml.safe_dump(plain)  # plain python types only
    rebuilt = config_from_dict(plain)
    assert rebuilt.variant == "score_ri"
    for section in ("data", "model", "train", "evaluate", "report", "figures"):
        assert getattr(rebuilt, section) == getattr(config, section)


def test_config_is_frozen(params_path: Path) -> None:
    config = load_config(params_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]


def test_data_root_expands_environment_variables(params_path, monkeypatch, tmp_path) -> None:
    config = load_config(params_path, overrides={"data": {"root": "$MDDNET_TEST_ROOT/x"}})
    monkeypatch.setenv("MDDNET_TEST_ROOT", str(tmp_path))
    assert config.data.root_path() == tmp_path / "x"
    monkeypatch.delenv("MDDNET_TEST_ROOT")
    with pytest.raises(ConfigError, match="data.root: .* environment variable that is not set"):
        config.data.root_path()


@pytest.mark.parametrize("key", [("report", "ablation"), ("figures", "compare")])
def test_table_and_figure_variant_lists_must_name_variants(tmp_path, raw, key) -> None:
    raw[key[0]][key[1]] = ["mddnet", "mdnet"]
    with pytest.raises(ConfigError, match=rf"{key[0]}.{key[1]}: unknown variant 'mdnet'"):
        load_config(_write(tmp_path, raw))


def _keys(node: object, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    if prefix == "variants":  # variant names differ by design; their shape is validated
        return {prefix}
    return set().union(*(_keys(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in node.items()))


@pytest.mark.parametrize("name", ["paper_mvtec.yaml", "paper_visa.yaml", "mvtec_folder.yaml"])
def test_configs_load_and_have_the_key_structure_of_params(
    repo: Path, params_path: Path, name: str, monkeypatch
) -> None:
    path = repo / "configs" / name
    config = load_config(path)
    for variant in config.variants:
        load_config(path, variant)
    assert _keys(yaml.safe_load(path.read_text())) == _keys(
        yaml.safe_load(params_path.read_text())
    )
    if name.startswith("paper"):
        assert (config.data.image_size, config.train.epochs, config.train.batch_size) == (
            256,
            100,
            16,
        )
        assert config.model.backbone.startswith("wide_resnet50_2") and config.report.comparable
    else:
        monkeypatch.setenv("MDDNET_DATA_ROOT", "/somewhere")
        assert config.data.root_path() == Path("/somewhere")
        assert config.model.weights == "efficientnet_lite0" and not config.data.generate
