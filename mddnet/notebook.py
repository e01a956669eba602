"""The setup cell of every notebook: project root, logging, validated config, kernels, seed.

Notebooks run from two places: papermill started by DVC in the repository root, and JupyterLab in
`notebooks/`. Resolving every path against the project root (found by walking up to the clone)
makes both behave the same without `os.chdir`; paths shown or recorded are relative to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mddnet.config import Config, Params, load_params
from mddnet.kernels import pin_cpu_kernels
from mddnet.seed import seed_everything

__all__ = ["Session", "project_root", "setup"]


def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) with pyproject.toml and mddnet/."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "mddnet").is_dir():
            return folder
    raise FileNotFoundError(
        f"{here}: not inside the mddnet repository (no pyproject.toml with mddnet/ above it); "
        f"start Jupyter or papermill from the clone"
    )


@dataclass(frozen=True)
class Session:
    """What a notebook needs after its parameters cell."""

    root: Path
    params: Params
    config: Config

    def path(self, relative: str | Path) -> Path:
        """A path from the parameters cell or params, resolved against the project root."""
        return self.root / Path(relative).expanduser()

    def roots(self) -> list[Path]:
        """The dataset roots of `data.root`, resolved against the project root."""
        return [self.path(root) for root in self.config.data.root_paths()]


class _RelativePaths(logging.Formatter):
    """Log lines with paths under the project root shown relative to it, so executed notebooks
    read the same on every clone (and name no machine's folders)."""

    def __init__(self, root: Path) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.prefix = f"{root}/"

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace(self.prefix, "")


def setup(params_file: str, variant: str | None = None, seed: int | None = None) -> Session:
    """Find the project root, show INFO logs in the notebook, load the config of one run, pin the
    CPU kernels (before any torch operation) and seed."""
    root = project_root()
    handler = logging.StreamHandler()
    handler.setFormatter(_RelativePaths(root))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("timm").setLevel(logging.WARNING)  # its INFO lines name site-packages
    params = load_params(root / params_file)
    config = params.config(variant, seed)
    pin_cpu_kernels(config.cpu)
    seed_everything(config.seed)
    return Session(root, params, config)
