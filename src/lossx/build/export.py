"""Export a model and its losses to an ONNX artifact that verifies itself before it lands.

Every graph is exported with torch.onnx (dynamo), checked with `onnx.checker` (full check), run
in ONNX Runtime on fresh inputs of other sizes and compared with eager PyTorch. The artifact is
written to a temporary sibling directory and renamed into place only when all of that passed.
"""

import contextlib
import functools
import io
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime
import onnxscript
import torch
from torch import nn

import lossx
from lossx.build.models import build_model, load_checkpoint, packaged_weights, weights_to_arrays
from lossx.build.modules import exported_module, reference_module
from lossx.build.train import CHECKPOINT_FORMAT as TRAIN_CHECKPOINT_FORMAT
from lossx.build.training import check_trainable
from lossx.errors import ArtifactError, ExportError, ParityError, SpecError, first_line
from lossx.files import current_umask
from lossx.parity.compare import DEFAULT_ATOL, DEFAULT_RTOL, compare
from lossx.parity.report import Tolerance, output_tolerance
from lossx.runtime.artifact import (
    MANIFEST_FILE,
    GraphEntry,
    Manifest,
    check_signature,
    load_artifact,
    sha256_of,
)
from lossx.runtime.cifar10 import CLASS_NAMES
from lossx.runtime.graphs import (
    CLASS_DIM_LOSSES,
    DEFAULT_OPSET,
    MIN_OPSET,
    NUM_CLASSES,
    GraphSpec,
    TensorSpec,
    artifact_graphs,
    loss_graph,
)
from lossx.runtime.losses import LossSpec, parse_loss_spec
from lossx.runtime.preprocessing import PREPROCESSING
from lossx.runtime.session import open_session
from lossx.runtime.train import CHECKPOINT_FORMAT as ORT_CHECKPOINT_FORMAT

WEIGHTS_FILE = "weights.npz"
INITS = ("trained", "random")

# Sizes of the symbolic dims: the export example, then the self-check's fresh inputs
# (batch 1, an odd batch, and other class/feature counts than the example).
# (d1.. are the extra dims of loss graphs exported with extra_dims > 0.)
EXAMPLE_SIZES = {"N": 4, "C": NUM_CLASSES, "D": NUM_CLASSES, "d1": 3, "d2": 5, "d3": 2}
CHECK_SIZES = (
    {"N": 1, "C": 10, "D": 10, "d1": 1, "d2": 1, "d3": 1},
    {"N": 7, "C": 5, "D": 3, "d1": 2, "d2": 3, "d3": 4},
    {"N": 64, "C": 13, "D": 21, "d1": 3, "d2": 1, "d3": 2},
)


EXPORTER_MIN_OPSET = 18  # torch.onnx (dynamo) writes 18 and newer; older ones are converted


@functools.cache
def max_opset() -> int:
    """The newest opset that torch.onnx writes, onnx checks and ONNX Runtime loads here."""
    return min(torch.onnx._constants.ONNX_MAX_OPSET, onnx.defs.onnx_opset_version(), _ort_opset())


def _ort_opset() -> int:
    """The newest default-domain opset ONNX Runtime loads, probed with a one-node graph."""
    newest = MIN_OPSET
    for opset in range(MIN_OPSET, onnx.defs.onnx_opset_version() + 1):
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
        # The IR version that goes with the opset: onnx's newest IR may be newer than ORT's.
        model = onnx.helper.make_model_gen_version(
            graph, opset_imports=[onnx.helper.make_opsetid("", opset)]
        )
        try:
            onnxruntime.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        except Exception:
            break
        newest = opset
    return newest


def sample_inputs(
    spec: GraphSpec,
    sizes: dict[str, int],
    seed: int,
    scale: float = 1.0,
    ignore_fraction: float = 0.25,
    parameters: dict[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Random inputs for `spec`, with the values each input means, each a distinct tensor (an
    aliased pair exports wrongly). Real values and scores are standard normal times `scale`;
    class indices are ignore_index with probability `ignore_fraction`; unit targets include
    exact 0 and 1; a training graph's parameters are `parameters` (a model's weights) or small
    random values."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape: list[int]) -> torch.Tensor:
        return torch.rand(shape, generator=generator)

    tensors = []
    for tensor in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in tensor.shape]
        if tensor.values == "parameter":
            if parameters is not None:
                tensors.append(parameters[tensor.name].detach().clone())
            else:
                tensors.append(torch.randn(shape, generator=generator) * 0.05)
        elif tensor.values == "class_index":
            labels = torch.randint(0, _class_count(spec, sizes), shape, generator=generator)
            ignored = uniform(shape) < ignore_fraction
            tensors.append(torch.where(ignored, spec.loss["ignore_index"], labels))
        elif tensor.values == "image":
            tensors.append(uniform(shape))
        elif tensor.values == "unit":
            values, pick = uniform(shape), uniform(shape)
            tensors.append(torch.where(pick < 0.1, 0.0, torch.where(pick > 0.9, 1.0, values)))
        elif tensor.values in ("probabilities", "log_probabilities"):
            scores = torch.randn(shape, generator=generator) * scale
            normalise = torch.softmax if tensor.values == "probabilities" else torch.log_softmax
            tensors.append(normalise(scores, 1))
        else:
            tensors.append(torch.randn(shape, generator=generator) * scale)
    return tensors


