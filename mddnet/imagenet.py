"""ImageNet channel statistics: the normalisation contract between the data and the teacher.

Datasets normalise images with these numbers; the teacher converts from them to whatever its
weights were trained with. One definition, below both `data` and `models`.
"""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
