"""Real datasets from their official sources: download with a checksum, extract to MVTec layout.

The sources (URL, sha256, layout, license) are data, in `pipelines/datasets/params.yaml`, and
the `pipelines/datasets/dvc.yaml` stages call `mddnet fetch-dataset`, so DVC records what was
fetched and a real-data pipeline that reads `datasets/<name>` depends on it. Nothing here runs
for the offline default. A download goes to a hidden temporary file that becomes the archive
only when its sha256 matches; extraction refuses members that would land outside the target
folder, and VisA is converted by `mddnet.data.visa` after extraction.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from tqdm import tqdm

from mddnet.data.layout import list_classes
from mddnet.data.visa import convert_visa
from mddnet.errors import MddnetError

__all__ = ["Source", "download", "extract", "load_sources", "source_of"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from, how to check it, and how to lay it out."""

    name: str
    url: str
    sha256: str
    layout: Literal["mvtec", "visa"]
    license: str
    homepage: str


def load_sources(path: str | Path) -> dict[str, Source]:
    """The `sources` of a datasets params file, checked key by key."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    sources = raw.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise MddnetError(f"{path}: needs a `sources` mapping of dataset names to their source")
    found = {}
    for name, spec in sources.items():
        fields = set(Source.__dataclass_fields__) - {"name"}
        if not isinstance(spec, dict) or set(spec) != fields:
            raise MddnetError(f"{path}: sources.{name} needs exactly the keys {sorted(fields)}")
        if spec["layout"] not in ("mvtec", "visa"):
            raise MddnetError(f"{path}: sources.{name}.layout must be mvtec or visa")
        found[name] = Source(name=name, **{key: str(value) for key, value in spec.items()})
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(source: Source, archive: Path) -> Path:
    """`source.url` to `archive`, kept only if its sha256 is the one `source` states."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f".{archive.name}.partial")
    log.info("downloading %s (%s; license: %s)", source.url, source.name, source.license)
    try:
        with urllib.request.urlopen(source.url) as response, partial.open("wb") as handle:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=source.name) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    handle.write(block)
                    bar.update(len(block))
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise MddnetError(
            f"{source.url}: download failed ({err}); check the network, or download the file "
            f"from {source.homepage} yourself and put it at {archive}"
        ) from err
    found = _sha256(partial)
    if found != source.sha256:
        partial.unlink()
        raise MddnetError(
            f"{source.url}: sha256 {found} is not the expected {source.sha256}; the file changed "
            f"at the source or the download was cut: retry, or update the source's sha256"
        )
    partial.replace(archive)
    return archive


def _safe_members(bundle: tarfile.TarFile, target: Path) -> list[tarfile.TarInfo]:
    members = []
    for member in bundle.getmembers():
        destination = (target / member.name).resolve()
        if not destination.is_relative_to(target.resolve()) or member.issym() or member.islnk():
            raise MddnetError(f"archive member {member.name!r} would leave {target}; refused")
        members.append(member)
    return members


def _unpack(archive: Path, target: Path) -> None:
    with tarfile.open(archive) as bundle:
        bundle.extractall(target, members=_safe_members(bundle, target), filter="data")


def _dataset_root(folder: Path) -> Path:
    """The folder holding the class folders: `folder` or its one sub-folder (tars often wrap)."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    dirs = [p for p in entries if p.is_dir()]
    return dirs[0] if len(dirs) == 1 and len(entries) == 1 else folder


def extract(source: Source, archive: Path, out: Path) -> Path:
    """Unpack `archive` into `out` in MVTec layout (VisA converted); `out` appears when done."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        unpacked = Path(tmp) / "unpacked"
        unpacked.mkdir()
        _unpack(archive, unpacked)
        root = _dataset_root(unpacked)
        if source.layout == "visa":
            convert_visa(root, Path(tmp) / "converted")
            root = Path(tmp) / "converted"
        list_classes(root)  # a clear error now if the archive is not a dataset
        shutil.move(str(root), str(out))
    log.info("%s: %s in MVTec layout at %s", source.name, ", ".join(list_classes(out)), out)
    return out


def source_of(sources: str | Path, name: str) -> Source:
    """Dataset `name` of a datasets params file, or an error listing the known ones."""
    known = load_sources(sources)
    if name not in known:
        raise MddnetError(f"{sources}: no source {name!r} (known: {', '.join(known)})")
    return known[name]