def _class_count(spec: GraphSpec, sizes: dict[str, int]) -> int:
    if spec.kind in ("fused", "train"):
        return NUM_CLASSES
    classes = spec.inputs[0].shape[1]
    return classes if isinstance(classes, int) else sizes[classes]


def _symbols(spec: GraphSpec) -> set[str]:
    return {d for t in spec.inputs for d in t.shape if isinstance(d, str)}


def _dynamic_shapes(spec: GraphSpec) -> tuple:
    dims = {name: torch.export.Dim(name, min=1) for name in sorted(_symbols(spec))}
    shapes = tuple(
        {axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs
    )
    if spec.kind == "train":  # forward(images, target, *parameters): the parameters are one arg
        return (*shapes[:2], shapes[2:])
    return shapes


def _conform_signature(proto: onnx.ModelProto, spec: GraphSpec) -> None:
    """Check the exported graph's I/O against `spec` and name its dynamic dims as `spec` does."""
    for actual, declared in (
        *zip(proto.graph.input, spec.inputs, strict=True),
        *zip(proto.graph.output, spec.outputs, strict=True),
    ):
        dims = actual.type.tensor_type.shape.dim
        if actual.name != declared.name or len(dims) != len(declared.shape):
            raise ExportError(
                f"{spec.file}: exported {actual.name} of rank {len(dims)}, expected "
                f"{declared.name} of rank {len(declared.shape)}"
            )
        for dim, want in zip(dims, declared.shape, strict=True):
            if isinstance(want, str):
                if dim.HasField("dim_value"):
                    raise ExportError(
                        f"{spec.file}: {declared.name} dim {want} was fixed to {dim.dim_value}"
                    )
                dim.dim_param = want
            elif dim.dim_value != want:
                raise ExportError(f"{spec.file}: {declared.name} has a dim {dim} != {want}")


def _export_graph(
    spec: GraphSpec, module: nn.Module, path: Path, opset: int, metadata: dict[str, str]
) -> onnx.ModelProto:
    example = tuple(sample_inputs(spec, EXAMPLE_SIZES, seed=0))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                example,
                input_names=spec.input_names,
                output_names=spec.output_names,
                opset_version=max(opset, EXPORTER_MIN_OPSET),
                dynamic_shapes=_dynamic_shapes(spec),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as e:
        raise ExportError(f"{spec.file}: torch.onnx.export failed: {first_line(e)}") from None
    proto = _at_opset(program.model_proto, opset, spec)
    _conform_signature(proto, spec)
    proto.producer_name = "lossx"
    proto.producer_version = lossx.__version__
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save_model(proto, path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{spec.file}: onnx.checker rejected it: {first_line(e)}") from None
    return proto


def _at_opset(proto: onnx.ModelProto, opset: int, spec: GraphSpec) -> onnx.ModelProto:
    """`proto` at exactly `opset`, converted down by onnx's version converter if need be
    (torch.onnx's own down-conversion fails on some graphs and then keeps opset 18 silently)."""
    if _default_opset(proto) != opset:
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception as e:
            raise ExportError(
                f"{spec.file}: cannot convert the graph to opset {opset}: {first_line(e)}"
            ) from None
    if _default_opset(proto) != opset:
        raise ExportError(f"{spec.file}: exported at opset {_default_opset(proto)}, not {opset}")
    if opset < 18:
        _drop_noop_with_empty_axes(proto, spec)
    return proto


def _drop_noop_with_empty_axes(proto: onnx.ModelProto, spec: GraphSpec) -> None:
    """onnx's converter leaves opset 18's `noop_with_empty_axes` on the reductions it moves to
    opset 17, where only ReduceSum has it; at its default 0 dropping it changes nothing."""
    for node in proto.graph.node:
        if not node.op_type.startswith("Reduce") or node.op_type == "ReduceSum":
            continue
        for attribute in list(node.attribute):
            if attribute.name == "noop_with_empty_axes":
                if attribute.i != 0:
                    raise ExportError(f"{spec.file}: {node.op_type} has no opset 17 equivalent")
                node.attribute.remove(attribute)


def _default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def verify_graph(
    spec: GraphSpec,
    module: nn.Module,
    path: Path,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    parameters: dict[str, torch.Tensor] | None = None,
) -> None:
    """Run the graph in ONNX Runtime on fresh inputs and compare with eager `module` (a
    training graph gets `parameters`, the model's weights, as its parameter inputs).

    Raises ParityError naming the graph, the output, the batch size and the error.
    """
    session = open_session(path, "cpu")
    check_signature(session, spec)
    for index, sizes in enumerate(CHECK_SIZES):
        inputs = sample_inputs(spec, sizes, seed=1 + index, parameters=parameters)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. KLDivLoss's note on reduction="mean"
            eager = module(*inputs)
        eager = eager if isinstance(eager, tuple) else (eager,)
        feed = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)}
        onnx_outputs = session.run(spec.output_names, feed)
        for name, got, want in zip(spec.output_names, onnx_outputs, eager, strict=True):
            tolerance = output_tolerance(name, Tolerance(atol, rtol))  # gradients: see its note
            output_atol = tolerance.atol_for(want.double().numpy())
            result = compare(spec.stem, name, got, want.numpy(), output_atol, tolerance.rtol)
            if result.mismatches > int(tolerance.max_mismatch_fraction * want.numel()):
                raise ParityError(
                    f"export self-check failed: {spec.file} output {name!r} at batch "
                    f"{sizes['N']}: max abs error {result.max_abs_error:.3g} "
                    f"exceeds atol {output_atol:g} + rtol {tolerance.rtol:g}"
                )


