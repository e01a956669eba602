"""Real datasets through DVC, offline: small local archives stand in for the official URLs."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from mddnet.benchmark import make_benchmark
from mddnet.config import load_config
from mddnet.data.fetch import download, extract, load_sources, source_of
from mddnet.data.layout import scan_dataset
from mddnet.errors import MddnetError

REPO = Path(__file__).resolve().parents[2]
SIZES = {
    "image_size": 32,
    "train_per_class": 2,
    "test_good_per_class": 1,
    "test_defect_per_class": 1,
}


def _archive(folder: Path, out: Path, wrap: str = "") -> Path:
    """`folder`'s files as a .tar.xz (under `wrap/` if given), as the official archives hold."""
    with tarfile.open(out, "w:xz") as bundle:
        for path in sorted(folder.rglob("*")):
            bundle.add(path, arcname=str(Path(wrap) / path.relative_to(folder)), recursive=False)
    return out


def _sources(tmp_path: Path, archive: Path, layout: str = "mvtec", sha256: str | None = None):
    digest = sha256 or hashlib.sha256(archive.read_bytes()).hexdigest()
    spec = {
        "url": archive.as_uri(),
        "sha256": digest,
        "layout": layout,
        "license": "CC BY-NC-SA 4.0",
        "homepage": "https://example.org",
    }
    path = tmp_path / "sources.yaml"
    path.write_text(yaml.safe_dump({"sources": {"stand_in": spec}}))
    return path


@pytest.fixture
def mvtec_archive(tmp_path: Path) -> Path:
    config = load_config(REPO / "params.yaml", overrides={"data": {"benchmark": SIZES}})
    benchmark = tmp_path / "bench"
    make_benchmark(benchmark, config.data.benchmark, 0)
    return _archive(benchmark, tmp_path / "stand_in.tar.xz", wrap="mvtec_anomaly_detection")


def test_the_official_sources_are_listed_with_checksums_and_licenses() -> None:
    sources = load_sources(REPO / "pipelines/datasets/params.yaml")
    assert set(sources) == {"mvtec_ad", "visa"}
    for source in sources.values():
        assert source.url.startswith("https://") and len(source.sha256) == 64
        assert "CC BY-NC-SA" in source.license


def test_download_and_extract_give_a_readable_mvtec_tree(tmp_path, mvtec_archive) -> None:
    source = source_of(_sources(tmp_path, mvtec_archive), "stand_in")
    archive = download(source, tmp_path / "downloads" / "stand_in.tar")
    assert archive.read_bytes() == mvtec_archive.read_bytes()
    out = extract(source, archive, tmp_path / "datasets" / "stand_in")
    samples = scan_dataset(out)
    assert {s.class_name for s in samples} == {
        "brick",
        "grass",
        "gravel",
        "washer",
        "gear",
        "capsule",
    }
    assert not [p for p in (tmp_path / "datasets").iterdir() if p.name.startswith(".")]


def test_a_wrong_checksum_keeps_no_file(tmp_path, mvtec_archive) -> None:
    source = source_of(_sources(tmp_path, mvtec_archive, sha256="0" * 64), "stand_in")
    with pytest.raises(MddnetError, match="sha256 .* is not the expected 0000"):
        download(source, tmp_path / "downloads" / "stand_in.tar")
    assert not list((tmp_path / "downloads").iterdir())


def test_a_member_that_would_leave_the_target_is_refused(tmp_path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as bundle:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 2
        bundle.addfile(info, io.BytesIO(b"hi"))
    source = source_of(_sources(tmp_path, evil), "stand_in")
    with pytest.raises(MddnetError, match="would leave"):
        extract(source, evil, tmp_path / "out")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "out").exists()


def test_visa_is_converted_after_extraction(tmp_path) -> None:
    from tests.unit.test_visa import _fake_visa

    release = tmp_path / "VisA"
    release.mkdir()
    _fake_visa(release)
    archive = _archive(release, tmp_path / "visa.tar")
    source = source_of(_sources(tmp_path, archive, layout="visa"), "stand_in")
    out = extract(source, archive, tmp_path / "datasets" / "visa")
    assert {s.split for s in scan_dataset(out)} == {"train", "test"}


@pytest.mark.slow
def test_the_dvc_stages_fetch_a_stand_in_and_the_default_never_needs_them(
    tmp_path, mvtec_archive
) -> None:
    """`dvc repro pipelines/datasets/dvc.yaml:extract@...` in a repository whose sources point at
    a local archive; the root pipeline (the offline default) lists none of these stages."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "mddnet", repo / "mddnet", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "pipelines" / "datasets").mkdir(parents=True)
    (repo / "pipelines/datasets/dvc.yaml").write_text(
        (REPO / "pipelines/datasets/dvc.yaml")
        .read_text()
        .replace("[mvtec_ad, visa]", "[mvtec_ad]")
    )
    sources = yaml.safe_load(_sources(tmp_path, mvtec_archive).read_text())["sources"]
    (repo / "pipelines/datasets/params.yaml").write_text(
        yaml.safe_dump({"sources": {"mvtec_ad": sources["stand_in"]}})
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for args in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(args, cwd=repo, check=True)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "pipelines/datasets/dvc.yaml:extract@mvtec_ad"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len({s.class_name for s in scan_dataset(repo / "datasets/mvtec_ad")}) == 6
    root = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert not {"download", "extract"} & set(root)
