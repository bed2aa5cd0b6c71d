"""Export a model and its losses to an ONNX artifact that verifies itself before it lands.

The model and each training step are exported with torch.onnx (dynamo) alone, the losses in
one call and split apart; a model+loss graph is composed from the model's and its loss's graphs
with `onnx.compose` instead of being traced again. Every graph is checked with `onnx.checker`
(full check), run in ONNX Runtime on fresh inputs of other sizes and compared with eager
PyTorch by the parity engine (lossx.compare). The artifact is written to a temporary sibling
directory and renamed into place only when all of that passed.
"""

import contextlib
import functools
import io
import json
import logging
import re
import sys
import unittest.mock
import warnings
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import onnx
import onnx.compose
import onnx.utils
import onnx.version_converter
import onnx_ir
import onnx_ir.passes.common
import onnxruntime
import onnxscript
import onnxscript.rewriter
import torch
from torch import nn

import lossx
from lossx.build.backward import INFERENCE_MODE_OPS, check_trainable, model_buffers
from lossx.build.eager import EagerRunner
from lossx.build.graph_modules import Together, exported_module
from lossx.build.models import (
    build_model,
    check_model,
    load_checkpoint,
    model_source,
    packaged_weights,
    source_record,
    user_code_at,
    weights_to_arrays,
)
from lossx.build.precision import (
    lower_model,
    precision_record,
    splice_model,
)
from lossx.build.preflight import check_export_request
from lossx.build.torch_engine import CHECKPOINT_FORMAT as TORCH_CHECKPOINT_FORMAT
from lossx.compare.engine import compare_runners
from lossx.compare.inputs import EXAMPLE_SIZES, random_input_sets, real_input_sets, sample_feed
from lossx.compare.runners import OnnxRuntimeRunner
from lossx.compare.tolerances import DEFAULT_PROFILE, resolve_tolerances
from lossx.errors import ArtifactError, ExportError, ModelError, SpecError, first_line
from lossx.files import sole_writer, write_folder_atomically
from lossx.runtime.artifact import MANIFEST_FILE, GraphEntry, Manifest, load_artifact, sha256_of
from lossx.runtime.calibration import Calibration, load_calibration
from lossx.runtime.cifar10 import CLASS_NAMES, Cifar10Split, load_packaged_sample
from lossx.runtime.graphs import (
    DEFAULT_MODEL,
    DEFAULT_OPSET,
    MIN_OPSET,
    GraphKind,
    GraphSpec,
    TensorSpec,
    artifact_graphs,
    loss_graph,
    model_graph,
)
from lossx.runtime.loss_specs import DEFAULT_LOSSES, LossSpec, parse_loss_spec
from lossx.runtime.preprocessing import PREPROCESSING
from lossx.training.checkpoints import CHECKPOINT_FORMAT as ORT_CHECKPOINT_FORMAT

WEIGHTS_FILE = "weights.npz"
INITS = ("trained", "random")

SELF_CHECK_IMAGES = 64  # real images every graph that runs the model is first checked on
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


def _symbols(spec: GraphSpec) -> set[str]:
    return {d for t in spec.inputs for d in t.shape if isinstance(d, str)}