def _tensor_facts(tensors: tuple[TensorSpec, ...]) -> str:
    return json.dumps([t.to_dict() for t in tensors])


def _producer_versions() -> dict[str, str]:
    return {
        "lossx": lossx.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def _prepare_destination(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ArtifactError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
            raise ArtifactError(
                f"{out_dir} exists and is not a lossx artifact; refusing to overwrite it"
            )
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create {out_dir.parent}: {e.strerror}") from None


def _move_into_place(staged: Path, out_dir: Path) -> None:
    """Replace `out_dir` with `staged`; a previous artifact survives any failure."""
    if not out_dir.exists():
        staged.rename(out_dir)
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    previous.rmdir()
    out_dir.rename(previous)
    try:
        staged.rename(out_dir)
    except OSError:
        previous.rename(out_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _load_weights(
    model: nn.Module, model_name: str, init: str, checkpoint: Path | None, seed: int
) -> dict:
    """Load the weights the export asks for; return the manifest's account of them."""
    if init not in INITS:
        raise SpecError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if checkpoint is None and init == "random":
        return {"file": WEIGHTS_FILE, "source": "seed", "seed": seed}
    source = "checkpoint" if checkpoint is not None else "packaged"
    path = Path(checkpoint) if checkpoint is not None else packaged_weights(model_name)
    payload = load_checkpoint(model, path)
    weights = {
        "file": WEIGHTS_FILE,
        "source": source,
        "checkpoint": path.name,
        "checkpoint_sha256": sha256_of(path),
    }
    engines = {TRAIN_CHECKPOINT_FORMAT: "torch", ORT_CHECKPOINT_FORMAT: "onnxruntime"}
    if isinstance(payload, dict) and payload.get("format") in engines:
        history = payload.get("history") or [{}]
        weights["recipe"] = payload.get("config")
        weights["trained"] = {
            "engine": engines[payload["format"]],
            "epochs": history[-1].get("epoch"),
            "seconds": round(sum(e.get("seconds", 0.0) for e in history), 1),
            "final_eval": {k: history[-1].get(k) for k in ("eval_split", "eval_accuracy")},
        }
        if payload.get("torch"):
            weights["trained"]["torch"] = payload["torch"]
    return weights


def resolve_losses(losses: list[LossSpec | str] | tuple[LossSpec | str, ...]) -> list[LossSpec]:
    """Loss specs for an artifact: parsed, each loss at most once, weights sized for the model."""
    specs = [parse_loss_spec(s) if isinstance(s, str) else s for s in losses]
    if not specs:
        raise SpecError("no losses given")
    names = [spec.name for spec in specs]
    for name in names:
        if names.count(name) > 1:
            raise SpecError(f"loss {name} given twice; an artifact holds one spec per loss")
    for spec in specs:
        length = spec.class_weight_length
        if length is not None and length != NUM_CLASSES:
            dim = "classes" if spec.name in CLASS_DIM_LOSSES else "logits per image"
            raise SpecError(f"{spec}: weights for {length} {dim}; the model has {NUM_CLASSES}")
    return specs


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
    metadata = {"lossx.graph": spec.kind, "lossx.loss": json.dumps(spec.loss.to_dict())}
    export_graph(spec, nn.Identity(), Path(path), opset, metadata)
    return spec


def export_graph(
    spec: GraphSpec,
    model: nn.Module,
    path: Path,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Export graph `spec` (of `model` for model and fused graphs) to `path`, checked with
    onnx.checker and verified in ONNX Runtime against the torch.nn reference."""
    proto = _export_graph(spec, exported_module(spec, model), path, opset, metadata or {})
    parameters = dict(model.named_parameters()) if spec.kind == "train" else None
    verify_graph(spec, reference_module(spec, model), path, parameters=parameters)
    return proto


def export_artifact(
    out_dir: Path,
    model_name: str = "tudui",
    losses: list[LossSpec | str] | tuple[LossSpec | str, ...] = ("ce", "mse", "l1"),
    checkpoint: Path | None = None,
    seed: int = 0,
    opset: int = DEFAULT_OPSET,
    init: str = "trained",
    progress: Callable[[str], None] | None = None,
    train: bool = False,
    input_grad: bool = False,
) -> Manifest:
    """Export the model, each loss alone and each model+loss pair into `out_dir`; with
    `train`, also a training graph per loss (loss, logits and every parameter's gradient,
    plus the images' gradient with `input_grad`).

    The weights come from `checkpoint` if given, else from the trained weights lossx ships
    (`init="trained"`) or from `seed` (`init="random"`).

    The artifact is written to a hidden sibling directory and renamed into place only after every
    graph passed its self-check; on any failure `out_dir` is left as it was.
    """
    specs = resolve_losses(losses)
    check_opset(opset)
    if input_grad and not train:
        raise SpecError("--input-grad adds grad.images to training graphs; it needs --train")
    out_dir = Path(out_dir)
    model = build_model(model_name, seed)
    parameters = None
    if train:
        for spec in specs:
            check_trainable(model, spec)
        parameters = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    graphs = artifact_graphs(specs, parameters, input_grad)
    weights = _load_weights(model, model_name, init, checkpoint, seed)
    _prepare_destination(out_dir)
    staged = None
    try:
        staged = Path(
            tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent)
        )
        staged.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; artifacts are not
        manifest = _write_artifact(
            staged, model, model_name, specs, graphs, weights, opset, progress
        )
        _move_into_place(staged, out_dir)
    except OSError as e:  # disk full, permissions: nothing half-written stays behind
        raise ArtifactError(f"cannot write the artifact to {out_dir}: {e.strerror or e}") from None
    finally:
        if staged is not None and staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return manifest


def _write_artifact(
    staged: Path,
    model: nn.Module,
    model_name: str,
    losses: list[LossSpec],
    graphs: list[GraphSpec],
    weights: dict,
    opset: int,
    progress: Callable[[str], None] | None,
) -> Manifest:
    producer = _producer_versions()
    common = {
        "lossx.model": model_name,
        "lossx.class_names": json.dumps(CLASS_NAMES),
        "lossx.preprocessing": json.dumps(PREPROCESSING),
        "lossx.weights": json.dumps(weights),
        **{f"producer.{k}": v for k, v in producer.items()},
    }
    entries = []
    for spec in graphs:
        if progress:
            progress(spec.file)
        metadata = {
            **common,
            "lossx.graph": spec.kind,
            "lossx.inputs": _tensor_facts(spec.inputs),
            "lossx.outputs": _tensor_facts(spec.outputs),
        }
        if spec.loss:
            metadata["lossx.loss"] = json.dumps(spec.loss.to_dict())
        proto = export_graph(spec, model, staged / spec.file, opset, metadata)
        entries.append(GraphEntry(spec, opset, proto.ir_version))
    np.savez(staged / WEIGHTS_FILE, **weights_to_arrays(model))
    files = sorted([e.spec.file for e in entries] + [WEIGHTS_FILE])
    manifest = Manifest(
        model=model_name,
        opset=opset,
        class_names=CLASS_NAMES,
        preprocessing=PREPROCESSING,
        losses=tuple(losses),
        weights=weights,
        graphs=tuple(entries),
        files={
            name: {"sha256": sha256_of(staged / name), "bytes": (staged / name).stat().st_size}
            for name in files
        },
        producer=producer,
    )
    (staged / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    load_artifact(staged)  # the runtime must accept exactly what was written
    return manifest
