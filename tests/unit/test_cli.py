"""The command line's error contract and its shared --params/--variant/--seed options."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import mddnet.config
import mddnet.kernels
from mddnet.cli import build_parser, main
from mddnet.config import ConfigError


@pytest.fixture
def pinned(monkeypatch) -> list:
    """Records the CPU pinning instead of doing it (it would change this process's threads)."""
    calls: list = []
    monkeypatch.setattr(mddnet.kernels, "pin_cpu_kernels", calls.append)
    return calls


@pytest.fixture
def bad_params(params_path: Path, tmp_path: Path) -> Path:
    raw = yaml.safe_load(params_path.read_text())
    raw["train"]["cosine"] = "l2"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_config_error_prints_one_line_and_exits_2(bad_params, pinned, capsys) -> None:
    assert main(["show-config", "--params", str(bad_params)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"mddnet show-config: error: {bad_params}: train.cosine: must be one of flatten | pixel, "
        f"got 'l2'\n"
    )
    assert pinned == []  # nothing ran after the config failed


def test_verbose_raises_the_config_error_with_its_traceback(bad_params, pinned) -> None:
    with pytest.raises(ConfigError, match=r"train.cosine: must be one of flatten \| pixel"):
        main(["-v", "show-config", "--params", str(bad_params)])


def test_a_missing_params_file_is_one_line_too(tmp_path, pinned, capsys) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["train", "--params", str(missing), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mddnet train: error: {missing}: params file not found")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


def test_other_errors_keep_their_traceback(monkeypatch, pinned) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(mddnet.config, "load_config", broken)
    with pytest.raises(RuntimeError, match="a bug, not a user error"):
        main(["show-config"])


def test_show_config_applies_variant_and_seed_and_pins_the_kernels(
    params_path: Path, pinned, capsys
) -> None:
    args = ["show-config", "--params", str(params_path), "--variant", "score_ri", "--seed", "2"]
    assert main(args) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["variant"], shown["seed"], shown["checkpoint_variant"]) == (
        "score_ri",
        2,
        "mddnet",
    )
    assert shown["evaluate"]["fusion"]["teacher_restoration"] == 0.0
    assert [(c.isa, c.threads) for c in pinned] == [("avx2", 2)]  # params.yaml's cpu section
    assert main(["show-config", "--params", str(params_path), "--seed", "5"]) == 2
    assert "seed 5 is not in seeds [0, 1, 2]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "variant"), [("train", "mddnet"), ("evaluate", "mddnet"), ("show-config", None)]
)
def test_run_commands_share_params_variant_and_seed(command: str, variant) -> None:
    required = {
        "train": ["--out", "m.pt"],
        "evaluate": ["--checkpoint", "m", "--metrics-out", "x"],
    }
    parser = build_parser()
    args = parser.parse_args([command, *required.get(command, [])])
    assert (args.params, args.variant, args.seed) == ("params.yaml", variant, None)
    args = parser.parse_args(
        [
            command,
            *required.get(command, []),
            "--params",
            "p.yaml",
            "--variant",
            "v",
            "--seed",
            "3",
        ]
    )
    assert (args.params, args.variant, args.seed) == ("p.yaml", "v", 3)
