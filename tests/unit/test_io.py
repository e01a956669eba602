from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from mddnet.io import (
    CheckpointError,
    atomic_open,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_csv,
    write_json,
    write_text,
)


def test_write_json_keeps_full_precision(tmp_path) -> None:
    path = tmp_path / "m.json"
    write_json(path, {"x": 0.1234567890123456789})
    assert read_json(path)["x"] == 0.1234567890123456789


def test_write_json_rejects_nan(tmp_path) -> None:
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"x": float("nan")})
    assert not (tmp_path / "m.json").exists()
    assert os.listdir(tmp_path) == []  # no temp file left behind


def test_failure_mid_write_leaves_the_old_file_intact(tmp_path) -> None:
    path = tmp_path / "table.csv"
    write_text(path, "old\n")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(path) as handle:
        handle.write("half of the new conte")
        raise RuntimeError("boom")
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["table.csv"]


def test_write_csv(tmp_path) -> None:
    path = tmp_path / "sub" / "a.csv"
    write_csv(path, [{"a": 1, "b": 2.5}, {"a": 3, "b": None}], ["a", "b"])
    assert path.read_text() == "a,b\n1,2.5\n3,\n"


def test_read_json_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json: file not found"):
        read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_json(bad)


def _payload() -> dict:
    return {
        "state_dict": {"w": torch.arange(6.0).reshape(2, 3)},
        "config": {"seed": 1, "model": {"backbone": "x"}},
        "class_names": ["a", "b"],
        "step": 7,
    }


def test_checkpoint_round_trip(tmp_path) -> None:
    path = tmp_path / "ckpt" / "m.pt"
    save_checkpoint(path, _payload())
    data = load_checkpoint(path)
    assert torch.equal(data["state_dict"]["w"], torch.arange(6.0).reshape(2, 3))
    assert data["config"] == {"seed": 1, "model": {"backbone": "x"}}
    assert data["class_names"] == ["a", "b"]
    assert data["step"] == 7
    assert "mddnet_version" in data


def test_checkpoint_payload_must_be_complete(tmp_path) -> None:
    with pytest.raises(KeyError, match="class_names"):
        save_checkpoint(tmp_path / "m.pt", {"state_dict": {}, "config": {}})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": _Evil()}))
    with pytest.raises(CheckpointError, match="evil.pt: not a loadable mddnet checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned.txt").exists()


def test_non_checkpoint_files_are_explained(tmp_path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt: not a loadable"):
        load_checkpoint(text)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="plain.pt: not an mddnet checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(FileNotFoundError, match="absent.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_json_written_is_parseable_by_stdlib(tmp_path) -> None:
    write_json(tmp_path / "a.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": [1, 2]}


def test_atomic_writes_get_the_usual_permissions(tmp_path) -> None:
    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
