"""ONNX export of MDD-Net's inference graph: image -> fused anomaly map and image score.

The graph is the trained model (teacher, bottleneck, class-aware memory, restoration and identity
decoders) followed by the scoring of `mddnet.scoring` with the checkpoint's own `evaluate`
settings and calibration (fusion weights, per-class normalisation, blur, image score), so a
deployment without PyTorch scores as `mddnet evaluate` does.

Inputs: `image` (B, 3, S, S) float32, ImageNet-normalised, S = the checkpoint's
`data.image_size`; `class_id` (B,) int64, the class whose memory prototypes are read, or any
negative value (`PREDICTED`) to read the class the memory predicts, chosen per image. Outputs:
`anomaly_map` (B, S, S) float32, `score` (B,) float32 and `read_class_id` (B,) int64, the class
that was read (-1 for a model without memory, which ignores `class_id`). The batch is dynamic;
the image size is fixed, because the decoders mirror the teacher at one resolution.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from mddnet.checkpoint import Scorer, load_trained_model
from mddnet.imagenet import IMAGENET_MEAN, IMAGENET_STD
from mddnet.io import write_bytes
from mddnet.models.mddnet import MDDNet
from mddnet.models.memory import ClassAwareMemory, MemoryRead
from mddnet.scoring import anomaly_maps, fuse, image_scores

if TYPE_CHECKING:
    import onnx

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "PREDICTED",
    "InferenceGraph",
    "InferenceOutput",
    "export_onnx",
]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PREDICTED = -1  # a class_id that asks the memory for its own prediction
INPUT_NAMES = ("image", "class_id")
_EXAMPLE_BATCH = 2  # images in the tracing example; the exported batch axis is dynamic


class InferenceOutput(NamedTuple):
    """What the exported graph returns; the field names are the ONNX output names."""

    anomaly_map: Tensor  # (B, S, S) fused and blurred, as checkpoint.Scorer gives it
    score: Tensor  # (B,) as scoring.image_scores
    read_class_id: Tensor  # (B,) int64 class the memory read; -1 without memory


OUTPUT_NAMES = InferenceOutput._fields


class _PerImageClassMemory(nn.Module):
    """The trained memory, reading the given class where it is >= 0 and its prediction elsewhere.

    `ClassAwareMemory` takes the classes of all images or of none, and an exported graph has no
    branches, so this reads once for the prediction and once more with the merged classes. The
    extra read is an attention over a few prototypes at the bottleneck's coarse resolution.
    """

    def __init__(self, memory: ClassAwareMemory) -> None:
        super().__init__()
        self.memory = memory
        self.register_buffer("known", torch.arange(memory.num_classes), persistent=False)

    def forward(self, z: Tensor, class_ids: Tensor) -> MemoryRead:
        predicted = self.memory(z).class_ids  # (B,)
        merged = torch.where(class_ids < 0, predicted, class_ids)
        # The memory selects its class by a one-hot product, which would read zeros for an id
        # beyond the known classes; this Gather (values unchanged) makes onnxruntime refuse it.
        return self.memory(z, self.known[merged])


class InferenceGraph(nn.Module):
    """A trained MDD-Net and its scoring settings as one module: (image, class_id) -> outputs.

    The trained parts are recomposed into an MDDNet with the per-image class memory injected, so
    the forward pass is MDDNet's own; the map and the score come from `mddnet.scoring`.
    """

    def __init__(self, model: MDDNet, scorer: Scorer) -> None:
        super().__init__()
        memory = None if model.memory is None else _PerImageClassMemory(model.memory)
        self.model = MDDNet(
            model.teacher,
            model.bottleneck,
            model.restoration_decoder,
            model.identity_decoder,
            memory,
        )
        self.scorer = scorer

    def forward(self, image: Tensor, class_id: Tensor) -> InferenceOutput:
        """`image` (B, 3, S, S) ImageNet-normalised; `class_id` (B,) int64, < 0 = predicted."""
        scorer, settings = self.scorer, self.scorer.config.evaluate
        output = self.model(image, class_id)
        maps = anomaly_maps(output, image.shape[-2:], settings.blur_sigma, scorer.scale_weights)
        read_ids = class_id if output.class_ids is None else output.class_ids
        fused = fuse(maps, scorer.weights, scorer.statistics, read_ids)  # (B, S, S)
        score = image_scores(fused, scorer.image_score, settings.topk)  # (B,)
        # Without memory the class is unused; the -1 output also keeps the input in the graph.
        read = (
            torch.full_like(class_id, PREDICTED) if output.class_ids is None else output.class_ids
        )
        return InferenceOutput(fused, score, read)


def export_onnx(checkpoint: str | Path, out: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Export a checkpoint's inference graph to `out` as ONNX (dynamic batch), checked, atomically.

    Uses the TorchScript exporter (`dynamo=False`): the dynamo exporter needs onnxscript, which
    the project does not depend on. The class names (index = class_id), image size and input
    normalisation go into the model's metadata, so a consumer can prepare inputs and name classes.
    """
    try:
        import onnx  # here, not at import: onnx is an optional (dev) dependency
    except ImportError as err:
        raise ImportError(
            "ONNX export needs the onnx package: pip install onnx onnxruntime "
            "(or install mddnet with its dev extras)"
        ) from err

    trained = load_trained_model(checkpoint, "cpu")
    size = trained.config.data.image_size
    graph = InferenceGraph(trained.model, Scorer.of(trained.config, trained.calibration)).eval()
    proto = onnx.load_model_from_string(_trace(graph, size, opset))
    _declare_map_size(proto, size)
    onnx.helper.set_model_props(
        proto,
        {
            "class_names": json.dumps(list(trained.class_names)),
            "image_size": str(size),
            "normalisation": json.dumps({"mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
            "checkpoint": Path(checkpoint).name,
        },
    )
    onnx.checker.check_model(proto, full_check=True)  # full: with ONNX shape inference
    out = Path(out)
    write_bytes(out, proto.SerializeToString())  # temp file beside `out`, then renamed
    log.info("wrote %s (%.1f MB, opset %d)", out, out.stat().st_size / 1e6, opset)
    return out


def _trace(graph: InferenceGraph, size: int, opset: int) -> bytes:
    """The serialised ONNX model of `graph`, traced on a zero batch of S x S images."""
    example = (
        torch.zeros(_EXAMPLE_BATCH, 3, size, size),  # image (B, 3, S, S)
        torch.zeros(_EXAMPLE_BATCH, dtype=torch.int64),  # class_id (B,)
    )
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Expected and harmless here: the model's input checks (shapes, class range) run once
        # while tracing and stay out of the graph (onnxruntime itself refuses a class_id out of
        # range); the blur kernel is a constant; the memory indexes with classes made >= 0 first;
        # reflect padding reverses a slice, which only skips a constant-folding optimisation.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
        torch.onnx.export(
            graph,
            example,
            buffer,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)},
            opset_version=opset,
            dynamo=False,
        )
    return buffer.getvalue()


def _declare_map_size(proto: onnx.ModelProto, size: int) -> None:
    """State the anomaly map's fixed S x S in the graph's output type.

    The exporter loses them at the sum of the fused maps and names them symbolically, although
    the maps are upsampled to the fixed input size; consumers should see the real output type.
    """
    (output,) = (o for o in proto.graph.output if o.name == "anomaly_map")
    for dim in output.type.tensor_type.shape.dim[1:]:
        dim.dim_value = size  # replaces the symbolic name (dim_param and dim_value are a oneof)