def _dynamic_shapes(spec: GraphSpec) -> tuple:
    dims = {name: torch.export.Dim(name, min=1) for name in sorted(_symbols(spec))}
    shapes = tuple(
        {axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs
    )
    state = len(spec.parameter_names) + len(spec.buffer_names)
    if not state:
        return shapes
    leading = len(spec.inputs) - state  # forward(images, target, *parameters, *buffers)
    return (*shapes[:leading], shapes[leading:])


def batch_norm_fusions() -> tuple:
    """The rules of torch.onnx's optimizer (onnxscript's rewriter) that fold batch norms into
    the Conv or Gemm before them: they keep the Conv's weight under its state_dict name but
    change it, and drop the batch-norm parameters."""
    return tuple(
        rule
        for rule in onnxscript.rewriter._DEFAULT_REWRITE_RULES
        if str(getattr(rule, "name", "")).startswith("FuseBatchNormInto")
    )


class _KeepInitializers(onnx_ir.passes.InPlacePass):
    """Instead of DeduplicateInitializersPass, which merges equal weights (a fresh model's
    batch-norm scales are all ones) under one name."""

    def call(self, model: onnx_ir.Model) -> onnx_ir.passes.PassResult:
        return onnx_ir.passes.PassResult(model, modified=False)


@contextlib.contextmanager
def _weights_kept_by_name():
    """torch.onnx's optimizer, less what would change or merge weights: every state_dict entry
    a graph reads stays an initializer of its own, with its own values, so that other weights
    (a training run's) can replace them by name. Both are private to onnxscript and onnx_ir
    (pinned in pyproject.toml; tests/build/test_backward.py checks they are still there)."""
    fusions = batch_norm_fusions()
    kept = tuple(r for r in onnxscript.rewriter._DEFAULT_REWRITE_RULES if r not in fusions)
    with (
        unittest.mock.patch.object(onnxscript.rewriter, "_DEFAULT_REWRITE_RULES", kept),
        unittest.mock.patch.object(
            onnx_ir.passes.common,
            "DeduplicateInitializersPass",
            lambda *_, **__: _KeepInitializers(),
        ),
    ):
        yield


_torchlib_registries = {}  # torch.onnx's ATen-to-ONNX tables by the arguments they were built for


@contextlib.contextmanager
def _torchlib_registry_built_once():
    """torch.onnx.export with its table of ATen-to-ONNX functions built once per opset and
    process: every call builds it anew (about 0.5 s, more than a loss graph's whole export),
    and an export only reads it. The table is private to torch.onnx (pinned in pyproject.toml;
    tests/build/test_export.py checks it is still there)."""
    from torch.onnx._internal.exporter import _registration

    build = _registration.ONNXRegistry.from_torchlib

    def built_once(_, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _torchlib_registries:
            _torchlib_registries[key] = build(*args, **kwargs)
        return _torchlib_registries[key]

    with unittest.mock.patch.object(
        _registration.ONNXRegistry, "from_torchlib", classmethod(built_once)
    ):
        yield


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


def _torch_onnx_export(
    file: str,
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple,
    opset: int,
) -> onnx.ModelProto:
    """`module` exported by torch.onnx (dynamo); ExportError naming `file` where it fails, or
    ModelError where the model's own code cannot become a graph (it branches on values). What
    torch prints and logs meanwhile (graphs of dozens of lines on a failure) is kept out of
    lossx's output."""
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            _logging_off(),
            _weights_kept_by_name(),
            _torchlib_registry_built_once(),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                example,
                input_names=input_names,
                output_names=output_names,
                opset_version=max(opset, EXPORTER_MIN_OPSET),
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as e:
        if _branches_on_values(e):
            where = user_code_at(e, module) or "its forward"
            raise ModelError(
                f"{file}: the model branches on a tensor's values at {where}; an ONNX graph "
                "runs the same ops for every input, so compute both results and pick with "
                "torch.where (or use torch.cond)"
            ) from None
        raise ExportError(f"{file}: torch.onnx.export failed: {first_line(e)}") from None
    return program.model_proto


def _branches_on_values(error: BaseException) -> bool:
    """Whether torch.export failed because Python control flow depends on a tensor's values."""
    while error is not None:
        if type(error).__name__ == "GuardOnDataDependentSymNode" or "data-dependent" in str(error):
            return True
        error = error.__cause__
    return False


@contextlib.contextmanager
def _logging_off():
    """Python logging off while the block runs (torch.export warns and dumps graphs there)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _exported_proto(spec: GraphSpec, module: nn.Module, opset: int) -> onnx.ModelProto:
    """Graph `spec` exported from `module` by torch.onnx (dynamo) at `opset`, its inputs and
    outputs checked against the spec."""
    example = tuple(torch.from_numpy(x) for x in sample_feed(spec, EXAMPLE_SIZES, 0).values())
    proto = _torch_onnx_export(
        spec.file,
        module,
        example,
        spec.input_names,
        spec.output_names,
        _dynamic_shapes(spec),
        opset,
    )
    return _conformed(proto, spec, opset)


def _conformed(proto: onnx.ModelProto, spec: GraphSpec, opset: int) -> onnx.ModelProto:
    """Exported graph `proto` at `opset`, its inputs and outputs checked against `spec`."""
    proto = _at_opset(proto, opset, spec)
    if spec.kind is GraphKind.TRAIN:
        _check_training_ops(proto, spec)
    _conform_signature(proto, spec)
    return proto


def _exported_together(
    specs: list[GraphSpec], model: nn.Module, opset: int
) -> dict[GraphSpec, onnx.ModelProto]:
    """Graphs `specs` (loss graphs) exported in one torch.onnx.export call, then split apart,
    their values named as their own exports name them: torch.onnx's cost per call (tracing and
    decompositions, 0.3 to 0.4 s here) is paid once. A graph missing from the result (all of them
    where that export fails) is then exported alone, so that an error names its own graph.

    Their nodes' metadata keeps torch.onnx's record of where they were traced (module paths
    under `parts.<stem>`, graph_modules.Together), which is why the model, whose module paths
    the layer-by-layer diagnosis reads, is exported alone."""
    example, input_names, shapes, output_names, symbols = [], [], [], [], {}
    for spec in specs:
        # each graph its own dynamic dims, so that no graph's shapes are read off another's
        symbols[spec] = {f"{spec.stem}_{d}": d for d in sorted(_symbols(spec))}
        dims = {d: torch.export.Dim(name, min=1) for name, d in symbols[spec].items()}
        feed = sample_feed(spec, EXAMPLE_SIZES, 0)
        for tensor in spec.inputs:
            example.append(torch.from_numpy(feed[tensor.name]))
            input_names.append(f"{spec.stem}.{tensor.name}")
            shapes.append({i: dims[d] for i, d in enumerate(tensor.shape) if isinstance(d, str)})
        output_names += [f"{spec.stem}.{name}" for name in spec.output_names]
    module = Together(
        {spec.stem: exported_module(spec, model) for spec in specs}, [len(s.inputs) for s in specs]
    )
    try:
        proto = _torch_onnx_export(
            "+".join(spec.file for spec in specs),
            module,
            tuple(example),
            input_names,
            output_names,
            (tuple(shapes),),  # forward(*inputs)
            opset,
        )
    except ExportError:
        return {}
    exported = {}
    for spec in specs:
        with contextlib.suppress(ExportError):  # if so, exported alone, which names what fails
            exported[spec] = _conformed(_part_of(proto, spec, symbols[spec]), spec, opset)
    return exported


def _part_of(
    together: onnx.ModelProto, spec: GraphSpec, symbols: dict[str, str]
) -> onnx.ModelProto:
    """Graph `spec`'s part of graphs exported together: the nodes its outputs depend on with
    their initializers and value infos, its values and dynamic dims (`symbols`) named as its
    own export names them; ExportError where that renaming would clash with another name."""
    prefix, weights = f"{spec.stem}.", f"{Together.PARTS}.{spec.stem}."
    extracted = onnx.utils.Extractor(together).extract_model(
        [prefix + name for name in spec.input_names],
        [prefix + name for name in spec.output_names],
    )
    part = onnx.ModelProto()
    part.CopyFrom(together)
    part.graph.CopyFrom(extracted.graph)
    part.graph.name = together.graph.name
    del part.functions[:]
    part.functions.extend(extracted.functions)
    graph = part.graph
    names = {prefix + name: name for name in (*spec.input_names, *spec.output_names)}
    kept = [v for v in graph.value_info if v.name not in names]  # the inputs' and outputs'
    del graph.value_info[:]
    graph.value_info.extend(kept)
    names.update({t.name: t.name.removeprefix(weights) for t in graph.initializer})
    others = {n for node in graph.node for n in (*node.input, *node.output)} - set(names)
    if others & set(names.values()) or len(set(names.values())) < len(names):
        raise ExportError(f"{spec.file}: its names clash once the graphs are split")
    _rename_values(graph, names)
    for dim in _symbolic_dims(graph):
        dim.dim_param = re.sub(r"\w+", lambda m: symbols.get(m.group(), m.group()), dim.dim_param)
    return part


class _Graphs:
    """The graphs of one export, each exported once: the loss graphs `together` in one
    torch.onnx.export call, the others alone, fused graphs composed from the model and loss
    graphs."""

    def __init__(self, model: nn.Module, opset: int, together: Sequence[GraphSpec] = ()) -> None:
        self.model, self.opset, self.together = model, opset, list(together)
        self.exported: dict[GraphSpec, onnx.ModelProto] = {}

    def proto(self, spec: GraphSpec) -> onnx.ModelProto:
        """Graph `spec`, exported or composed."""
        if spec.kind is GraphKind.FUSED:
            model, loss = self.proto(model_graph()), self.proto(loss_graph(spec.loss))
            return _fused_proto(spec, model, loss)
        if spec in self.together:
            self.exported.update(_exported_together(self.together, self.model, self.opset))
            self.together = []
        if spec not in self.exported:
            module = exported_module(spec, self.model)
            self.exported[spec] = _exported_proto(spec, module, self.opset)
        return self.exported[spec]


def _fused_proto(spec: GraphSpec, model: onnx.ModelProto, loss: onnx.ModelProto) -> onnx.ModelProto:
    """Fused graph `spec`, what graph_modules.Fused computes, composed from the exported model
    and loss graphs: every name of the model under `model.` (which gives its weights the fused
    module's state_dict names) and of the loss under `loss.`, the logits scored in the form the
    loss is defined on, and the inputs and outputs named as `spec` names them."""
    parts = (model_graph(), loss_graph(spec.loss))
    loss = _on_logits(loss, spec)
    try:
        fused = onnx.compose.merge_models(
            model,
            loss,
            io_map=[(parts[0].output_names[0], loss.graph.input[0].name)],
            outputs=[f"model.{parts[0].output_names[0]}", f"loss.{parts[1].output_names[0]}"],
            prefix1="model.",
            prefix2="loss.",
            name=model.graph.name,
            doc_string="",
            domain=model.domain,
            model_version=model.model_version,
        )
    except (ValueError, onnx.checker.ValidationError) as e:
        raise ExportError(
            f"{spec.file}: cannot compose it with onnx.compose: {first_line(e)}"
        ) from None
    # merge_models lists each opset of both models; one entry per domain is the ONNX form
    opsets = {o.domain: o.version for o in fused.opset_import}
    del fused.opset_import[:]
    fused.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    # (images, target) -> (logits, loss): the model's input, the loss's target, their outputs
    composed = (
        f"model.{parts[0].input_names[0]}",
        f"loss.{parts[1].input_names[1]}",
        f"model.{parts[0].output_names[0]}",
        f"loss.{parts[1].output_names[0]}",
    )
    renames = dict(zip(composed, (*spec.input_names, *spec.output_names), strict=True))
    _rename_values(fused.graph, renames)
    # the loss's symbolic dims that the model's logits fix (its class dim: C or D) are fixed
    loss_tensors = (*parts[1].inputs, *parts[1].outputs)
    fused_tensors = (spec.output(parts[0].output_names[0]), *spec.inputs[1:], *spec.outputs[1:])
    fixed = {
        symbol: size
        for a, b in zip(loss_tensors, fused_tensors, strict=True)
        for symbol, size in zip(a.shape, b.shape, strict=True)
        if isinstance(symbol, str) and isinstance(size, int)
    }
    for dim in _symbolic_dims(fused.graph):
        if dim.dim_param in fixed:
            dim.dim_value = fixed[dim.dim_param]
    _conform_signature(fused, spec)
    return fused


def _on_logits(loss: onnx.ModelProto, spec: GraphSpec) -> onnx.ModelProto:
    """Loss graph `loss` scoring logits, as losses.OnLogits does: a loss defined on
    log-probabilities gets a LogSoftmax over the class dim in front of it."""
    if spec.loss.info.input_name != "log_probs":
        return loss
    scored = onnx.ModelProto()
    scored.CopyFrom(loss)
    graph = scored.graph
    scores = graph.input[0].name
    graph.input[0].name = "logits"
    graph.node.insert(0, onnx.helper.make_node("LogSoftmax", ["logits"], [scores], axis=1))
    return scored


def _symbolic_dims(graph: onnx.GraphProto):
    """Every symbolic dim of `graph`'s inputs, outputs and value infos."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        yield from (d for d in value.type.tensor_type.shape.dim if d.HasField("dim_param"))


def _rename_values(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Rename values of `graph` (initializers too, and uses in its subgraphs) as `names` maps
    them."""
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
        for attribute in node.attribute:
            for subgraph in (
                *([attribute.g] if attribute.HasField("g") else []),
                *attribute.graphs,
            ):
                _rename_values(subgraph, names)
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        value.name = names.get(value.name, value.name)


def _write_graph(
    proto: onnx.ModelProto, spec: GraphSpec, path: Path, metadata: dict[str, str]
) -> onnx.ModelProto:
    """Write graph `proto` to `path` with lossx's producer and `metadata` (on a copy: the
    exported graphs stay as they are, to be composed), then check the file with onnx.checker."""
    written = onnx.ModelProto()
    written.CopyFrom(proto)
    written.producer_name = "lossx"
    written.producer_version = lossx.__version__
    for key, value in metadata.items():
        written.metadata_props.add(key=key, value=value)
    onnx.save_model(written, path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{spec.file}: onnx.checker rejected it: {first_line(e)}") from None
    return written


def _check_training_ops(proto: onnx.ModelProto, spec: GraphSpec) -> None:
    """Refuse a training graph holding an op ONNX Runtime runs in inference mode: it would
    compute the eval-mode step without an error."""
    found = sorted({n.op_type for n in proto.graph.node if n.op_type in INFERENCE_MODE_OPS})
    if found:
        raise ExportError(
            f"{spec.file}: the exported step holds {', '.join(found)}, which ONNX Runtime runs "
            "in inference mode; its train-mode decomposition did not apply"
        )


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
    model: nn.Module | None,
    path: Path,
    profile: str = DEFAULT_PROFILE,
    images: Cifar10Split | None = None,
) -> None:
    """Run graph file `path` in ONNX Runtime on fresh random inputs of several sizes (after
    real images: `images`, else for a graph that runs the model the first SELF_CHECK_IMAGES
    packaged test images) and compare it with eager `model` (a training graph gets the model's
    weights as its parameters) under tolerance `profile` (its precision's).

    Raises ParityError naming the graph, the worst output and the inputs it failed on, or
    ModelError where eager PyTorch itself computes NaN or Inf where numbers belong.
    """
    parameters = None
    if spec.parameter_names or spec.buffer_names:
        parameters = weights_to_arrays(model)
    if images is None and spec.runs_model:
        images = load_packaged_sample().head(SELF_CHECK_IMAGES)
    report = compare_runners(
        OnnxRuntimeRunner.of_file(path),
        EagerRunner(model),
        [spec],
        chain(real_input_sets(images, 256) if images else (), random_input_sets(seed=1)),
        resolve_tolerances(profile),
        profile=profile,
        parameters=parameters,
    )
    report.raise_if_failed(f"export self-check failed: {spec.file}: ")


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
    engines = {TORCH_CHECKPOINT_FORMAT: "torch", ORT_CHECKPOINT_FORMAT: "onnxruntime"}
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


def export_graph(
    spec: GraphSpec,
    model: nn.Module,
    path: Path,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Export graph `spec` (of `model` for model, fused and training graphs; a fused graph is
    composed from the model and loss graphs) to `path`, checked with onnx.checker and verified
    in ONNX Runtime against the torch.nn reference."""
    return _export_verified(spec, model, path, metadata or {}, _Graphs(model, opset))


def _export_verified(
    spec: GraphSpec, model: nn.Module, path: Path, metadata: dict[str, str], graphs: _Graphs
) -> onnx.ModelProto:
    proto = _write_graph(graphs.proto(spec), spec, path, metadata)
    verify_graph(spec, model, path)
    return proto


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
) -> Manifest:
    """Export the model, each loss alone and each model+loss pair into `out_dir`; with
    `train`, also a training graph per loss (loss, logits and every parameter's gradient,
    plus the images' gradient with `input_grad`).

    The model is `model_name` (a registry name or a `MODULE:ATTR` import path), or `model`, an
    nn.Module instance (recorded as its class's import path). The weights come from
    `checkpoint` if given, else from an instance's own weights, else from the trained weights
    lossx ships (`init="trained"`) or from `seed` (`init="random"`).

    `precision` int8 or fp16 converts the model and fused graphs after their fp32 self-check
    (lossx.build.precision); int8 calibrates on `calibration` (default: the packaged training
    images).

    The artifact is written to a hidden sibling directory and renamed into place only after every
    graph passed its self-check; on any failure `out_dir` is left as it was.
    """
    out_dir, specs = check_export_request(
        out_dir, losses, checkpoint, seed, train, input_grad, precision, calibration is not None
    )
    check_opset(opset)
    if precision == "int8" and calibration is None:
        calibration = load_calibration()
    if model is not None:
        if not isinstance(model, nn.Module):
            raise SpecError(f"model: expected an nn.Module instance, got {type(model).__name__}")
        model_name = f"{type(model).__module__}:{type(model).__qualname__}"
        check_model(model, model_name)
        model = model.eval()
        source = source_record(model_name, sys.modules.get(type(model).__module__))
        given = checkpoint is None
    else:
        model = build_model(model_name, seed)
        source = model_source(model_name)
        given = False
    check_size(model)
    parameters, buffers = None, ()
    if train:
        for spec in specs:
            check_trainable(model, spec)
        parameters = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
        buffers = model_buffers(model)
    graphs = artifact_graphs(specs, parameters, input_grad, buffers)
    if given:
        weights = {"file": WEIGHTS_FILE, "source": "model"}  # the instance's own weights
    else:
        weights = _load_weights(model, model_name, init, checkpoint, seed)
    with sole_writer(out_dir, ArtifactError):
        return write_folder_atomically(
            out_dir,
            lambda staged: _write_artifact(
                staged,
                model,
                model_name,
                source,
                specs,
                graphs,
                weights,
                opset,
                progress,
                precision,
                calibration,
            ),
            ArtifactError,
        )


def _write_artifact(
    staged: Path,
    model: nn.Module,
    model_name: str,
    source: dict | None,
    losses: list[LossSpec],
    graphs: list[GraphSpec],
    weights: dict,
    opset: int,
    progress: Callable[[str], None] | None,
    precision: str = "fp32",
    calibration: Calibration | None = None,
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
    loss_graphs = [g for g in graphs if g.kind is GraphKind.LOSS]
    exports = _Graphs(model, opset, loss_graphs if len(loss_graphs) > 1 else ())
    for spec in graphs:
        if progress:
            progress(spec.file)
        metadata = {
            **common,
            "lossx.graph": str(spec.kind),
            "lossx.inputs": _tensor_facts(spec.inputs),
            "lossx.outputs": _tensor_facts(spec.outputs),
        }
        if spec.loss:
            metadata["lossx.loss"] = json.dumps(spec.loss.to_dict())
        proto = _export_verified(spec, model, staged / spec.file, metadata, exports)
        entries.append(GraphEntry(spec, opset, proto.ir_version))
    if precision != "fp32":
        entries = [
            _lowered(e, model, staged, precision, calibration, progress)
            if e.spec.kind.follows_precision
            else e
            for e in entries
        ]
    np.savez(staged / WEIGHTS_FILE, **weights_to_arrays(model))
    files = sorted([e.spec.file for e in entries] + [WEIGHTS_FILE])
    manifest = Manifest(
        model=model_name,
        model_source=source,
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
        precision=precision_record(precision, calibration),
    )
    (staged / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    load_artifact(staged)  # the runtime must accept exactly what was written
    return manifest


def _lowered(
    entry: GraphEntry,
    model: nn.Module,
    staged: Path,
    precision: str,
    calibration: Calibration | None,
    progress: Callable[[str], None] | None,
) -> GraphEntry:
    """Graph `entry` (model first, then the fused graphs), verified in fp32, converted to
    `precision` and verified again against eager under that precision's profile, on the
    packaged test images too (int8 is compared on real images only)."""
    spec, path = entry.spec, staged / entry.spec.file
    if progress:
        progress(f"{spec.file} at {precision}")
    if spec.kind is GraphKind.MODEL:
        lower_model(path, spec, precision, calibration)
    else:
        splice_model(path, staged / model_graph().file, spec, precision)
    proto = onnx.load(path)
    if _default_opset(proto) != entry.opset:
        raise ExportError(
            f"{spec.file}: the {precision} converter wrote opset {_default_opset(proto)}, "
            f"not {entry.opset}"
        )
    verify_graph(spec, model, path, precision, load_packaged_sample())
    return GraphEntry(spec, entry.opset, proto.ir_version)


def export_summary(manifest: Manifest, out_dir: Path) -> str:
    """What `lossx export` prints: the graphs, each file with its size and sha256, and the
    manifest's own sha256 (what --require-sha256 pins)."""
    lines = [
        f"wrote {out_dir}: {len(manifest.graphs)} graphs at opset {manifest.opset}, model "
        f"{manifest.precision_name}, each verified against eager PyTorch"
    ]
    for name, info in manifest.files.items():
        lines.append(f"  {name:<16} {info['bytes']:>9,} bytes  sha256 {info['sha256']}")
    digest = sha256_of(Path(out_dir) / MANIFEST_FILE)
    lines.append(f"manifest.json sha256 {digest} (pin it with --require-sha256)")
    return "\n".join(lines)
