"""ONNX Runtime's blocked (NCHWc) CPU convolutions for Convs whose weights are graph inputs.

ONNX Runtime's CPU provider runs a Conv with MLAS's NCHWc direct-convolution kernels only when
its weights are a constant initializer: the NchwcTransformer reorders them once, when the session
opens. A training graph takes its weights as inputs, so each of its Convs runs as im2col and
SGEMM instead, about half as fast. `with_nchwc_convs` rewrites such a graph for this machine's
CPU: every Conv whose weights are not constant and whose channels fill whole blocks becomes
ONNX Runtime's own com.microsoft.nchwc ops (ReorderInput, Conv, ReorderOutput), its weights
reordered inside the graph, every run, by Reshape and Transpose into MLAS's OIHWBiBo layout.

The result is for this process's ONNX Runtime only (the block size is the CPU's); artifacts
keep standard ONNX, which Node.js, browsers and other providers run unchanged.
"""

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "com.microsoft.nchwc"
_CONV_ATTRIBUTES = ("pads", "strides", "kernel_shape", "dilations")


@functools.cache
def block_size() -> int:
    """MLAS's NCHWc block size on this CPU (16 with AVX-512, 8 with AVX2), or 1 where ONNX
    Runtime has no NCHWc kernels: read from the filter ORT's own transformer reorders for a
    one-channel Conv (it pads the output channels to a whole block)."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    weights = {tensor.name: tensor for tensor in optimized.graph.initializer}
    for node in optimized.graph.node:
        if node.domain == DOMAIN and node.op_type == "Conv":
            return int(weights[node.input[1]].dims[0])
    return 1


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes = {
        value.name: [d.dim_value if d.HasField("dim_value") else None
                     for d in value.type.tensor_type.shape.dim]
        for value in (*graph.value_info, *graph.input)
    }  # fmt: skip
    return shapes


def _rewritable(node: onnx.NodeProto, weight_shape, constants: set[str], block: int) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or node.input[1] in constants:
        return False
    if weight_shape is None or len(weight_shape) != 4 or None in weight_shape:
        return False
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    out_channels, in_channels = weight_shape[:2]
    return (
        attributes.get("group", 1) == 1
        and attributes.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        and all(d == 1 for d in attributes.get("dilations", (1, 1)))
        and out_channels % block == 0
        and in_channels % block == 0
    )


def with_nchwc_convs(model: onnx.ModelProto, block: int | None = None) -> onnx.ModelProto:
    """`model` with every Conv whose weights are not an initializer (and whose group, dilation
    and whole-block channel counts MLAS's NCHWc Conv takes) rewritten to NCHWc ops; `model`
    itself when there is none or the CPU has no NCHWc kernels."""
    block = block or block_size()
    if block <= 1:
        return model
    constants = {tensor.name for tensor in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    shapes = _shapes(model)
    nodes, shape_constants = [], {}

    def shape_constant(values: list[int]) -> str:
        name = f"nchwc_shape_{'_'.join(map(str, values))}"
        shape_constants[name] = numpy_helper.from_array(np.array(values, np.int64), name)
        return name

    for index, node in enumerate(model.graph.node):
        weight_shape = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if not _rewritable(node, weight_shape, constants, block):
            nodes.append(node)
            continue
        out_channels, in_channels, kh, kw = weight_shape
        name = f"nchwc{index}_"
        blocked = [out_channels // block, block, in_channels // block, block, kh, kw]
        nodes += [
            helper.make_node("Reshape", [node.input[1], shape_constant(blocked)], [name + "w6"]),
            # OIHWBiBo: [O/B][I/B][H][W][Bi][Bo]
            helper.make_node("Transpose", [name + "w6"], [name + "wt"], perm=[0, 2, 4, 5, 3, 1]),
            helper.make_node(
                "Reshape", [name + "wt", shape_constant(list(weight_shape))], [name + "w"]
            ),
            helper.make_node("ReorderInput", [node.input[0]], [name + "x"], domain=DOMAIN),
        ]
        inputs = [name + "x", name + "w", *node.input[2:3]]
        attributes = {
            a.name: helper.get_attribute_value(a)
            for a in node.attribute
            if a.name in _CONV_ATTRIBUTES
        }
        nodes += [
            helper.make_node("Conv", inputs, [name + "y"], domain=DOMAIN, **attributes),
            helper.make_node(
                "ReorderOutput",
                [name + "y"],
                list(node.output),
                domain=DOMAIN,
                channels=out_channels,
            ),
        ]
    if len(nodes) == len(model.graph.node):
        return model
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    del rewritten.graph.node[:]
    rewritten.graph.node.extend(nodes)
    rewritten.graph.initializer.extend(shape_constants.values())
    if not any(opset.domain == DOMAIN for opset in rewritten.opset_import):
        rewritten.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return rewritten
