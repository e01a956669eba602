"""Imports point down only (DESIGN.md): a module never imports one of a higher layer.

Layers, bottom to top. Imports inside `if TYPE_CHECKING:` are type hints and do not count;
imports inside functions do (they run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mddnet"

LAYERS: list[set[str]] = [
    {"mddnet.errors"},
    {
        "mddnet",
        "mddnet.config",
        "mddnet.imagenet",
        "mddnet.seed",
        "mddnet.device",
        "mddnet.kernels",
    },
    {"mddnet.distributed"},
    {"mddnet.io"},
    {"mddnet.metrics", "mddnet.predictions", "mddnet.data.layout", "mddnet.data.anomalies"},
    {
        "mddnet.benchmark",
        "mddnet.benchmark.canvas",
        "mddnet.benchmark.textures",
        "mddnet.benchmark.objects",
        "mddnet.benchmark.defects",
        "mddnet.benchmark.classes",
        "mddnet.benchmark.writer",
    },
    {
        "mddnet.data.visa",
        "mddnet.data.datasets",
        "mddnet.data.prepare",
        "mddnet.data.fetch",
        "mddnet.data",
    },
    {
        "mddnet.models",
        "mddnet.models.encoder",
        "mddnet.models.bottleneck",
        "mddnet.models.decoder",
        "mddnet.models.memory",
        "mddnet.models.weights",
        "mddnet.models.mddnet",
    },
    {"mddnet.scoring", "mddnet.losses"},
    {"mddnet.checkpoint", "mddnet.reference"},
    {"mddnet.calibration"},
    {
        "mddnet.train",
        "mddnet.evaluate",
        "mddnet.diagnostics",
        "mddnet.report",
        "mddnet.plots",
        "mddnet.pipeline",
    },
    {"mddnet.predict", "mddnet.export", "mddnet.notebook", "mddnet.lanes", "mddnet.cli"},
]
# Extra rules of DESIGN.md beyond the layer order.
FORBIDDEN = {
    "mddnet.models": ("mddnet.data", "mddnet.losses"),
    "mddnet.metrics": ("torch", "mddnet."),
    "mddnet.report": ("mddnet.models", "mddnet.train", "mddnet.evaluate", "torch"),
    "mddnet.plots": (
        "mddnet.models",
        "mddnet.train",
        "mddnet.evaluate",
        "mddnet.checkpoint",
        "torch",
    ),
    "mddnet.predictions": ("torch",),
}
# Modules that may import only these of the package (the pipeline renders dvc.yaml from params,
# so it must not pull in torch through the computing modules).
ONLY = {"mddnet.pipeline": {"mddnet.config", "mddnet.io"}}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if module in layer:
            return index
    raise AssertionError(f"{module} is in no layer of this test: add it to LAYERS")


def _runtime_imports(tree: ast.Module) -> set[str]:
    """Imported module names, skipping `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_point_down(path: Path) -> None:
    module = _module_name(path)
    imports = _runtime_imports(ast.parse(path.read_text(encoding="utf-8")))
    ours = {name for name in imports if name == "mddnet" or name.startswith("mddnet.")}
    for name in ours:
        assert _layer(name) <= _layer(module), f"{module} imports {name}, a higher layer"
    for prefix, banned in FORBIDDEN.items():
        if module == prefix or module.startswith(prefix + "."):
            for name in imports:
                assert not any(name == b or name.startswith(b) for b in banned if b != ""), (
                    f"{module} must not import {name}"
                )
    if module in ONLY:
        assert ours <= ONLY[module], f"{module} imports {sorted(ours - ONLY[module])}"


@pytest.mark.slow
def test_tables_and_figures_load_without_torch() -> None:
    probe = "import sys, mddnet.report, mddnet.plots; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or "importing report/plots loaded torch"
