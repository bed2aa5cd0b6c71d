"""Export a model and its losses to an ONNX artifact that verifies itself before it lands.

The model and each training step are exported with torch.onnx (dynamo) alone, the losses in
one call and split apart; a model+loss graph is composed from the model's and its loss's graphs
with `onnx.compose` instead of being traced again. Every graph is checked with `onnx.checker`
(full check), run in ONNX Runtime on fresh inputs of other sizes and compared with eager
PyTorch by the comparator (lossx.compare). The artifact is written to a temporary sibling
directory and renamed into place only when all of that passed.
"""

import json
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from lossx.build.artifact_writer import WEIGHTS_FILE, weights_record, write_artifact
from lossx.build.backward import check_trainable, frozen_batch_norms, model_buffers
from lossx.build.calibration import Calibration, load_calibration
from lossx.build.graph_export import export_graph
from lossx.build.models import (
    build_model,
    model_contract,
    model_source,
    recorded_contract,
    source_record,
)
from lossx.build.preflight import DEFAULT_OPSET, MIN_OPSET, check_export_request
from lossx.build.torch_onnx import max_opset
from lossx.errors import ArtifactError, SpecError
from lossx.files import sole_writer, write_folder_atomically
from lossx.runtime.contract import ImageContract
from lossx.runtime.graphs import (
    DEFAULT_MODEL,
    GraphSpec,
    artifact_graphs,
    check_loss_classes,
    loss_graph,
    model_graph,
)
from lossx.runtime.loss_specs import DEFAULT_LOSSES, LossSpec, parse_loss_spec
from lossx.runtime.manifest import Manifest
from lossx.runtime.precisions import PRECISIONS
from lossx.training.recipe import frozen_parameters

# protobuf serialises no message over 2 GiB, and an artifact's graphs hold their weights inside
# (external data would lie outside what the manifest's sha256s cover); the rest of a graph
# (its nodes, shapes and metadata) needs well under the 64 MiB kept free here.
MAX_WEIGHT_BYTES = 2**31 - 2**26


def check_size(model: nn.Module) -> None:
    """Refuse, before any export, a model whose weights cannot fit in one ONNX file."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size > MAX_WEIGHT_BYTES:
        count = sum(p.numel() for p in model.parameters())
        raise SpecError(
            f"the model's weights take {size / 2**30:.2f} GiB ({count:,} parameters); an ONNX "
            f"file holds at most 2 GiB and lossx keeps every weight inside its graphs, so "
            f"{MAX_WEIGHT_BYTES / 2**30:.2f} GiB is the limit"
        )


def check_opset(opset: int) -> None:
    """Refuse an opset that torch.onnx, onnx or ONNX Runtime cannot use (every loss works from
    MIN_OPSET on)."""
    newest = max_opset()
    if not MIN_OPSET <= opset <= newest:
        raise SpecError(
            f"opset {opset} is not supported; choose {MIN_OPSET}..{newest} (the newest that the "
            "installed torch.onnx, onnx and onnxruntime all support)"
        )


def export_loss(
    loss: LossSpec | str, path: Path, opset: int = DEFAULT_OPSET, extra_dims: int = 0
) -> GraphSpec:
    """Export one loss graph to `path`, for inputs of rank 2 + `extra_dims` (e.g. 2 for
    [N, C, H, W] segmentation logits), verified against torch.nn like an artifact's graphs."""
    spec = loss_graph(parse_loss_spec(loss) if isinstance(loss, str) else loss, extra_dims)
    check_opset(opset)
    metadata = {"lossx.graph": str(spec.kind), "lossx.loss": json.dumps(spec.loss.to_dict())}
    export_graph(spec, nn.Identity(), Path(path), opset, metadata)
    return spec


