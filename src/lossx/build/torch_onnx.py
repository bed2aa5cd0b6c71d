"""Driving torch.onnx (dynamo): the opsets it writes, each graph's dynamic dims, one call for
several loss graphs, and the private parts of torch.onnx, onnxscript and onnx_ir it patches
(pinned in pyproject.toml; tests/build/test_torch_onnx.py checks each still exists)."""

import contextlib
import functools
import io
import itertools
import logging
import unittest.mock
import warnings

import onnx
import onnx_ir
import onnx_ir.passes.common
import onnxruntime
import onnxscript
import onnxscript.rewriter
import torch
from torch import nn

from lossx.build.graph_modules import StateAsInputs, Together, exported_module
from lossx.build.models import (
    user_code_at,
)
from lossx.build.preflight import MIN_OPSET
from lossx.build.surgery import conformed, part_of
from lossx.compare.inputs import EXAMPLE_SIZES, sample_feed
from lossx.errors import ExportError, ModelError, first_line
from lossx.runtime.graphs import GraphSpec

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
    state = len(spec.state_names)
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
            model = module.model if isinstance(module, StateAsInputs) else module
            where = user_code_at(e, model) or "its forward"
            raise ModelError(
                f"{file}: the model branches on a tensor's values at {where}; an ONNX graph "
                "runs the same ops for every input, so compute both results and pick with "
                "torch.where (or use torch.cond)"
            ) from None
        raise ExportError(f"{file}: torch.onnx.export failed: {first_line(e)}") from None
    proto = program.model_proto  # made anew on every access
    _unshadowed(proto.graph)
    return proto


def _unshadowed(graph: onnx.GraphProto) -> None:
    """Rename node outputs that take the name of a graph input or initializer: torch.onnx names
    values after their ops (`mean`), and a model's buffer or input may have that name too,
    which breaks ONNX's single assignment. Uses after such a node read the renamed value."""
    given = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    taken = given | {name for node in graph.node for name in node.output}
    renamed: dict[str, str] = {}
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        for index, name in enumerate(node.output):
            if name in given:
                fresh = next(
                    f"{name}_{k}" for k in itertools.count(1) if f"{name}_{k}" not in taken
                )
                taken.add(fresh)
                renamed[name] = node.output[index] = fresh
    for value in graph.value_info:
        value.name = renamed.get(value.name, value.name)


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


def exported_proto(spec: GraphSpec, module: nn.Module, opset: int) -> onnx.ModelProto:
    """Graph `spec` exported from `module` by torch.onnx (dynamo) at `opset`, its inputs and
    outputs checked against the spec; a StateAsInputs module's state inputs made initializers."""
    example = tuple(torch.from_numpy(x) for x in sample_feed(spec, EXAMPLE_SIZES, 0).values())
    input_names, shapes = spec.input_names, _dynamic_shapes(spec)
    if isinstance(module, StateAsInputs):
        state = module.model.state_dict()
        example += tuple(state[name].detach() for name in module.names)
        input_names = [*input_names, *module.names]
        shapes = (*shapes, tuple({} for _ in module.names))
    proto = _torch_onnx_export(
        spec.file, module, example, input_names, spec.output_names, shapes, opset
    )
    if isinstance(module, StateAsInputs):
        _state_as_initializers(proto, state)
    return conformed(proto, spec, opset)


_SCOPES = "pkg.torch.onnx.name_scopes"  # each node's module path, as lossx.parity.layers reads


def _state_as_initializers(proto: onnx.ModelProto, state: dict[str, torch.Tensor]) -> None:
    """Turn the graph inputs named by `state` into initializers holding its values (those the
    graph does not read are dropped), and the module paths torch.onnx recorded under
    StateAsInputs back into the model's own."""
    graph = proto.graph
    read = {name for node in graph.node for name in node.input}
    lifted = [i for i in graph.input if i.name in state]
    for value in lifted:
        graph.input.remove(value)
        if value.name in read:
            array = state[value.name].detach().contiguous().numpy()
            graph.initializer.append(onnx.numpy_helper.from_array(array, value.name))
    prefix = StateAsInputs.WRAPPED
    for node in graph.node:
        for prop in node.metadata_props:
            if prop.key == _SCOPES:
                scopes = eval_scopes(prop.value)
                if len(scopes) > 1 and scopes[1] == prefix:
                    scopes = [scopes[0]] + [s.removeprefix(f"{prefix}.") for s in scopes[2:]]
                    prop.value = repr(scopes)


def eval_scopes(text: str) -> list[str]:
    """A name_scopes entry (torch.onnx writes a Python list of strings)."""
    import ast

    return list(ast.literal_eval(text))


def exported_together(
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
            exported[spec] = conformed(
                part_of(proto, spec, symbols[spec], Together.PARTS), spec, opset
            )
    return exported
