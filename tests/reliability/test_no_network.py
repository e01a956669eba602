"""No network at run time: every stage of the default pipeline runs with sockets refused.

The teacher's weights ship inside a pip package and the benchmark is generated, so nothing needs
the internet; this test makes sure nothing even tries. `HF_HUB_OFFLINE` is unset (and the hub
library's cached copy of it turned off), so the hub's offline mode cannot be why it works.
"""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub.constants
import pytest

from mddnet.config import load_config
from mddnet.data.prepare import prepare_dataset
from mddnet.evaluate import evaluate_checkpoint, load_predictions, save_predictions
from mddnet.io import read_json, write_json
from mddnet.plots import loss_curves, qualitative_grid, roc_pr_curves, save_figure
from mddnet.report import (
    ablation_table,
    load_reference,
    main_table,
    paper_vs_reproduced,
    variant_labels,
    write_table,
)
from mddnet.train import fit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def refused(monkeypatch) -> list[tuple]:
    """Every name lookup and connection fails; the attempts are recorded."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network unavailable (refused by the test)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_the_refusal_works(refused) -> None:
    """Guard for the test below: a lookup really fails and is recorded."""
    with pytest.raises(OSError, match="refused by the test"):
        socket.create_connection(("example.org", 443), timeout=1)
    assert len(refused) == 1


@pytest.mark.slow
def test_every_pipeline_stage_runs_without_the_network(refused, params, tmp_path) -> None:
    params_file = params(tmp_path / "params.yaml", tmp_path / "benchmark", generate=True)
    config = load_config(params_file, "mddnet")
    root, out = config.data.root_path(), tmp_path / "out"

    # prepare: generate the benchmark, decode and validate every file
    prepared = prepare_dataset(config, root, out / "summary.csv")
    assert list(prepared.summary["class"]) == ["brick", "washer"]
    # train: the teacher's ImageNet weights come from the pip package
    trained = fit(config, out / "mddnet.pt", progress=False)
    assert trained.steps == 4 and trained.checkpoint.is_file()
    # evaluate
    run = evaluate_checkpoint(config, trained.checkpoint, root, progress=False)
    save_predictions(out / "mddnet.npz", run.predictions)
    write_json(out / "mddnet.json", run.metrics)
    metrics = {"mddnet": read_json(out / "mddnet.json")}
    # main_results and ablations: the tables, with the published reference rows
    labels = variant_labels(config.variants, ["mddnet"])
    write_table(main_table(metrics["mddnet"]), out / "main", "main", 1)
    reference = load_reference(REPO / config.report.reference)
    comparison = paper_vs_reproduced(reference, metrics, config.report.reference_dataset, False)
    write_table(comparison, out / "paper_vs_reproduced", "comparison", 1)
    write_table(ablation_table(metrics, labels), out / "ablation", "ablation", 1)
    # figures
    predictions = load_predictions(out / "mddnet.npz")
    figures = {
        "qualitative": qualitative_grid(predictions, 1, config.data.image_size),
        "losses": loss_curves({"mddnet": trained.losses_csv}),
        "roc_pr": roc_pr_curves({"mddnet": predictions}),
    }
    for name, figure in figures.items():
        save_figure(figure, out / name, ["png"], 40)

    assert refused == [], f"the pipeline tried to reach the network: {refused}"
    written = sorted(p.name for p in out.iterdir())
    for name in ("main.md", "paper_vs_reproduced.tex", "ablation.csv", "roc_pr.png"):
        assert name in written