def export_artifact(
    out_dir: Path,
    model_name: str = DEFAULT_MODEL,
    model: nn.Module | None = None,
    losses: list[LossSpec | str] | tuple[LossSpec | str, ...] = DEFAULT_LOSSES,
    checkpoint: Path | None = None,
    seed: int = 0,
    opset: int = DEFAULT_OPSET,
    init: str = "trained",
    progress: Callable[[str], None] | None = None,
    train: bool = False,
    input_grad: bool = False,
    precision: str = "fp32",
    calibration: Calibration | None = None,
    model_args: dict[str, object] | None = None,
    input_shape: tuple[int, int, int] | None = None,
    class_names: tuple[str, ...] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    resize: str | None = None,
    trainable: tuple[str, ...] | None = None,
    frozen: tuple[str, ...] | None = None,
    frozen_bn: str = "eval",
) -> Manifest:
    """Export the model, each loss alone and each model+loss pair into `out_dir`; with
    `train`, also a training graph per loss (loss, logits and every parameter's gradient,
    plus the images' gradient with `input_grad`), of the parameters a `trainable` glob
    matches, or all but the ones a `frozen` glob matches (state_dict names, shell globs); batch
    norms whose parameters are all frozen run in eval mode unless `frozen_bn` is "train".

    The model is `model_name` (a registry name or a `MODULE:ATTR` import path) constructed with
    keyword `model_args`, or `model`, an nn.Module instance (recorded as its class's import
    path). The weights come from
    `checkpoint` if given, else from an instance's own weights, else from the trained weights
    lossx ships (`init="trained"`) or from `seed` (`init="random"`).

    `precision` int8 or fp16 converts the model and fused graphs after their fp32 self-check
    (lossx.build.precision); int8 calibrates on `calibration` (default: the packaged training
    images).

    The image contract (lossx.runtime.contract) is `input_shape` (C,H,W), the model's class
    count named by `class_names`, normalised by `mean` and `std`, files fitted by `resize`;
    what is not given comes from a training checkpoint's recipe, else the defaults (CIFAR-10's
    3x32x32 images, its class names for 10 classes, no normalisation, stretched files).

    The artifact is written to a hidden sibling directory and renamed into place only after every
    graph passed its self-check; on any failure `out_dir` is left as it was.
    """
    trains = {"trainable": trainable, "frozen": frozen, "frozen_bn": frozen_bn}
    out_dir, specs = check_export_request(
        out_dir,
        losses,
        checkpoint,
        seed,
        train,
        input_grad,
        precision,
        calibration is not None,
        trains,
    )
    check_opset(opset)
    if PRECISIONS[precision].calibrated and calibration is None:
        calibration = load_calibration()
    if model is not None and model_args:
        raise SpecError("model_args construct a model by name; an instance is already built")
    model_args = dict(model_args or {})
    model, model_name, source, given = _model_to_export(
        model, model_name, seed, checkpoint, model_args
    )
    check_size(model)
    if given:
        weights = {"file": WEIGHTS_FILE, "source": "model"}  # the instance's own weights
    else:
        weights = weights_record(model, model_name, init, checkpoint, seed)
    given_contract = {"input_shape": input_shape, "class_names": class_names, "mean": mean,
                      "std": std, "resize": resize}  # fmt: skip
    recorded = recorded_contract(weights.get("recipe"), given_contract)
    contract = model_contract(model, model_name, **recorded)
    check_loss_classes(specs, contract.num_classes)
    if calibration is not None:
        calibration = calibration.for_contract(contract)
    graphs = _graphs_of(model, specs, train, input_grad, contract, trains)
    with sole_writer(out_dir, ArtifactError):
        return write_folder_atomically(
            out_dir,
            lambda staged: write_artifact(
                staged,
                model,
                model_name,
                source,
                model_args,
                specs,
                graphs,
                weights,
                opset,
                progress,
                contract,
                precision,
                calibration,
            ),
            ArtifactError,
        )


def _model_to_export(
    model: nn.Module | None, model_name: str, seed: int, checkpoint: Path | None, args: dict
) -> tuple[nn.Module, str, dict | None, bool]:
    """The model in eval mode, its name and source record, and whether its own weights are
    the ones to export (an instance given without a checkpoint)."""
    if model is None:
        built = build_model(model_name, seed, args)
        return built, model_name, model_source(model_name), False
    if not isinstance(model, nn.Module):
        raise SpecError(f"model: expected an nn.Module instance, got {type(model).__name__}")
    model_name = f"{type(model).__module__}:{type(model).__qualname__}"
    source = source_record(model_name, sys.modules.get(type(model).__module__))
    return model.eval(), model_name, source, checkpoint is None


def _graphs_of(
    model: nn.Module,
    specs: list[LossSpec],
    train: bool,
    input_grad: bool,
    contract: ImageContract,
    trains: dict,
) -> list[GraphSpec]:
    """Every graph the artifact holds, on images and classes of `contract`; with `train`, each
    loss's training graph, whose parameters and buffers are the model's, training those
    `trains` (trainable, frozen, frozen_bn) chooses."""
    model_spec = model_graph(contract.shape, contract.num_classes)
    if not train:
        return artifact_graphs(specs, model_spec)
    for spec in specs:
        check_trainable(model, spec)
    parameters = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    frozen = frozen_parameters([n for n, _ in parameters], trains["trainable"], trains["frozen"])
    eval_modules = frozen_batch_norms(model, frozen, trains["frozen_bn"])
    buffers = model_buffers(model, contract.shape, eval_modules)
    return artifact_graphs(specs, model_spec, parameters, input_grad, buffers, frozen)
