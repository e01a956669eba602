"""Fingerprint a short training on this CPU, with oneDNN on and off, to compare CPU makers.

Why: with the kernels pinned (`cpu` params section), the generated benchmark and the teacher's
forward pass are byte-identical between an Intel Xeon and an AMD EPYC, but training is not: the
losses part in the 7th digit after one or two steps (README, "What the numbers mean"). oneDNN
chooses its blockings by cache size, which the ISA cap does not fix; turning it off
(`torch.backends.mkldnn.enabled = False`) costs 2-3x the training time. Whether that buys the
same bytes across makers needs one run on each, so this writes a fingerprint per CPU and compares
the fingerprints it finds.

Each run is the `mddnet train` command line in a fresh process (so the kernel pinning happens as
for users), on the generated benchmark (written to a temporary folder), `--steps` Adam steps of
each variant of `params.yaml`, seed 0. The fingerprint: every step's total loss as written to the
losses CSV, and a sha256 of the trained weights.

Usage:
    python benchmarks/cross_cpu.py --out results/benchmarks/cross_cpu      # writes <cpu>.json
    python benchmarks/cross_cpu.py --compare results/benchmarks/cross_cpu  # every pair there
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
import yaml

from mddnet.config import config_to_dict, load_config
from mddnet.kernels import cpu_report, pin_cpu_kernels

MODES = {"onednn_on": "", "onednn_off": "torch.backends.mkldnn.enabled = False; "}


def _train(params: Path, variant: str, out: Path, mode: str) -> float:
    """Run `mddnet train` in a fresh process under `mode`; its wall time in seconds."""
    args = ["train", "--params", str(params), "--variant", variant, "--seed", "0"]
    args += ["--out", str(out)]
    code = f"import sys, torch; {MODES[mode]}from mddnet.cli import main; sys.exit(main({args!r}))"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def fingerprint(checkpoint: Path) -> dict[str, Any]:
    """Every step's total loss (as the losses CSV writes it) and a sha256 of the weights."""
    with checkpoint.with_suffix(".losses.csv").open() as file:
        losses = [row["total"] for row in csv.DictReader(file)]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().numpy().tobytes())
    return {"losses": losses, "weights_sha256": digest.hexdigest()}


def config_sha256(params: Path, variant: str) -> str:
    """sha256 of the run's resolved config less its data folder (a temporary one per run): two
    fingerprints are comparable only if they trained the same model on the same data."""
    plain = config_to_dict(load_config(params, variant))
    del plain["data"]["root"]
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def run(params: Path, variants: list[str], steps: int, root: Path) -> dict[str, Any]:
    """Fingerprints of every (mode, variant) on this CPU."""
    root.mkdir(parents=True, exist_ok=True)
    benchmark = root / "benchmark"
    subprocess.run(
        [sys.executable, "-m", "mddnet.cli", "make-benchmark", "--params", str(params),
         str(benchmark)],
        check=True, capture_output=True,
    )  # fmt: skip
    short = root / "params.yaml"
    short.write_text(
        yaml.safe_dump(
            {"extends": str(params.resolve()), "data": {"root": str(benchmark), "generate": False},
             "train": {"steps": steps}}
        )
    )  # fmt: skip
    runs: dict[str, Any] = {}
    for mode in MODES:
        for variant in variants:
            out = root / mode / f"{variant}.pt"
            seconds = _train(short, variant, out, mode)
            runs[f"{mode}/{variant}"] = fingerprint(out) | {
                "config_sha256": config_sha256(short, variant),
                "wall_time_s": round(seconds, 1),
            }
    return {"cpu": cpu_report(), "steps": steps, "torch": torch.__version__, "runs": runs}


def first_difference(a: list[str], b: list[str]) -> int | None:
    """The first step (1-based) whose loss differs, None if all agree."""
    for step, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        if x != y:
            return step
    return None


def compare(folder: Path) -> list[str]:
    """One line per pair of fingerprint files and run: identical, where they part, or not
    comparable (other configs, e.g. a default changed between the two; or one not recorded)."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    lines = []
    for (name_a, a), (name_b, b) in combinations(found.items(), 2):
        for key in sorted(set(a["runs"]) & set(b["runs"])):
            ra, rb = a["runs"][key], b["runs"][key]
            if ra.get("config_sha256") is None or ra.get("config_sha256") != rb.get(
                "config_sha256"
            ):
                lines.append(f"{name_a} vs {name_b}, {key}: not comparable (other configs)")
                continue
            step = first_difference(ra["losses"], rb["losses"])
            same = step is None and ra["weights_sha256"] == rb["weights_sha256"]
            verdict = "identical" if same else f"differ from step {step or 'end (weights)'}"
            lines.append(f"{name_a} vs {name_b}, {key}: {verdict}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--variants", nargs="+", default=["rd_baseline", "mddnet"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, help="folder to write <cpu>.json into")
    parser.add_argument("--compare", type=Path, help="folder of <cpu>.json files to compare")
    args = parser.parse_args()
    if args.compare:
        print("\n".join(compare(args.compare)) or f"no two fingerprints in {args.compare}")
        return
    if args.out is None:
        parser.error("give --out (to run here) or --compare")
    pin_cpu_kernels(load_config(args.params).cpu)  # so the report says what the runs use
    with tempfile.TemporaryDirectory() as root:
        result = run(args.params, args.variants, args.steps, Path(root))
    slug = re.sub(r"[^a-z0-9]+", "_", result["cpu"]["cpu"].lower()).strip("_")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{slug}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / f'{slug}.json'}")


if __name__ == "__main__":
    main()
