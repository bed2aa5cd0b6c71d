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
the updates agree to a few float32 ulps (tests/runtime/test_optimizer_graphs.py measures it).
"""

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
NEXT = "next."
GRAD_NORM = "grad_norm"
CLIP_EPS = 1e-6  # clip_grad_norm_'s max_norm / (total_norm + 1e-6)


@dataclass(frozen=True)
class UpdateRule:
    """An optimizer as a graph: its per-parameter state and its scalar inputs (name, ONNX
    dtype, what it is), all of which a runtime feeds on every step."""

    name: str
    equals: str  # the torch optimizer it computes
    state: tuple[str, ...]
    scalars: tuple[tuple[str, int, str], ...]


_COMMON = (
    ("lr", TensorProto.DOUBLE, "learning rate"),
    ("weight_decay", TensorProto.DOUBLE, "weight decay (AdamW's decoupled)"),
    ("clip_norm", TensorProto.DOUBLE, "max global L2 norm of the gradients; 0: no clipping"),
)
RULES = {
    "sgd": UpdateRule(
        "sgd",
        "torch.optim.SGD(momentum, nesterov, weight_decay), dampening 0",
        ("momentum_buffer",),
        (
            *_COMMON,
            ("momentum", TensorProto.DOUBLE, "momentum"),
            ("nesterov", TensorProto.BOOL, "Nesterov momentum"),
        ),
    ),
    "adamw": UpdateRule(
        "adamw",
        "torch.optim.AdamW(betas, eps, weight_decay), amsgrad off",
        ("exp_avg", "exp_avg_sq"),
        (
            *_COMMON,
            ("beta1", TensorProto.DOUBLE, "first moment decay (the schedule's momentum)"),
            ("beta2", TensorProto.DOUBLE, "second moment decay"),
            ("eps", TensorProto.DOUBLE, "added to the second moment's root"),
            ("step", TensorProto.INT64, "the step being taken, counted from 1"),
        ),
    ),
}


def state_name(state: str, parameter: str) -> str:
    return f"{state}.{parameter}"


def gradient_name(parameter: str) -> str:
    return f"grad.{parameter}"


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
        return self.op("Cast", double, to=TensorProto.FLOAT)


def optimizer_model(rule_name: str, parameters: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The serialised ONNX graph of update rule `rule_name` over `parameters` (state_dict name,
    shape), in that order."""
    rule = RULES[rule_name]
    b = _Builder()
    inputs = [helper.make_tensor_value_info(n, t, []) for n, t, _ in rule.scalars]
    outputs = []
    for name, shape in parameters:
        for tensor in (name, gradient_name(name), *(state_name(s, name) for s in rule.state)):
            inputs.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, list(shape)))
        for tensor in (name, *(state_name(s, name) for s in rule.state)):
            outputs.append(
                helper.make_tensor_value_info(NEXT + tensor, TensorProto.FLOAT, list(shape))
            )
    norm, factor = _clipping(b, [gradient_name(n) for n, _ in parameters])
    outputs.append(helper.make_tensor_value_info(GRAD_NORM, TensorProto.FLOAT, []))
    b.op("Identity", norm, name=GRAD_NORM)
    update = {"sgd": _sgd, "adamw": _adamw}[rule.name](b)
    for name, _ in parameters:
        grad = b.op("Mul", gradient_name(name), factor)
        update(name, grad)
    graph = helper.make_graph(b.nodes, f"optimizer_{rule.name}", inputs, outputs, b.constants)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lossx"
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


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
        buffer = b.op("Add", b.op("Mul", buffer, momentum), grad, name=NEXT + buffer)
        nesterov = b.op("Add", grad, b.op("Mul", momentum, buffer))
        direction = b.op("Where", "nesterov", nesterov, buffer)
        b.op("Sub", name, b.op("Mul", lr, direction), name=NEXT + name)

    return update


def _adamw(b: _Builder):
    """torch.optim.AdamW's step (_single_tensor_adam, decoupled weight decay): w *= 1 - lr * wd;
    m = m + (1 - beta1) * (g - m); v = v * beta2 + ((1 - beta2) * g) * g; w += -(lr / (1 -
    beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), the scalar factors in double."""
    one = b.constant(1, np.float64)
    step = b.op("Cast", "step", to=TensorProto.DOUBLE)
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
        m = b.op("Add", m, b.op("Mul", keep1, b.op("Sub", grad, m)), name=NEXT + m)
        squared = b.op("Mul", b.op("Mul", keep2, grad), grad)
        v = b.op("Add", b.op("Mul", v, beta2), squared, name=NEXT + v)
        denominator = b.op("Add", b.op("Div", b.op("Sqrt", v), correction2), eps)
        change = b.op("Div", b.op("Mul", step_size, m), denominator)
        b.op("Add", decayed, change, name=NEXT + name)

    return update
