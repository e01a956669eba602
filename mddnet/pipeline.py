"""The DVC pipeline of a params file, rendered once per dataset by `mddnet pipeline`.

`dvc.yaml` (the offline default) and `pipelines/<name>/dvc.yaml` (a real dataset) have the same
stages, so they are written from one definition: one short function per stage below. Each stage
runs one notebook with papermill; its deps are the notebook, the package modules it computes with
(`STAGE_MODULES`, stated by hand and checked by a test that imports what each notebook imports),
the params sections it reads, and the files earlier stages wrote. Trained runs are `foreach`
items named `<variant>-s<seed>`: the component chain (`report.chain`) and the variants that
evaluate a chain checkpoint run once per seed, every other variant once, with the first seed.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mddnet.config import Params, load_params, read_params
from mddnet.io import write_text

__all__ = [
    "NOTEBOOKS",
    "STAGE_MODULES",
    "STAGE_SECTIONS",
    "PipelinePaths",
    "render_pipeline",
    "runs",
    "write_pipeline",
    "write_pipeline_params",
]

NOTEBOOKS = {
    "prepare": "notebooks/01_prepare_data.ipynb",
    "train": "notebooks/02_train.ipynb",
    "calibrate": "notebooks/03_calibrate.ipynb",
    "evaluate": "notebooks/04_evaluate.ipynb",
    "reference": "notebooks/05_reference.ipynb",
    "main_results": "notebooks/06_main_results.ipynb",
    "ablations": "notebooks/07_ablations.ipynb",
    "figures": "notebooks/08_figures.ipynb",
}

_SETUP = ["mddnet/__init__.py", "mddnet/config.py", "mddnet/errors.py", "mddnet/io.py"]
# Tables and figures: never a dependency of a training or evaluation stage.
_SHOWN = ["mddnet/metrics.py", "mddnet/predictions.py", "mddnet/report.py", "mddnet/plots.py"]
_SESSION = [*_SETUP, "mddnet/kernels.py", "mddnet/notebook.py", "mddnet/seed.py"]
_DATA = ["mddnet/data/__init__.py", "mddnet/data/layout.py"]
_MODEL = ["mddnet/models", "mddnet/imagenet.py", "mddnet/device.py"]
_IMAGES = ["mddnet/data/anomalies.py", "mddnet/data/datasets.py"]
# Scoring a trained model: how maps are made and fused never reaches a training stage.
_SCORED = [
    *_MODEL,
    *_IMAGES,
    "mddnet/losses.py",
    "mddnet/scoring.py",
    "mddnet/checkpoint.py",
    "mddnet/metrics.py",
]
# The package modules each stage computes with; display-only modules never count.
STAGE_MODULES = {
    "prepare": [*_SESSION, *_DATA, "mddnet/data/prepare.py", "mddnet/benchmark", *_SHOWN],
    "train": [
        *_SESSION,
        *_DATA,
        *_MODEL,
        *_IMAGES,
        "mddnet/distributed.py",
        "mddnet/losses.py",
        "mddnet/metrics.py",
        "mddnet/train.py",
    ],
    "calibrate": [*_SESSION, *_DATA, *_SCORED, "mddnet/calibration.py"],
    "evaluate": [*_SESSION, *_DATA, *_SCORED, "mddnet/evaluate.py", "mddnet/predictions.py"],
    "reference": [
        *_SESSION,
        *_DATA,
        *_MODEL,
        *_IMAGES,
        "mddnet/losses.py",
        "mddnet/scoring.py",
        "mddnet/metrics.py",
        "mddnet/reference.py",
    ],
    "main_results": [*_SESSION, "mddnet/metrics.py", "mddnet/report.py"],
    "ablations": [*_SESSION, "mddnet/metrics.py", "mddnet/report.py"],
    "figures": [*_SESSION, *_DATA, *_SHOWN],
}
# The evaluate keys that score a map without the model's fusion.
_MAP_SCORING_KEYS = [
    f"evaluate.{k}" for k in ("batch_size", "blur_sigma", "topk", "aupro_fpr_limit")
]
# The settings calibration scores validation images with (the model is the checkpoint's).
_CALIBRATION_KEYS = [
    *_MAP_SCORING_KEYS,
    *(f"train.{k}" for k in ("device", "channels_last", "precision")),
]
# The params sections each stage reads (the run's variant override comes on top for runs).
STAGE_SECTIONS = {
    "prepare": ["cpu", "data", "figures"],
    "train": ["cpu", "data", "model", "train", "calibration.holdout"],
    "calibrate": ["cpu", "data", "calibration", *_CALIBRATION_KEYS],
    "evaluate": ["cpu", "data", "model", "train", "evaluate"],
    # The teacher's weights, its seed (the coreset's draw) and the map scoring, not the fusion or
    # the trained model's settings: trying a fusion weight leaves the reference row alone.
    "reference": [
        "cpu",
        "data",
        "seeds",
        "model.backbone",
        "model.weights",
        "reference",
        *_MAP_SCORING_KEYS,
    ],
    "main_results": ["data", "model", "report"],
    "ablations": ["data", "model", "report"],
    "figures": ["data", "model", "report", "figures"],
}
TABLE_FORMATS = ("csv", "md", "tex")
HEADER = (
    "# Rendered by `mddnet pipeline` from {params}; change the params or mddnet/pipeline.py and\n"
    "# render again (a test fails while this file is stale).\n"
)


@dataclass(frozen=True)
class PipelinePaths:
    """Where one pipeline reads its params and writes its products (relative to the repo root).

    The offline default is the root pipeline (`params.yaml`, `results/`, `artifacts/`); a
    dataset NAME has `pipelines/NAME/params.yaml`, `results/NAME/`, `artifacts/NAME/`.
    """

    params: str = "params.yaml"
    results: str = "results"
    artifacts: str = "artifacts"
    dvc_yaml: str = "dvc.yaml"

    @classmethod
    def for_dataset(cls, name: str | None) -> PipelinePaths:
        if name is None:
            return cls()
        folder = f"pipelines/{name}"
        return cls(
            f"{folder}/params.yaml", f"results/{name}", f"artifacts/{name}", f"{folder}/dvc.yaml"
        )

    def checkpoint(self, run: str) -> str:
        """A trained run's checkpoint, as training wrote it."""
        return f"{self.artifacts}/checkpoints/{run}.pt"

    def model(self, run: str) -> str:
        """A trained run's calibrated checkpoint: the one evaluation and users load."""
        return f"{self.artifacts}/models/{run}.pt"

    def executed(self, stage: str, run: str | None = None) -> str:
        """Where papermill keeps a stage's executed notebook (one folder per stage with runs)."""
        name = Path(NOTEBOOKS[stage]).stem
        return (
            f"{self.results}/notebooks/{name}/{run}.ipynb"
            if run
            else f"{self.results}/notebooks/{name}.ipynb"
        )


