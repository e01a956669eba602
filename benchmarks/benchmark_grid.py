"""Picture check of the generated offline benchmark: normals and defects with their masks.

One row per class: a few normal training images, then for each defect type the defective image
and the same image with its mask outlined in red. Nothing is written to disk but the PNG; the
samples are rendered in memory by the same function `mddnet make-benchmark` uses.

    python benchmarks/benchmark_grid.py /tmp/benchmark_grid.png [--params params.yaml] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mddnet.config import load_config  # noqa: E402
from mddnet.data.synthetic import DEFECT_TYPES, render_sample  # noqa: E402


def _panel(ax: plt.Axes, image: np.ndarray, title: str, mask: np.ndarray | None = None) -> None:
    ax.imshow(image, interpolation="nearest")
    if mask is not None:
        ax.contour(mask > 0, levels=[0.5], colors="red", linewidths=0.6)
    ax.set_title(title, fontsize=6, pad=2)
    ax.set_axis_off()


def draw_grid(
    out: Path, classes: tuple[str, ...], image_size: int, seed: int, normals: int, sample: int
) -> None:
    """Render the grid; `sample` picks which image of each defect type is shown."""
    types = max(len(DEFECT_TYPES[name]) for name in classes)
    columns = normals + 2 * types
    fig, axes = plt.subplots(
        len(classes), columns, figsize=(1.5 * columns, 1.6 * len(classes)), squeeze=False
    )
    for row, name in enumerate(classes):
        for i in range(normals):
            _panel(axes[row, i], render_sample(name, image_size, seed, "train", i).normal, name)
        n_types = len(DEFECT_TYPES[name])
        for t in range(n_types):
            s = render_sample(name, image_size, seed, "test_defect", sample * n_types + t)
            col = normals + 2 * t
            _panel(axes[row, col], s.defective, s.defect_type)
            _panel(axes[row, col + 1], s.defective, f"{s.defect_type} mask", s.mask)
        for col in range(normals + 2 * n_types, columns):
            axes[row, col].set_axis_off()
    fig.tight_layout(pad=0.3)
    fig.savefig(out, dpi=150)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="PNG file to write")
    parser.add_argument("--params", default="params.yaml", help="reads data.benchmark from it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normals", type=int, default=2, help="normal images per class")
    parser.add_argument("--sample", type=int, default=0, help="which image of each defect type")
    args = parser.parse_args()
    bench = load_config(args.params).data.benchmark
    draw_grid(args.out, bench.classes, bench.image_size, args.seed, args.normals, args.sample)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
