"""Generated offline benchmark: textures and objects in MVTec AD layout with exact defect masks.

Not a box of the paper: MDD-Net is evaluated on MVTec AD, VisA and other real datasets [paper].
This generator stands in for them on a fresh clone without data [ours], so the whole pipeline
(one model trained on the normal images of all classes, then image and pixel metrics per class)
runs through the same code path as real data.

Three texture classes are cut from photographs scikit-image ships (`textures`), three object
classes are drawn procedurally with shading, a lit backdrop and sensor noise (`objects`), on a
supersampled canvas (`canvas`). Defects (`defects`, and the part defects in `objects`) are not
the training-time synthesis; each mask is the difference of a sample's clean and defective
renderings (`classes`). `writer` puts the tree on disk.
"""

from __future__ import annotations

from mddnet.benchmark.classes import (
    DEFECT_TYPES,
    KNOWN_CLASSES,
    MASK_TOLERANCE,
    MIN_DEFECT_AREA,
    OBJECTS,
    SPLITS,
    TEXTURES,
    SampleRendering,
    render_sample,
    sample_path,
)
from mddnet.benchmark.writer import (
    GENERATOR,
    GENERATOR_VERSION,
    BenchmarkSummary,
    ClassSummary,
    make_benchmark,
)

__all__ = [
    "DEFECT_TYPES",
    "GENERATOR",
    "GENERATOR_VERSION",
    "KNOWN_CLASSES",
    "MASK_TOLERANCE",
    "MIN_DEFECT_AREA",
    "OBJECTS",
    "SPLITS",
    "TEXTURES",
    "BenchmarkSummary",
    "ClassSummary",
    "SampleRendering",
    "make_benchmark",
    "render_sample",
    "sample_path",
]
