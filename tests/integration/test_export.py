"""ONNX export: onnxruntime's maps, scores and classes equal the PyTorch inference path.

Tolerance: atol 1e-4 on maps and scores. The tiny model's fused maps lie around 4 to 6 and the
differences measured here are about 3e-6: float32 rounding, since onnxruntime fuses and reorders
operations. The PyTorch side is `evaluate.predict` (scores, predicted classes) and, for maps in
float32 (`predict` keeps float16), `checkpoint.Scorer`, the one inference path.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mddnet.checkpoint import Scorer, TrainedModel, load_trained_model
from mddnet.cli import main
from mddnet.evaluate import load_test_set, predict
from mddnet.export import PREDICTED, export_onnx
from mddnet.io import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow

ATOL = 1e-4


@pytest.fixture(scope="module")
def trained(tiny_checkpoint: Path) -> TrainedModel:
    return load_trained_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def session(tiny_checkpoint: Path, tmp_path_factory) -> ort.InferenceSession:
    """The tiny checkpoint exported (traced with a batch of 2) and opened in onnxruntime."""
    path = export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "mddnet.onnx")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def test_set(trained: TrainedModel):
    """The tiny benchmark's test split: 18 images, 3 classes x (3 good + 3 defective)."""
    dataset = load_test_set(trained.config, trained.class_names)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])  # (N, 3, S, S)
    class_ids = torch.tensor([dataset[i]["class_id"] for i in range(len(dataset))])  # (N,)
    return dataset, images, class_ids


def _run(session: ort.InferenceSession, images: torch.Tensor, class_ids: torch.Tensor):
    return session.run(None, {"image": images.numpy(), "class_id": class_ids.numpy()})


def _scorer(trained: TrainedModel, source: str | None = None) -> Scorer:
    """The checkpoint's own scoring, with `evaluate.class_source` set to `source` if given."""
    config = trained.config
    if source is not None:
        evaluate = dataclasses.replace(config.evaluate, class_source=source)
        config = dataclasses.replace(config, evaluate=evaluate)
    return Scorer.of(config, trained.calibration)


def _torch_maps(trained: TrainedModel, images: torch.Tensor, class_ids: torch.Tensor | None):
    """Fused maps (N, S, S) in float32 (`predict` keeps them as float16)."""
    return _scorer(trained)(trained.model, images, class_ids).fused


