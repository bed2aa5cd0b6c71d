"""The update rules of training as standard ONNX graphs, one graph per rule over every trainable
parameter of a model: gradient clipping by global norm (torch.nn.utils.clip_grad_norm_), then
torch.optim.SGD or torch.optim.AdamW, in float32 with torch's order of operations.

A step is one run: the hyperparameters (float64 scalars, as torch.optim holds them in Python
floats; each factor torch computes in double is computed in double here too, then rounded to
float32 once), every parameter, its gradient (`grad.<name>`) and its state (`<state>.<name>`,
zeros before the first step, where torch.optim's state is equal to zeros) in; the updated
parameters (`next.<name>`), state (`next.<state>.<name>`) and the gradients' global norm before
clipping (`grad_norm`) out. Any runtime that runs ONNX takes the same update from the same
file: the ONNX Runtime engine, Node.js and the browser.

torch fuses some multiply-adds (lerp, add with alpha) into one rounding that ONNX writes as two;
the updates agree to a few float32 ulps (tests/training/test_optimizer_graphs.py measures it).
"""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lossx.runtime.graphs import (
    GRAD_NORM,
    NEXT_PREFIX,
    GraphSpec,
    TensorSpec,
    gradient_name,
    optimizer_graph,
)
from lossx.runtime.update_rules import state_name

OPSET = 17  # when no artifact's opset is given
CLIP_EPS = 1e-6  # clip_grad_norm_'s max_norm / (total_norm + 1e-6)


class _Builder:
    """Nodes of a float32/float64 graph, each output named once."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self.count = 0

    def op(self, op_type: str, *inputs: str, name: str | None = None, **attributes) -> str:
        if name is None:
            self.count += 1
            name = f"t{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attributes))
        return name

    def constant(self, value, dtype) -> str:
        name = f"c{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def float32(self, double: str) -> str:
        return self.op("Cast", double, to=onnx.TensorProto.FLOAT)


def optimizer_model(rule: str, parameters: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The serialised graph of update rule `rule` over `parameters` (state_dict name, shape)."""
    return optimizer_proto(optimizer_graph(rule, parameters)).SerializeToString()


def optimizer_proto(spec: GraphSpec, opset: int = OPSET) -> onnx.ModelProto:
    """The ONNX graph of optimizer graph `spec` (lossx.runtime.graphs.optimizer_graph)."""
    b = _Builder()
    inputs, outputs = ([_value_info(t) for t in tensors] for tensors in (spec.inputs, spec.outputs))
    parameters = spec.parameter_names
    norm, factor = _clipping(b, [gradient_name(n) for n in parameters])
    b.op("Identity", norm, name=GRAD_NORM)
    update = {"sgd": _sgd, "adamw": _adamw}[spec.update_rule](b)
    for name in parameters:
        update(name, b.op("Mul", gradient_name(name), factor))
    graph = helper.make_graph(b.nodes, spec.stem, inputs, outputs, b.constants)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lossx")
    model.ir_version = helper.find_min_ir_version_for(opsets)  # what older runtimes load
    onnx.checker.check_model(model, full_check=True)
    return model


def _value_info(tensor: TensorSpec) -> onnx.ValueInfoProto:
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
    return helper.make_tensor_value_info(tensor.name, dtype, list(tensor.shape))


def _clipping(b: _Builder, grads: list[str]) -> tuple[str, str]:
    """(the global L2 norm of `grads`, what clip_grad_norm_ multiplies each by: min(clip_norm /
    (norm + 1e-6), 1), 1 when clip_norm is 0), both float32 as torch computes them: each
    gradient's norm, then the norm of those."""
    if grads:
        norms = [b.op("Sqrt", b.op("ReduceSumSquare", g, keepdims=0)) for g in grads]
        stacked = b.op("Concat", *[b.op("Unsqueeze", n, b.constant([0], np.int64)) for n in norms],
                       axis=0)  # fmt: skip
        norm = b.op("Sqrt", b.op("ReduceSumSquare", stacked, keepdims=0))
    else:
        norm = b.constant(0, np.float32)
    max_norm = b.float32("clip_norm")
    coefficient = b.op("Div", max_norm, b.op("Add", norm, b.constant(CLIP_EPS, np.float32)))
    clipped = b.op("Min", coefficient, b.constant(1, np.float32))
    on = b.op("Greater", "clip_norm", b.constant(0, np.float64))
    return norm, b.op("Where", on, clipped, b.constant(1, np.float32))


def _sgd(b: _Builder):
    """torch.optim.SGD's step: g += wd * w; buf = buf * momentum + g (buf = g on the first
    step, which a zero buffer gives exactly); d = g + momentum * buf (Nesterov) or buf;
    w -= lr * d."""
    lr, momentum, decay = (b.float32(n) for n in ("lr", "momentum", "weight_decay"))

    def update(name: str, grad: str) -> None:
        grad = b.op("Add", grad, b.op("Mul", decay, name))
        buffer = state_name("momentum_buffer", name)
        buffer = b.op("Add", b.op("Mul", buffer, momentum), grad, name=NEXT_PREFIX + buffer)
        nesterov = b.op("Add", grad, b.op("Mul", momentum, buffer))
        direction = b.op("Where", "nesterov", nesterov, buffer)
        b.op("Sub", name, b.op("Mul", lr, direction), name=NEXT_PREFIX + name)

    return update


def _adamw(b: _Builder):
    """torch.optim.AdamW's step (_single_tensor_adam, decoupled weight decay): w *= 1 - lr * wd;
    m = m + (1 - beta1) * (g - m); v = v * beta2 + ((1 - beta2) * g) * g; w += -(lr / (1 -
    beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), the scalar factors in double."""
    one = b.constant(1, np.float64)
    step = b.op("Cast", "step", to=onnx.TensorProto.DOUBLE)
    decay = b.float32(b.op("Sub", one, b.op("Mul", "lr", "weight_decay")))
    keep1 = b.float32(b.op("Sub", one, "beta1"))
    beta2 = b.float32("beta2")
    keep2 = b.float32(b.op("Sub", one, "beta2"))
    correction1 = b.op("Sub", one, b.op("Pow", "beta1", step))
    step_size = b.float32(b.op("Neg", b.op("Div", "lr", correction1)))
    correction2 = b.float32(b.op("Sqrt", b.op("Sub", one, b.op("Pow", "beta2", step))))
    eps = b.float32("eps")

    def update(name: str, grad: str) -> None:
        decayed = b.op("Mul", name, decay)
        m, v = state_name("exp_avg", name), state_name("exp_avg_sq", name)
        m = b.op("Add", m, b.op("Mul", keep1, b.op("Sub", grad, m)), name=NEXT_PREFIX + m)
        squared = b.op("Mul", b.op("Mul", keep2, grad), grad)
        v = b.op("Add", b.op("Mul", v, beta2), squared, name=NEXT_PREFIX + v)
        denominator = b.op("Add", b.op("Div", b.op("Sqrt", v), correction2), eps)
        change = b.op("Div", b.op("Mul", step_size, m), denominator)
        b.op("Add", decayed, change, name=NEXT_PREFIX + name)

    return update
