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

from mddnet.calibration import calibrate_checkpoint
from mddnet.config import load_params
from mddnet.data.prepare import prepare_dataset
from mddnet.evaluate import evaluate_checkpoint
from mddnet.io import write_json
from mddnet.plots import pipeline_figures
from mddnet.predictions import save_predictions
from mddnet.reference import reference_metrics
from mddnet.report import ablation_results, main_results
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


# One trained variant stands for all: the tables and figures list only it.
ONLY_MDDNET = {
    "report": {
        "main_variant": "mddnet",
        "chain": ["mddnet"],
        "ablation": ["mddnet"],
        "scoring": ["mddnet"],
        "reproduced": ["mddnet"],
    },
    "figures": {"compare": ["mddnet"], "formats": ["png"], "dpi": 40},
}


@pytest.mark.slow
def test_every_pipeline_stage_runs_without_the_network(refused, params, tmp_path) -> None:
    params_file = params(
        tmp_path / "params.yaml", tmp_path / "benchmark", ONLY_MDDNET, generate=True
    )
    loaded = load_params(params_file)
    base, config = loaded.config(), loaded.config("mddnet")
    roots, out = list(config.data.root_paths()), tmp_path / "out"
    folders = {name: out / name for name in ("metrics", "losses", "predictions", "checkpoints")}

    # prepare: generate the benchmark, decode and validate every file
    prepared = prepare_dataset(base, roots, out / "summary.csv")
    assert list(prepared.summary["class"]) == ["brick", "washer"]
    # train: the teacher's ImageNet weights come from the pip package
    checkpoint = folders["checkpoints"] / f"{config.run}.pt"
    trained = fit(
        config, checkpoint, losses_csv=folders["losses"] / f"{config.run}.csv", progress=False
    )
    assert trained.steps == 4 and trained.checkpoint.is_file()
    # calibrate, in place
    calibrate_checkpoint(config, checkpoint, checkpoint, roots)
    # evaluate
    run = evaluate_checkpoint(config, checkpoint, roots, progress=False)
    save_predictions(folders["predictions"] / f"{config.run}.npz", run.predictions)
    write_json(folders["metrics"] / f"{config.run}.json", run.metrics)
    # the training-free reference row (its teacher comes from the pip package too)
    write_json(folders["metrics"] / "reference.json", reference_metrics(base, roots))
    # main_results and ablations: the tables, with the published reference rows
    reference_csv = REPO / base.report.reference
    main = main_results(
        base, loaded, folders["metrics"], out / "tables", out / "summary", reference_csv
    )
    ablation = ablation_results(base, loaded, folders["metrics"], out / "tables")
    # figures
    figures = pipeline_figures(base, loaded, folders, out / "figures")

    assert refused == [], f"the pipeline tried to reach the network: {refused}"
    for table in (main.main, main.paper_vs_reproduced, ablation.ablation, ablation.scoring):
        assert table.csv.is_file() and table.markdown.is_file()
    assert {"qualitative", "losses", "roc_pr", "prototypes"} <= set(figures)
    assert all(path.is_file() for path in figures.values())