class _Flow(dict):
    """A mapping written on one line (`{variant: mddnet, seed: 0}`) in dvc.yaml."""


yaml.SafeDumper.add_representer(
    _Flow,
    lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True),
)


def runs(params: Params, trained: bool) -> dict[str, dict[str, Any]]:
    """`{<variant>-s<seed>: {variant, seed, checkpoint}}` of the trained (or evaluated) runs.

    What the report and figures list is what runs (a pipeline shortens `report.ablation` to
    skip ablations). Chain variants, and variants that evaluate a chain variant's checkpoint,
    get every seed; the others get the first seed.
    """
    report, figures = params.base.report, params.base.figures
    chain = set(report.chain)
    listed = {*report.chain, *report.ablation, *report.scoring, *report.reproduced}
    listed |= {report.main_variant, *figures.compare}
    listed |= {params.variants[name].checkpoint for name in listed} - {None}
    found = {}
    for name, variant in params.variants.items():
        source = variant.checkpoint or name
        if name not in listed or (trained and variant.checkpoint is not None):
            continue
        seeds = params.base.seeds if source in chain else params.base.seeds[:1]
        for seed in seeds:
            run = _Flow(variant=name, seed=seed)
            if not trained:
                run["checkpoint"] = f"{source}-s{seed}"
            found[f"{name}-s{seed}"] = run
    return found


def _papermill(
    paths: PipelinePaths, stage: str, executed: str, parameters: Mapping[str, Any]
) -> str:
    folder = str(Path(executed).parent)
    args = [
        f"-p {key} {value}" for key, value in {"params_file": paths.params, **parameters}.items()
    ]
    notebook = NOTEBOOKS[stage]
    run = f"python -m papermill {notebook} {executed} --log-output"
    return f"mkdir -p {shlex.quote(folder)} && {run} " + " ".join(args)


def _params(
    chain: Iterable[Path], repo: Path, stage: str, run_variant: bool
) -> list[dict[str, list[str]]]:
    """The `params:` entry: each file of the extends chain with the stage's sections it sets."""
    entries = []
    for file in chain:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        keys = [s for s in STAGE_SECTIONS[stage] if _has_key(raw, s)]
        if run_variant and "variants" in raw:
            keys.append("variants.${item.variant}")
        if keys:
            entries.append({file.relative_to(repo).as_posix(): keys})
    return entries


