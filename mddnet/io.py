"""Files as the interface between stages: atomic writes and safe checkpoints.

Every write goes to a temporary file in the target folder and is renamed over the target with
`os.replace`, so an interrupted run leaves either the old file or the new one, never half of one.
Checkpoints are read with `torch.load(weights_only=True)`, so loading one cannot run code.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from mddnet.errors import MddnetError

__all__ = [
    "CheckpointError",
    "atomic_open",
    "load_checkpoint",
    "read_json",
    "save_checkpoint",
    "write_bytes",
    "write_csv",
    "write_json",
    "write_text",
]

CHECKPOINT_FORMAT = 1


class CheckpointError(MddnetError):
    """A file that is not a readable mddnet checkpoint."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON with full float precision (rounding belongs to table formatting)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file a stage wrote, with errors that say which stage to rerun."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (run the stage that writes it first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it and rerun its stage") from err


def write_csv(
    path: str | Path, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]
) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Save a checkpoint atomically.

    `payload` must hold `state_dict`, `config` (plain dict), `class_names` and may hold more
    (optimizer state, step); the package version and format number are added here.
    """
    import torch  # here, not at import: tables and figures use this module without torch

    from mddnet import __version__

    for key in ("state_dict", "config", "class_names"):
        if key not in payload:
            raise KeyError(f"checkpoint payload needs {key!r}")
    data = {"format": CHECKPOINT_FORMAT, "mddnet_version": __version__, **payload}
    with atomic_open(path, "wb") as handle:
        torch.save(data, handle)


def _load_error_detail(err: Exception) -> str:
    """The line of a `torch.load` error that says what is wrong with the file.

    For a pickle that `weights_only=True` refuses, torch's first line advises retrying with
    `weights_only=False`, which would run the code; the line before its closing pointer to the
    docs names the refused global or opcode, and that is what the user needs.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, pickle.UnpicklingError) and len(lines) > 2:
        return lines[-2]
    return lines[0] if lines else "no detail"


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; explain what is wrong if it is not one.

    `map_location` is what `torch.load` takes (a device or its name).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: checkpoint not found (train one with `mddnet train --out {path}` "
            f"or `dvc repro`)"
        )
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(
            f"{path}: not a loadable mddnet checkpoint ({type(err).__name__}: "
            f"{_load_error_detail(err)}). Files are read with weights_only=True, so pickled "
            f"code is refused; retrain or pass the right file."
        ) from err
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not an mddnet checkpoint (no format {CHECKPOINT_FORMAT} header); "
            f"pass a file written by `mddnet train`"
        )
    for key in ("state_dict", "config", "class_names"):
        if key not in data:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}; it is incomplete, retrain")
    return data
