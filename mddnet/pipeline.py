"""The DVC pipeline, rendered from a params file: one definition for every dataset.

`dvc.yaml` (the offline default) and `pipelines/<name>/dvc.yaml` (a real dataset, e.g. MVTec AD
or any folder in its layout) are written by `render_pipeline`, so the stage graph exists once, in
code, instead of in copied YAML files. Each stage runs one notebook with papermill; its deps are
the notebook, the package modules the notebook imports (found by reading the imports, transitively,
so a change to a module reruns exactly the stages that use it), and the files earlier stages wrote.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from mddnet.config import load_config
from mddnet.io import write_text

__all__ = [
    "NOTEBOOKS",
    "PipelinePaths",
    "notebook_modules",
    "render_pipeline",
    "write_pipeline",
    "write_pipeline_params",
]

log = logging.getLogger(__name__)

NOTEBOOKS = {
    "prepare": "notebooks/01_prepare_data.ipynb",
    "train": "notebooks/02_train.ipynb",
    "evaluate": "notebooks/03_evaluate.ipynb",
    "main_results": "notebooks/04_main_results.ipynb",
    "ablations": "notebooks/05_ablations.ipynb",
    "figures": "notebooks/06_figures.ipynb",
}

TABLE_FORMATS = ("csv", "md", "tex")

HEADER = (
    "# Rendered by `mddnet pipeline` from {params}; do not edit by hand:\n"
    "# change mddnet/pipeline.py or the params file and render again.\n"
)


@dataclass(frozen=True)
class PipelinePaths:
    """Where one pipeline reads its params and writes its products (relative to the repo root)."""

    params: str = "params.yaml"
    results: str = "results"
    artifacts: str = "artifacts"

    @property
    def checkpoints(self) -> str:
        return f"{self.artifacts}/checkpoints"

    @property
    def predictions(self) -> str:
        return f"{self.artifacts}/predictions"


def _module_file(repo: Path, module: str) -> Path | None:
    base = repo / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


class _ImportCollector(ast.NodeVisitor):
    """Modules of `mddnet` a source imports at run time (`if TYPE_CHECKING:` blocks are hints).

    In `from mddnet.x import y`, y may be a module too, so both names are collected and the
    caller keeps those that exist as files.
    """

    def __init__(self) -> None:
        self.found: set[str] = set()

    def visit_If(self, node: ast.If) -> None:  # noqa: N802 (ast.NodeVisitor's naming)
        if "TYPE_CHECKING" not in ast.unparse(node.test):
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802
        self.found |= {a.name for a in node.names if _ours(a.name)}

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        if node.level == 0 and node.module and _ours(node.module):
            self.found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}


def _ours(module: str) -> bool:
    return module.split(".")[0] == "mddnet"


def _imports(source: str) -> set[str]:
    collector = _ImportCollector()
    collector.visit(ast.parse(source))
    return collector.found


def notebook_modules(repo: Path, notebook: str) -> list[str]:
    """Package files a notebook depends on: its imports and theirs, transitively (posix paths)."""
    cells = json.loads((repo / notebook).read_text(encoding="utf-8"))["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    pending, files = _imports(source), set()
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(repo, module)
        if path is None:
            continue  # `from mddnet.x import name` where name is not a module
        files.add(path.relative_to(repo).as_posix())
        parts = module.split(".")
        # importing a submodule runs its parent packages' __init__ files too
        pending |= {".".join(parts[:i]) for i in range(1, len(parts))}
        pending |= _imports(path.read_text(encoding="utf-8"))
    return sorted(files)


def _quoted(value: str) -> str:
    """Shell-quote a value unless it is a plain path (DVC's `${item}` stays readable)."""
    return value if re.fullmatch(r"[\w./${}-]+", value) else shlex.quote(value)


def _papermill(stage: str, executed: str, parameters: dict[str, Any]) -> str:
    """The papermill command line of a stage (creates the folder papermill needs)."""
    folder = str(PurePosixPath(executed).parent)
    args = " ".join(f"-p {k} {_quoted(str(v))}" for k, v in parameters.items())
    return (
        f"mkdir -p {folder} && python -m papermill {NOTEBOOKS[stage]} {executed} "
        f"--log-output {args}"
    )


def _deps(repo: Path, stage: str, extra: Iterable[str] = ()) -> list[str]:
    return [NOTEBOOKS[stage], *notebook_modules(repo, NOTEBOOKS[stage]), *extra]


def _uncached(paths: Iterable[str]) -> list[dict[str, dict[str, bool]]]:
    """Small products committed to git (DVC tracks them but does not cache or gitignore them)."""
    return [{p: {"cache": False}} for p in paths]


def _executed(paths: PipelinePaths, name: str) -> str:
    return f"{paths.results}/notebooks/{name}.ipynb"


def render_pipeline(repo: Path, paths: PipelinePaths, wdir: str | None = None) -> dict[str, Any]:
    """The dvc.yaml content for the params file `paths.params` (a plain dict, ready for YAML)."""
    config = load_config(repo / paths.params)
    train_variants = [n for n, v in config.variants.items() if v.checkpoint is None]
    evaluated = {n: (v.checkpoint or n) for n, v in config.variants.items()}
    res, p = paths.results, paths.params
    data_root = config.data.root
    stages: dict[str, Any] = {}

    prepare_outs = [f"{res}/data/summary.csv"]
    prepare_figures = [f"{res}/figures/data_samples.{fmt}" for fmt in config.figures.formats]
    stages["prepare"] = {
        "cmd": _papermill(
            "prepare",
            _executed(paths, "01_prepare_data"),
            {
                "params_file": p,
                "summary_out": prepare_outs[0],
                "samples_figure": f"{res}/figures/data_samples",
            },
        ),
        "deps": _deps(repo, "prepare", [] if config.data.generate else [data_root]),
        "params": [{p: ["seed", "data", "figures"]}],
        "outs": ([data_root] if config.data.generate else [])
        + _uncached([*prepare_outs, *prepare_figures, _executed(paths, "01_prepare_data")]),
    }

    stages["train"] = {
        "foreach": train_variants,
        "do": {
            "cmd": _papermill(
                "train",
                _executed(paths, "02_train_${item}"),
                {
                    "params_file": p,
                    "variant": "${item}",
                    "checkpoint": f"{paths.checkpoints}/${{item}}.pt",
                    "losses_csv": f"{res}/losses/${{item}}.csv",
                },
            ),
            # the summary ties training to the prepare stage, which validates real data first
            "deps": _deps(repo, "train", [data_root, prepare_outs[0]]),
            "params": [{p: ["seed", "data", "model", "train", "variants.${item}"]}],
            "outs": [
                f"{paths.checkpoints}/${{item}}.pt",
                *_uncached([_executed(paths, "02_train_${item}")]),
            ],
            "plots": [
                {f"{res}/losses/${{item}}.csv": {"cache": False, "x": "step", "y": "total"}}
            ],
        },
    }

    stages["evaluate"] = {
        "foreach": evaluated,
        "do": {
            "cmd": _papermill(
                "evaluate",
                _executed(paths, "03_evaluate_${key}"),
                {
                    "params_file": p,
                    "variant": "${key}",
                    "checkpoint": f"{paths.checkpoints}/${{item}}.pt",
                    "predictions_out": f"{paths.predictions}/${{key}}.npz",
                    "metrics_out": f"{res}/metrics/${{key}}.json",
                    "provenance_out": f"{res}/provenance/${{key}}.json",
                },
            ),
            "deps": _deps(repo, "evaluate", [data_root, f"{paths.checkpoints}/${{item}}.pt"]),
            "params": [{p: ["seed", "data", "evaluate", "variants.${key}"]}],
            "outs": [
                f"{paths.predictions}/${{key}}.npz",
                *_uncached(
                    [f"{res}/provenance/${{key}}.json", _executed(paths, "03_evaluate_${key}")]
                ),
            ],
            "metrics": _uncached([f"{res}/metrics/${{key}}.json"]),
        },
    }

    metrics = {n: f"{res}/metrics/{n}.json" for n in evaluated}
    tables = f"{res}/tables"
    main = config.report.main_variant
    stages["main_results"] = {
        "cmd": _papermill(
            "main_results",
            _executed(paths, "04_main_results"),
            {"params_file": p, "metrics_dir": f"{res}/metrics", "tables_dir": tables},
        ),
        "deps": _deps(
            repo,
            "main_results",
            [
                *sorted({metrics[n] for n in (main, *config.report.reproduced)}),
                config.report.reference,
            ],
        ),
        "params": [{p: ["data.dataset", "data.image_size", "model", "report"]}],
        "outs": _uncached(
            [
                f"{tables}/{t}.{ext}"
                for t in ("main", "paper_vs_reproduced")
                for ext in TABLE_FORMATS
            ]
            + [_executed(paths, "04_main_results")]
        ),
    }
    stages["ablations"] = {
        "cmd": _papermill(
            "ablations",
            _executed(paths, "05_ablations"),
            {"params_file": p, "metrics_dir": f"{res}/metrics", "tables_dir": tables},
        ),
        "deps": _deps(
            repo,
            "ablations",
            [metrics[n] for n in (*config.report.ablation, *config.report.scoring)],
        ),
        "params": [{p: ["data.dataset", "data.image_size", "model", "report", "variants"]}],
        "outs": _uncached(
            [f"{tables}/{t}.{ext}" for t in ("ablation", "scoring") for ext in TABLE_FORMATS]
            + [_executed(paths, "05_ablations")]
        ),
    }
    figures = f"{res}/figures"
    figure_names = ("qualitative", "per_class", "ablation", "losses", "roc_pr", "prototypes")
    stages["figures"] = {
        "cmd": _papermill(
            "figures",
            _executed(paths, "06_figures"),
            {
                "params_file": p,
                "metrics_dir": f"{res}/metrics",
                "losses_dir": f"{res}/losses",
                "predictions_dir": paths.predictions,
                "checkpoints_dir": paths.checkpoints,
                "figures_dir": figures,
            },
        ),
        "deps": _deps(
            repo,
            "figures",
            [
                *[metrics[n] for n in config.report.ablation],
                *[f"{res}/losses/{n}.csv" for n in config.figures.compare],
                *[f"{paths.predictions}/{n}.npz" for n in config.figures.compare],
                f"{paths.checkpoints}/{main}.pt",
            ],
        ),
        "params": [{p: ["data.dataset", "report", "figures", "variants"]}],
        "outs": _uncached(
            [f"{figures}/{name}.{fmt}" for name in figure_names for fmt in config.figures.formats]
            + [_executed(paths, "06_figures")]
        ),
    }
    if wdir is not None:
        for stage in stages.values():
            target = stage.get("do", stage)
            target["wdir"] = wdir
    return {"stages": stages}


def write_pipeline_params(source: Path, target: Path, name: str, data_root: str | None) -> Path:
    """Copy a params file for pipeline `name`: `data.dataset = name`, `data.root = data_root`.

    The copy is validated before it replaces `target`, so a bad key fails here and leaves no
    file behind.
    """
    raw = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    raw["data"]["dataset"] = name
    if data_root is not None:
        raw["data"]["root"] = data_root
    text = (
        f"# Params of pipeline {name!r}, written by `mddnet pipeline` from {source.name};\n"
        f"# edit freely (comments of the source are in {source.name}).\n"
    ) + yaml.safe_dump(raw, sort_keys=False, width=99)
    draft = target.with_name(f".{target.name}.draft")
    write_text(draft, text)
    try:
        load_config(draft)
    except BaseException:
        draft.unlink()
        raise
    draft.replace(target)
    return target


def write_pipeline(repo: Path, paths: PipelinePaths, target: Path) -> Path:
    """Render and write a dvc.yaml; `target` is the dvc.yaml path (its folder sets `wdir`)."""
    repo, target = Path(repo).resolve(), Path(target).resolve()
    depth = len(target.parent.relative_to(repo).parts)
    wdir = "/".join([".."] * depth) if depth else None
    content = render_pipeline(repo, paths, wdir)
    text = HEADER.format(params=paths.params) + yaml.safe_dump(
        content, sort_keys=False, width=1000
    )
    write_text(target, text)
    log.info("wrote %s (%d stages) for %s", target, len(content["stages"]), paths.params)
    return target
