"""Graph surgery in onnx alone (no torch): a graph's signature conformed to its spec, a graph
cut out of several exported together, the model+loss graph composed with onnx.compose, values
renamed, opsets converted down."""

import re

import onnx
import onnx.compose
import onnx.utils
import onnx.version_converter

from lossx.errors import ExportError, first_line
from lossx.runtime.graphs import GraphKind, GraphSpec, Role, loss_graph, model_part

# Ops whose ONNX translation runs in inference mode in ONNX Runtime: never in a training graph.
INFERENCE_MODE_OPS = ("BatchNormalization", "Dropout")


def conform_signature(proto: onnx.ModelProto, spec: GraphSpec) -> None:
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


def conformed(proto: onnx.ModelProto, spec: GraphSpec, opset: int) -> onnx.ModelProto:
    """Exported graph `proto` at `opset`, its inputs and outputs checked against `spec`."""
    proto = at_opset(proto, opset, spec)
    if spec.kind is GraphKind.TRAIN:
        check_training_ops(proto, spec)
    conform_signature(proto, spec)
    return proto


def part_of(
    together: onnx.ModelProto, spec: GraphSpec, symbols: dict[str, str], parts: str
) -> onnx.ModelProto:
    """Graph `spec`'s part of graphs exported together (the module holding them as `parts`,
    graph_modules.Together): the nodes its outputs depend on with their initializers and value
    infos, its values and dynamic dims (`symbols`) named as its own export names them;
    ExportError where that renaming would clash with another name."""
    prefix, weights = f"{spec.stem}.", f"{parts}.{spec.stem}."
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
    rename_values(graph, names)
    for dim in symbolic_dims(graph):
        dim.dim_param = re.sub(r"\w+", lambda m: symbols.get(m.group(), m.group()), dim.dim_param)
    return part


def fused_proto(spec: GraphSpec, model: onnx.ModelProto, loss: onnx.ModelProto) -> onnx.ModelProto:
    """Fused graph `spec`, what graph_modules.Fused computes, composed from the exported model
    and loss graphs: every name of the model under `model.` (which gives its weights the fused
    module's state_dict names) and of the loss under `loss.`, the logits scored in the form the
    loss is defined on, and the inputs and outputs named as `spec` names them."""
    parts = (model_part(spec), loss_graph(spec.loss))
    loss = on_logits(loss, spec)
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
    rename_values(fused.graph, renames)
    # the loss's symbolic dims that the model's logits fix (its class dim: C or D) are fixed
    loss_tensors = (*parts[1].inputs, *parts[1].outputs)
    fused_tensors = (spec.output(parts[0].output_names[0]), *spec.inputs[1:], *spec.outputs[1:])
    fixed = {
        symbol: size
        for a, b in zip(loss_tensors, fused_tensors, strict=True)
        for symbol, size in zip(a.shape, b.shape, strict=True)
        if isinstance(symbol, str) and isinstance(size, int)
    }
    for dim in symbolic_dims(fused.graph):
        if dim.dim_param in fixed:
            dim.dim_value = fixed[dim.dim_param]
    conform_signature(fused, spec)
    return fused


def on_logits(loss: onnx.ModelProto, spec: GraphSpec) -> onnx.ModelProto:
    """Loss graph `loss` scoring logits, as losses.OnLogits does: a loss defined on
    log-probabilities gets a LogSoftmax over the class dim in front of it."""
    if spec.loss.info.input_name != "log_probs":
        return loss
    scored = onnx.ModelProto()
    scored.CopyFrom(loss)
    graph = scored.graph
    scores = graph.input[0].name
    logits = spec.named(Role.LOGITS)
    graph.input[0].name = logits
    graph.node.insert(0, onnx.helper.make_node("LogSoftmax", [logits], [scores], axis=1))
    return scored


def symbolic_dims(graph: onnx.GraphProto):
    """Every symbolic dim of `graph`'s inputs, outputs and value infos."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        yield from (d for d in value.type.tensor_type.shape.dim if d.HasField("dim_param"))


def rename_values(graph: onnx.GraphProto, names: dict[str, str]) -> None:
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
                rename_values(subgraph, names)
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        value.name = names.get(value.name, value.name)


def check_training_ops(proto: onnx.ModelProto, spec: GraphSpec) -> None:
    """Refuse a training graph holding an op ONNX Runtime runs in inference mode: it would
    compute the eval-mode step without an error."""
    found = sorted({n.op_type for n in proto.graph.node if n.op_type in INFERENCE_MODE_OPS})
    if found:
        raise ExportError(
            f"{spec.file}: the exported step holds {', '.join(found)}, which ONNX Runtime runs "
            "in inference mode; its train-mode decomposition did not apply"
        )


def at_opset(proto: onnx.ModelProto, opset: int, spec: GraphSpec) -> onnx.ModelProto:
    """`proto` at exactly `opset`, converted down by onnx's version converter if need be
    (torch.onnx's own down-conversion fails on some graphs and then keeps opset 18 silently)."""
    if default_opset(proto) != opset:
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception as e:
            raise ExportError(
                f"{spec.file}: cannot convert the graph to opset {opset}: {first_line(e)}"
            ) from None
    if default_opset(proto) != opset:
        raise ExportError(f"{spec.file}: exported at opset {default_opset(proto)}, not {opset}")
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


def default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