def test_onnx_with_given_classes_matches_pytorch(trained, session, test_set) -> None:
    dataset, images, class_ids = test_set
    reference = predict(trained.model, dataset, _scorer(trained, "label"), progress=False)
    anomaly_map, score, read = _run(session, images, class_ids)
    assert anomaly_map.shape == (18, 64, 64) and anomaly_map.dtype == np.float32
    np.testing.assert_allclose(anomaly_map, _torch_maps(trained, images, class_ids), atol=ATOL)
    np.testing.assert_allclose(score, reference.scores, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(read, class_ids.numpy())
    # The class input steers the memory: reading another class's prototypes changes the maps.
    other_map, _, other_read = _run(session, images, (class_ids + 1) % 3)
    np.testing.assert_array_equal(other_read, ((class_ids + 1) % 3).numpy())
    assert np.abs(other_map - anomaly_map).max() > 100 * ATOL


def test_onnx_with_predicted_classes_matches_pytorch(trained, session, test_set) -> None:
    dataset, images, _ = test_set
    reference = predict(trained.model, dataset, _scorer(trained, "predicted"), progress=False)
    anomaly_map, score, read = _run(session, images, torch.full((18,), PREDICTED))
    np.testing.assert_array_equal(read, reference.predicted_class_ids)
    np.testing.assert_allclose(anomaly_map, _torch_maps(trained, images, None), atol=ATOL)
    np.testing.assert_allclose(score, reference.scores, atol=ATOL, rtol=0)


def test_class_minus_one_predicts_per_image_within_a_mixed_batch(session, test_set) -> None:
    _, images, class_ids = test_set
    wrong = (class_ids + 1) % 3  # given classes that differ from what the memory predicts
    given = _run(session, images, wrong)
    predicted = _run(session, images, torch.full((18,), PREDICTED))
    assert (given[2] != predicted[2]).all()  # so the two sources below are told apart
    ask = torch.arange(18) % 2 == 0  # even images ask the memory, odd ones give a class
    mixed = _run(session, images, torch.where(ask, PREDICTED, wrong))
    for mixed_part, given_part, predicted_part in zip(mixed, given, predicted, strict=True):
        expected = given_part.copy()
        expected[ask.numpy()] = predicted_part[ask.numpy()]
        np.testing.assert_allclose(mixed_part, expected, atol=ATOL, rtol=0)


def test_class_id_beyond_the_known_classes_is_refused_by_onnxruntime(session, test_set) -> None:
    _, images, _ = test_set
    with pytest.raises(Exception, match="indices element out of data bounds"):
        _run(session, images[:2], torch.tensor([0, 3]))  # 3 classes: valid ids are 0, 1, 2


def test_batch_is_dynamic_and_the_metadata_describes_the_inputs(
    trained, session, test_set
) -> None:
    _, images, class_ids = test_set
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes == {"image": ["batch", 3, 64, 64], "class_id": ["batch"]}
    assert [o.shape for o in session.get_outputs()] == [["batch", 64, 64], ["batch"], ["batch"]]
    three = _run(session, images[:3], class_ids[:3])  # traced with 2, run with 3
    all_18 = _run(session, images, class_ids)
    for part, whole in zip(three, all_18, strict=True):
        np.testing.assert_allclose(part, whole[:3], atol=ATOL, rtol=0)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == list(trained.class_names)
    assert meta["image_size"] == "64"
    assert json.loads(meta["normalisation"]) == {
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }


def test_model_without_memory_ignores_the_class_and_scores_top_k(
    tiny_checkpoint, test_set, tmp_path
) -> None:
    """A memory-free checkpoint with top-k scoring: class input unused, -1 read, same scores."""
    data = load_checkpoint(tiny_checkpoint)
    data["state_dict"] = {k: v for k, v in data["state_dict"].items() if "memory" not in k}
    data["config"]["model"]["memory"]["enabled"] = False
    data["config"]["train"]["loss_weights"]["memory"] = 0.0
    data["config"]["evaluate"]["image_score"] = "topk_mean"
    data["config"]["evaluate"]["fusion"]["normalise"] = False  # raw maps need no class
    save_checkpoint(tmp_path / "no_memory.pt", data)
    trained = load_trained_model(tmp_path / "no_memory.pt")
    session = ort.InferenceSession(
        str(export_onnx(tmp_path / "no_memory.pt", tmp_path / "no_memory.onnx")),
        providers=["CPUExecutionProvider"],
    )
    dataset, images, class_ids = test_set
    reference = predict(trained.model, dataset, _scorer(trained), progress=False)
    anomaly_map, score, read = _run(session, images, class_ids)
    np.testing.assert_allclose(anomaly_map, _torch_maps(trained, images, None), atol=ATOL)
    np.testing.assert_allclose(score, reference.scores, atol=ATOL, rtol=0)
    assert (read == -1).all()
    other = _run(session, images, torch.full((18,), PREDICTED))
    np.testing.assert_array_equal(other[0], anomaly_map)
    k = trained.config.evaluate.topk
    top_k = np.sort(anomaly_map.reshape(18, -1), axis=1)[:, -k:]
    np.testing.assert_allclose(score, top_k.mean(axis=1), atol=ATOL, rtol=0)


def test_calibrated_scoring_is_exported_with_its_per_class_statistics(
    tiny_checkpoint, test_set, tmp_path
) -> None:
    """`normalise` and `validated` settings: the graph z-scores each map with the statistics of
    the class it reads (given or predicted) and uses the calibration's weight and image score."""
    data = load_checkpoint(tiny_checkpoint)
    data["config"]["evaluate"]["fusion"] |= {
        "normalise": True,
        "restoration_identity": "validated",
    }
    data["config"]["evaluate"]["image_score"] = "validated"
    save_checkpoint(tmp_path / "calibrated.pt", data)
    trained = load_trained_model(tmp_path / "calibrated.pt")
    scorer = Scorer.of(trained.config, trained.calibration)
    assert scorer.statistics is not None and scorer.image_score == trained.calibration.image_score
    session = ort.InferenceSession(
        str(export_onnx(tmp_path / "calibrated.pt", tmp_path / "calibrated.onnx")),
        providers=["CPUExecutionProvider"],
    )
    _, images, class_ids = test_set
    for given, ask in ((class_ids, class_ids), (None, torch.full((18,), PREDICTED))):
        expected = scorer(trained.model, images, given)
        anomaly_map, score, _ = _run(session, images, ask)
        np.testing.assert_allclose(anomaly_map, expected.fused, atol=ATOL)
        np.testing.assert_allclose(score, expected.scores, atol=ATOL, rtol=0)


def test_missing_checkpoint_is_a_clear_error_and_writes_nothing(tmp_path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"absent\.pt: checkpoint not found .*mddnet train"
    ):
        export_onnx(tmp_path / "absent.pt", tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_package_names_what_to_install(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match="pip install onnx onnxruntime"):
        export_onnx(tiny_checkpoint, tmp_path / "out.onnx")


def test_cli_writes_a_checked_file_with_the_asked_opset(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "models" / "mddnet.onnx"
    assert main(["export-onnx", str(tiny_checkpoint), str(out), "--opset", "18"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert [p.name for p in out.parent.iterdir()] == ["mddnet.onnx"]  # no temp file left
    proto = onnx.load(out)
    onnx.checker.check_model(proto)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    assert main(["export-onnx", str(tmp_path / "absent.pt"), str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