def _has_key(raw: Mapping[str, Any], dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(raw, Mapping) or part not in raw:
            return False
        raw = raw[part]
    return True


def _figure_files(
    folder: str, names: Iterable[str], formats: Iterable[str]
) -> tuple[list[str], list[str]]:
    """(PNGs, other formats) of the named figures: PNGs are DVC image plots, so `dvc plots
    show` shows them offline; they are always written, since notebooks display them."""
    pngs = [f"{folder}/{name}.png" for name in names]
    others = [f"{folder}/{name}.{ext}" for name in names for ext in formats if ext != "png"]
    return pngs, others


def _uncached(paths: Iterable[str]) -> list[dict[str, dict[str, bool]]]:
    return [{path: {"cache": False}} for path in paths]


class _Stages:
    """The stage definitions of one pipeline (one short method per stage)."""

    def __init__(self, repo: Path, paths: PipelinePaths) -> None:
        self.repo, self.paths = repo, paths
        self.params = load_params(repo / paths.params)
        _, chain = read_params(repo / paths.params)
        self.chain = [Path(p).resolve() for p in chain]
        self.data = [root.as_posix() for root in self.params.base.data.root_paths()]

    def _deps(self, stage: str, extra: Iterable[str] = ()) -> list[str]:
        return [NOTEBOOKS[stage], *STAGE_MODULES[stage], *extra]

    def prepare(self) -> dict[str, Any]:
        p, config = self.paths, self.params.base
        summary, samples = f"{p.results}/data/summary.csv", f"{p.results}/figures/data_samples"
        pngs, others = _figure_files(
            f"{p.results}/figures", ["data_samples"], config.figures.formats
        )
        parameters = {"summary_out": summary, "samples_figure": samples}
        return {
            "cmd": _papermill(p, "prepare", p.executed("prepare"), parameters),
            "deps": self._deps("prepare", [] if config.data.generate else self.data),
            "params": _params(self.chain, self.repo, "prepare", False),
            "outs": [
                *(self.data if config.data.generate else []),
                *_uncached([summary, *others, p.executed("prepare")]),
            ],
            "plots": _uncached(pngs),
        }

    def train(self) -> dict[str, Any]:
        p = self.paths
        checkpoint = p.checkpoint("${key}")
        losses = f"{p.results}/losses/${{key}}.csv"
        executed = p.executed("train", "${key}")
        parameters = {
            "variant": "${item.variant}",
            "seed": "${item.seed}",
            "checkpoint": checkpoint,
            "losses_csv": losses,
        }
        return {
            "foreach": runs(self.params, trained=True),
            "do": {
                "cmd": _papermill(p, "train", executed, parameters),
                "deps": self._deps("train", [*self.data, f"{p.results}/data/summary.csv"]),
                "params": _params(self.chain, self.repo, "train", True),
                "outs": [checkpoint, *_uncached([executed])],
                "plots": [{losses: {"cache": False, "x": "step", "y": "total"}}],
            },
        }

    def calibrate(self) -> dict[str, Any]:
        p = self.paths
        executed = p.executed("calibrate", "${key}")
        parameters = {
            "variant": "${item.variant}",
            "seed": "${item.seed}",
            "checkpoint": p.checkpoint("${key}"),
            "calibrated": p.model("${key}"),
        }
        return {
            "foreach": runs(self.params, trained=True),
            "do": {
                "cmd": _papermill(p, "calibrate", executed, parameters),
                "deps": self._deps("calibrate", [*self.data, p.checkpoint("${key}")]),
                "params": _params(self.chain, self.repo, "calibrate", True),
                "outs": [p.model("${key}"), *_uncached([executed])],
            },
        }

    def evaluate(self) -> dict[str, Any]:
        p = self.paths
        executed = p.executed("evaluate", "${key}")
        parameters = {
            "variant": "${item.variant}",
            "seed": "${item.seed}",
            "checkpoint": p.model("${item.checkpoint}"),
            "predictions_out": f"{p.artifacts}/predictions/${{key}}.npz",
            "metrics_out": f"{p.results}/metrics/${{key}}.json",
            "provenance_out": f"{p.results}/provenance/${{key}}.json",
        }
        return {
            "foreach": runs(self.params, trained=False),
            "do": {
                "cmd": _papermill(p, "evaluate", executed, parameters),
                "deps": self._deps("evaluate", [*self.data, p.model("${item.checkpoint}")]),
                "params": _params(self.chain, self.repo, "evaluate", True),
                "outs": [
                    parameters["predictions_out"],
                    *_uncached(
                        [parameters["provenance_out"], parameters["metrics_out"], executed]
                    ),
                ],
            },
        }

    def reference(self) -> dict[str, Any]:
        p = self.paths
        metrics = f"{p.results}/metrics/reference.json"
        return {
            "cmd": _papermill(p, "reference", p.executed("reference"), {"metrics_out": metrics}),
            "deps": self._deps("reference", self.data),
            "params": _params(self.chain, self.repo, "reference", False),
            "outs": _uncached([metrics, p.executed("reference")]),
        }

    def _tables(
        self, stage: str, tables: Iterable[str], extra_outs: Iterable[str] = ()
    ) -> dict[str, Any]:
        p = self.paths
        files = [f"{p.results}/tables/{t}.{ext}" for t in tables for ext in TABLE_FORMATS]
        parameters = {"metrics_dir": f"{p.results}/metrics", "tables_dir": f"{p.results}/tables"}
        if extra_outs:
            parameters["summary_dir"] = f"{p.results}/summary"
        return {
            "cmd": _papermill(p, stage, p.executed(stage), parameters),
            "deps": self._deps(
                stage, [f"{p.results}/metrics", "references/published_results.csv"]
            ),
            "params": _params(self.chain, self.repo, stage, False),
            "outs": _uncached([*files, p.executed(stage)]),
        }

    def main_results(self) -> dict[str, Any]:
        stage = self._tables("main_results", ["main", "paper_vs_reproduced"], ["summary"])
        summaries = [f"{self.paths.results}/summary/{name}.json" for name in self._summarised()]
        stage["metrics"] = _uncached(summaries)
        return stage

    def _summarised(self) -> list[str]:
        return list(
            dict.fromkeys(run["variant"] for run in runs(self.params, trained=False).values())
        )

    def ablations(self) -> dict[str, Any]:
        return self._tables("ablations", ["ablation", "scoring"])

    def figures(self) -> dict[str, Any]:
        p, config = self.paths, self.params.base
        names = ["qualitative", "per_class", "ablation", "losses", "roc_pr", "prototypes"]
        pngs, others = _figure_files(f"{p.results}/figures", names, config.figures.formats)
        parameters = {
            "metrics_dir": f"{p.results}/metrics",
            "losses_dir": f"{p.results}/losses",
            "predictions_dir": f"{p.artifacts}/predictions",
            "checkpoints_dir": f"{p.artifacts}/models",
            "figures_dir": f"{p.results}/figures",
        }
        deps = [
            *self.data,
            f"{p.results}/metrics",
            f"{p.results}/losses",
            f"{p.artifacts}/predictions",
            f"{p.artifacts}/models",
        ]
        return {
            "cmd": _papermill(p, "figures", p.executed("figures"), parameters),
            "deps": self._deps("figures", deps),
            "params": _params(self.chain, self.repo, "figures", False),
            "outs": _uncached([*others, p.executed("figures")]),
            "plots": _uncached(pngs),
        }


def render_pipeline(repo: Path, paths: PipelinePaths) -> dict[str, Any]:
    """The `dvc.yaml` content of the pipeline at `paths` (its stages, in run order)."""
    stages = _Stages(Path(repo), paths)
    content: dict[str, Any] = {"stages": {name: getattr(stages, name)() for name in NOTEBOOKS}}
    depth = len(Path(paths.dvc_yaml).parent.parts)
    if depth:  # a dvc.yaml under pipelines/NAME/ runs its commands from the repository root
        for stage in content["stages"].values():
            stage.get("do", stage)["wdir"] = "/".join([".."] * depth)
    return content


def write_pipeline_params(
    repo: Path, paths: PipelinePaths, extends: str, name: str, roots: list[str] | None
) -> Path:
    """Write `paths.params` for dataset `name`: it extends `extends` and sets the dataset name
    and, when given, its roots. Validated before it replaces an existing file."""
    target = repo / paths.params
    base = Path(extends).resolve()
    relative = Path(
        *([".."] * len(Path(paths.params).parent.parts)), base.relative_to(repo.resolve())
    )
    data: dict[str, Any] = {"dataset": name}
    if roots:
        data["root"] = roots[0] if len(roots) == 1 else roots
    text = (
        f"# Pipeline {name!r}: what differs from {relative.as_posix()} (written by `mddnet "
        f"pipeline`; edit freely, then render again).\n"
        + yaml.safe_dump({"extends": relative.as_posix(), "data": data}, sort_keys=False)
    )
    draft = target.with_name(f".{target.name}.draft")
    write_text(draft, text)
    try:
        load_params(draft)
    except BaseException:
        draft.unlink()
        raise
    draft.replace(target)
    return target


def write_pipeline(repo: Path, paths: PipelinePaths) -> Path:
    """Render and write `paths.dvc_yaml`."""
    content = render_pipeline(repo, paths)
    text = HEADER.format(params=paths.params) + yaml.safe_dump(
        content, sort_keys=False, width=1000
    )
    target = Path(repo) / paths.dvc_yaml
    write_text(target, text)
    return target
