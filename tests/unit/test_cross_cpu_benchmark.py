"""benchmarks/cross_cpu.py: where two fingerprints part, and one real run with each oneDNN mode."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cross_cpu() -> ModuleType:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "benchmarks"))
        yield importlib.import_module("cross_cpu")


def test_first_difference_is_the_first_step_that_differs(cross_cpu: ModuleType) -> None:
    assert cross_cpu.first_difference(["1.0", "0.5", "0.25"], ["1.0", "0.5", "0.25"]) is None
    assert cross_cpu.first_difference(["1.0", "0.5", "0.25"], ["1.0", "0.5000001", "0.2"]) == 2
    with pytest.raises(ValueError):
        cross_cpu.first_difference(["1.0"], ["1.0", "0.5"])  # runs of other lengths


def _write(folder: Path, name: str, runs: dict) -> None:
    (folder / f"{name}.json").write_text(json.dumps({"runs": runs}))


def test_compare_names_each_pair_and_run_and_where_they_part(
    cross_cpu: ModuleType, tmp_path: Path
) -> None:
    same = {"losses": ["3.0", "2.0"], "weights_sha256": "aa", "config_sha256": "c1"}
    _write(tmp_path, "intel", {"on/rd": same, "off/rd": same})
    other_step_2 = {"losses": ["3.0", "2.1"], "weights_sha256": "bb", "config_sha256": "c1"}
    other_weights = {"losses": ["3.0", "2.0"], "weights_sha256": "cc", "config_sha256": "c1"}
    _write(tmp_path, "amd", {"on/rd": other_step_2, "off/rd": other_weights})
    assert cross_cpu.compare(tmp_path) == [
        "amd vs intel, off/rd: differ from step end (weights)",
        "amd vs intel, on/rd: differ from step 2",
    ]
    _write(tmp_path, "amd", {"on/rd": same})
    assert cross_cpu.compare(tmp_path) == ["amd vs intel, on/rd: identical"]
    # the same bytes from another model, or from a file that did not record its config
    other_model = same | {"config_sha256": "c2"}
    _write(tmp_path, "amd", {"on/rd": other_model, "off/rd": same | {"config_sha256": None}})
    assert cross_cpu.compare(tmp_path) == [
        "amd vs intel, off/rd: not comparable (other configs)",
        "amd vs intel, on/rd: not comparable (other configs)",
    ]


@pytest.mark.slow
def test_a_run_fingerprints_both_modes_and_is_reproducible(
    cross_cpu: ModuleType, tmp_path: Path
) -> None:
    """Two steps of RD on the generated benchmark, twice: the same fingerprint both times; the
    two oneDNN modes run (their bytes may or may not differ, which is what the script measures).
    On a two-class 64 px benchmark, so the four trainings take seconds, not most of a minute."""
    params = tmp_path / "tiny.yaml"
    benchmark = {"classes": ["brick", "washer"], "image_size": 64, "train_per_class": 4}
    data = {"image_size": 64, "benchmark": benchmark}
    params.write_text(yaml.safe_dump({"extends": str(ROOT / "params.yaml"), "data": data}))
    first = cross_cpu.run(params, ["rd_baseline"], 2, tmp_path / "a")
    again = cross_cpu.run(params, ["rd_baseline"], 2, tmp_path / "b")
    assert set(first["runs"]) == {"onednn_on/rd_baseline", "onednn_off/rd_baseline"}
    for key, fingerprint in first["runs"].items():
        assert len(fingerprint["losses"]) == 2
        assert fingerprint["losses"] == again["runs"][key]["losses"]
        assert fingerprint["weights_sha256"] == again["runs"][key]["weights_sha256"]
        assert fingerprint["config_sha256"] == again["runs"][key]["config_sha256"]
    # the config digest is the variant's (RD's), and does not depend on the temporary data folder
    assert first["runs"]["onednn_on/rd_baseline"]["config_sha256"] == cross_cpu.config_sha256(
        tmp_path / "b" / "params.yaml", "rd_baseline"
    )
    assert cross_cpu.config_sha256(params, "rd_baseline") != cross_cpu.config_sha256(
        params, "mddnet"
    )
