"""The graphs an artifact holds, described once: names, dtypes, shapes and roles of every input
and output.

Export builds graphs to these specs, the runtime validates artifacts and feeds against them,
and comparisons ask them which tolerance rule each output follows, so none of these can
disagree. A shape entry is an int (fixed) or a str (a symbolic, dynamic dimension).
"""

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from lossx.errors import SpecError
from lossx.runtime.loss_specs import LossSpec, parse_loss_spec
from lossx.runtime.update_rules import NONNEGATIVE_STATE, RULES, state_name

DEFAULT_MODEL = "tudui"


class GraphKind(StrEnum):
    """What a graph computes: the model, a loss alone, both fused, a training step, or an
    optimizer's update."""

    MODEL = "model"  # images -> logits
    LOSS = "loss"  # (loss input, target) -> loss
    FUSED = "fused"  # (images, target) -> (logits, loss)
    TRAIN = "train"  # (images, target, *parameters, *buffers) -> (loss, logits, *gradients,
    # *next buffers)
    OPTIMIZER = "optimizer"  # (*hyperparameters, per parameter: it, its gradient, its state)
    # -> (per parameter: it and its state after the step, grad_norm)

    @property
    def weights_prefix(self) -> str | None:
        """The prefix of the model's weights among the graph's initializers; None where the
        weights are not initializers."""
        return KINDS[self].weights_prefix

    @property
    def follows_precision(self) -> bool:
        """Whether the graph is at the artifact's precision (its model part)."""
        return KINDS[self].follows_precision


class Role(StrEnum):
    """What a tensor is to its graph."""

    IMAGES = "images"  # the model's input
    LOSS_INPUT = "loss_input"  # what a standalone loss scores: logits or log-probabilities
    TARGET = "target"  # the loss's target: class indices or a tensor shaped like the input
    PARAMETER = "parameter"  # a model parameter fed to a training graph, which it trains
    FROZEN_PARAMETER = "frozen_parameter"  # a parameter a training graph takes but does not train
    BUFFER = "buffer"  # a model buffer fed to a training graph (e.g. batch-norm statistics)
    LOGITS = "logits"
    LOSS = "loss"
    GRADIENT = "gradient"  # d loss / d the input named by `gradient_of`
    NEXT_BUFFER = "next_buffer"  # a buffer as a train-mode step leaves it, `next.<buffer>`
    HYPERPARAMETER = "hyperparameter"  # an optimizer's scalar: learning rate, momentum, ...
    OPTIMIZER_STATE = "optimizer_state"  # `<state>.<parameter>`, e.g. AdamW's exp_avg
    NEXT_PARAMETER = "next_parameter"  # a parameter after the optimizer's step
    NEXT_OPTIMIZER_STATE = "next_optimizer_state"
    GRAD_NORM = "grad_norm"  # the gradients' global L2 norm before clipping


class ToleranceRule(StrEnum):
    """How an output is compared with its reference (lossx.compare.tolerances applies it)."""

    ELEMENTWISE = "elementwise"  # every element within atol + rtol * |reference|
    TASK = "task"  # elementwise, plus argmax agreement and top-1 accuracy (logits)
    GRADIENT = "gradient"  # atol scaled by each batch's largest value, a few outliers allowed


# What a tensor's values are (TensorSpec.values), in words.
VALUES = {
    "real": "any real number",
    "image": "pixels in [0, 1]",
    "class_index": "a class index (or a loss's ignore_index)",
    "probabilities": "probabilities that sum to 1 over the class dim",
    "log_probabilities": "the logs of such probabilities",
    "unit": "each in [0, 1]",
    "count": "an integer >= 0 (batch norm's num_batches_tracked)",
    "nonnegative": "a real number >= 0",
    "hyperparameter": "an optimizer's setting (lossx.runtime.update_rules)",
}

_RULES = {Role.LOGITS: ToleranceRule.TASK, Role.GRADIENT: ToleranceRule.GRADIENT}
_FINITE_WITH_LOSS = (Role.GRADIENT, Role.NEXT_BUFFER)
_FINITE = (Role.LOGITS, Role.NEXT_PARAMETER, Role.NEXT_OPTIMIZER_STATE, Role.GRAD_NORM)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32" or "int64"
    shape: tuple[int | str, ...]
    values: str  # what the values are: a key of VALUES
    role: Role
    gradient_of: str | None = None  # for a gradient: the input it differentiates by

    @property
    def tolerance_rule(self) -> ToleranceRule:
        return _RULES.get(self.role, ToleranceRule.ELEMENTWISE)

    def must_be_finite(self, loss_finite: bool = True) -> bool:
        """Whether a sound model gives only numbers here: logits always; gradients and next
        buffers wherever the loss of the same step is a number (a mean over targets that are
        all ignored is NaN in torch too, and so is its gradient); an optimizer's outputs."""
        return self.role in _FINITE or (self.role in _FINITE_WITH_LOSS and loss_finite)

    def to_dict(self) -> dict:
        data = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "values": self.values,
            "role": str(self.role),
        }
        if self.gradient_of is not None:
            data["gradient_of"] = self.gradient_of
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        return cls(
            data["name"],
            data["dtype"],
            tuple(data["shape"]),
            data["values"],
            Role(data["role"]),
            data.get("gradient_of"),
        )


@dataclass(frozen=True)
class GraphSpec:
    stem: str  # file name without ".onnx"
    kind: GraphKind
    loss: LossSpec | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.stem}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    def named(self, role: Role) -> str:
        """The name of the graph's (first) input or output of `role`, e.g. its logits'."""
        return self.named_tensor(role).name

    def named_tensor(self, role: Role) -> TensorSpec:
        """The graph's (first) input or output of `role`."""
        return next(t for t in (*self.inputs, *self.outputs) if t.role is role)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the images a graph that runs the model takes."""
        return tuple(self.named_tensor(Role.IMAGES).shape[1:])

    def _named(self, role: Role) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs if t.role is role)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The model parameters the graph trains (or updates), by state_dict name, in order."""
        return self._named(Role.PARAMETER)

    @property
    def frozen_names(self) -> tuple[str, ...]:
        """The model parameters a training graph takes but does not train."""
        return self._named(Role.FROZEN_PARAMETER)

    @property
    def state_names(self) -> tuple[str, ...]:
        """Every parameter and buffer the graph takes, in input order (after the batch)."""
        return tuple(t.name for t in self.inputs if t.role in _STATE)

    @property
    def buffer_names(self) -> tuple[str, ...]:
        """The model buffers the graph takes as inputs, by state_dict name, in order."""
        return self._named(Role.BUFFER)

    @property
    def gradients(self) -> dict[str, str]:
        """Input name -> the output holding d loss / d that input."""
        return {t.gradient_of: t.name for t in self.outputs if t.role is Role.GRADIENT}

    @property
    def next_buffers(self) -> dict[str, str]:
        """Buffer name -> the output holding its value after the step."""
        return {
            t.name.removeprefix(NEXT_PREFIX): t.name
            for t in self.outputs
            if t.role is Role.NEXT_BUFFER
        }

    @property
    def input_grad(self) -> bool:
        """Whether the images' gradient is an output."""
        return any(self.gradients.get(t.name) for t in self.inputs if t.role is Role.IMAGES)

    @property
    def runs_model(self) -> bool:
        return any(t.role is Role.IMAGES for t in self.inputs)

    @property
    def takes_data(self) -> bool:
        """Whether the graph takes images or what a loss scores (an optimizer's takes
        neither)."""
        return any(t.role in (Role.IMAGES, Role.LOSS_INPUT) for t in self.inputs)

    @property
    def update_rule(self) -> str:
        """An optimizer graph's rule (lossx.runtime.update_rules.RULES), named by its file."""
        return self.stem.removeprefix(OPTIMIZER_PREFIX)

    def class_dim(self) -> int | str:
        """The size of the class dim (dim 1) of what the loss scores: the logits of a graph
        that runs the model, else the standalone loss's input (a symbol where dynamic)."""
        scores = (t for t in (*self.inputs, *self.outputs) if t.role in _SCORES)
        return next(scores).shape[1]


_SCORES = (Role.LOSS_INPUT, Role.LOGITS)
_PARAMETERS = (Role.PARAMETER, Role.FROZEN_PARAMETER)
_STATE = (*_PARAMETERS, Role.BUFFER)
NEXT_PREFIX = "next."
OPTIMIZER_PREFIX = "optimizer_"
GRAD_NORM = "grad_norm"


def gradient_name(parameter: str) -> str:
    """The training graph output, and optimizer graph input, holding `parameter`'s gradient."""
    return f"grad.{parameter}"


def model_graph(image_shape: tuple[int, ...], classes: int) -> GraphSpec:
    """`model.onnx`: images float32 [N,C,H,W] (image_shape) -> logits float32 [N,classes]."""
    images = TensorSpec("images", "float32", ("N", *image_shape), "image", Role.IMAGES)
    logits = TensorSpec("logits", "float32", ("N", classes), "real", Role.LOGITS)
    return GraphSpec("model", GraphKind.MODEL, None, (images,), (logits,))


def model_part(spec: GraphSpec) -> GraphSpec:
    """The model graph whose images and logits graph `spec` (one that runs the model) takes."""
    images, logits = spec.named_tensor(Role.IMAGES), spec.named_tensor(Role.LOGITS)
    return GraphSpec("model", GraphKind.MODEL, None, (images,), (logits,))


def _target(loss: LossSpec, name: str, shape: tuple, labels_shape: tuple) -> TensorSpec:
    if loss.target == "class_index":
        return TensorSpec("labels", "int64", labels_shape, "class_index", Role.TARGET)
    return TensorSpec(name, "float32", shape, loss.target, Role.TARGET)


def _input_values(loss: LossSpec) -> str:
    return "log_probabilities" if loss.info.input_name == "log_probs" else "real"


def _loss_output(loss: LossSpec, per_element: tuple) -> TensorSpec:
    shape = per_element if loss["reduction"] == "none" else ()
    return TensorSpec("loss", "float32", shape, "real", Role.LOSS)


def loss_graph(loss: LossSpec, extra_dims: int = 0) -> GraphSpec:
    """`loss_<name>.onnx`: the loss alone, on inputs of rank 2 + `extra_dims`.

    Class-dim losses (ce, nll) take [N, C, d1, ...] and class indices [N, d1, ...] (or class
    probabilities shaped like the input); elementwise losses take two tensors [N, d1, ..., D].
    A weight option fixes the size of the dim it weights (C, or the last dim).
    """
    spatial = tuple(f"d{i}" for i in range(1, extra_dims + 1))
    fixed = loss.class_weight_length
    if loss.info.class_dim:
        shape = ("N", fixed or "C", *spatial)
        per_element = ("N", *spatial)
    else:
        shape = ("N", *spatial, fixed or "D")
        per_element = shape
    inputs = (
        TensorSpec(loss.info.input_name, "float32", shape, _input_values(loss), Role.LOSS_INPUT),
        _target(loss, "target", shape, per_element),
    )
    outputs = (_loss_output(loss, per_element),)
    return GraphSpec(f"loss_{loss.name}", GraphKind.LOSS, loss, inputs, outputs)


def fused_graph(loss: LossSpec, model: GraphSpec) -> GraphSpec:
    """`model_<name>.onnx`: model and loss in one graph, `loss(model(images), target)`."""
    (images,), (logits,) = model.inputs, model.outputs
    shape = logits.shape
    target = _target(loss, "targets", shape, ("N",))
    per_element = ("N",) if loss.info.class_dim else shape
    outputs = (logits, _loss_output(loss, per_element))
    return GraphSpec(f"model_{loss.name}", GraphKind.FUSED, loss, (images, target), outputs)


@dataclass(frozen=True)
class Buffer:
    """A model buffer as a training graph sees it: its state_dict name, dtype and shape, and
    whether a train-mode forward changes it (batch-norm statistics do)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    updated: bool

    @property
    def values(self) -> str:
        return "count" if self.dtype == "int64" else "real"


def train_graph(
    loss: LossSpec,
    model: GraphSpec,
    parameters: list[tuple[str, tuple[int, ...]]],
    input_grad: bool = False,
    buffers: tuple[Buffer, ...] = (),
    frozen: frozenset[str] = frozenset(),
) -> GraphSpec:
    """`train_<name>.onnx`, one train-mode step: the fused graph's inputs plus every parameter
    and every buffer (by state_dict name) -> loss, logits, `grad.<name>` of every parameter not
    in `frozen` (and `grad.images`), and `next.<name>` of every buffer the step changes."""
    fused = fused_graph(loss, model)
    (images,), (logits,) = model.inputs, model.outputs
    weights = tuple(
        TensorSpec(name, "float32", shape, "real",
                   Role.FROZEN_PARAMETER if name in frozen else Role.PARAMETER)
        for name, shape in parameters
    )  # fmt: skip
    trained = tuple(t for t in weights if t.role is Role.PARAMETER)
    wrt = [*trained, images] if input_grad else trained
    grads = tuple(
        TensorSpec(gradient_name(t.name), "float32", t.shape, "real", Role.GRADIENT, t.name)
        for t in wrt
    )
    state = tuple(TensorSpec(b.name, b.dtype, b.shape, b.values, Role.BUFFER) for b in buffers)
    updates = tuple(
        TensorSpec(NEXT_PREFIX + b.name, b.dtype, b.shape, b.values, Role.NEXT_BUFFER)
        for b in buffers
        if b.updated
    )
    outputs = (_loss_output(loss, ()), logits, *grads, *updates)
    inputs = (*fused.inputs, *weights, *state)
    return GraphSpec(f"train_{loss.name}", GraphKind.TRAIN, loss, inputs, outputs)


def graph_buffers(spec: GraphSpec) -> tuple[Buffer, ...]:
    """The buffers training graph `spec` takes, as train_graph was given them."""
    updated = spec.next_buffers
    return tuple(
        Buffer(t.name, t.dtype, t.shape, t.name in updated)
        for t in spec.inputs
        if t.role is Role.BUFFER
    )


def optimizer_graph(rule: str, parameters: list[tuple[str, tuple[int, ...]]]) -> GraphSpec:
    """`optimizer_<rule>.onnx`, one step of update rule `rule` (lossx.runtime.update_rules) over
    `parameters` (state_dict name, shape): its hyperparameters, then each parameter, its
    gradient and its state -> each parameter and its state after the step (`next.<name>`), and
    the gradients' global norm before clipping."""
    record = RULES[rule]
    inputs = [
        TensorSpec(h.name, h.dtype, (), "hyperparameter", Role.HYPERPARAMETER)
        for h in record.hyperparameters
    ]
    outputs = []
    for name, shape in parameters:
        states = [
            TensorSpec(state_name(s, name), "float32", shape,
                       "nonnegative" if s in NONNEGATIVE_STATE else "real", Role.OPTIMIZER_STATE)
            for s in record.state
        ]  # fmt: skip
        inputs += [
            TensorSpec(name, "float32", shape, "real", Role.PARAMETER),
            TensorSpec(gradient_name(name), "float32", shape, "real", Role.GRADIENT, name),
            *states,
        ]
        outputs += [
            TensorSpec(NEXT_PREFIX + name, "float32", shape, "real", Role.NEXT_PARAMETER),
            *(
                TensorSpec(NEXT_PREFIX + t.name, "float32", shape, t.values,
                           Role.NEXT_OPTIMIZER_STATE)
                for t in states
            ),
        ]  # fmt: skip
    outputs.append(TensorSpec(GRAD_NORM, "float32", (), "nonnegative", Role.GRAD_NORM))
    return GraphSpec(
        OPTIMIZER_PREFIX + rule, GraphKind.OPTIMIZER, None, tuple(inputs), tuple(outputs)
    )


def artifact_graphs(
    losses: list[LossSpec],
    model: GraphSpec,
    parameters: list[tuple[str, tuple[int, ...]]] | None = None,
    input_grad: bool = False,
    buffers: tuple[Buffer, ...] = (),
    frozen: frozenset[str] = frozenset(),
) -> list[GraphSpec]:
    """Every graph an artifact with these losses holds, model first; training graphs and the
    optimizers' graphs when `parameters` (the model's, by name and shape) are given, the
    training graphs taking `buffers` too and training the parameters not in `frozen`."""
    graphs = [model, *(loss_graph(n) for n in losses), *(fused_graph(n, model) for n in losses)]
    if parameters is not None:
        graphs += [train_graph(n, model, parameters, input_grad, buffers, frozen) for n in losses]
        trained = [(name, shape) for name, shape in parameters if name not in frozen]
        graphs += [optimizer_graph(rule, trained) for rule in RULES]
    return graphs


def _expected_train_graph(spec: GraphSpec, model: GraphSpec) -> GraphSpec:
    parameters = [(t.name, t.shape) for t in spec.inputs if t.role in _PARAMETERS]
    frozen = frozenset(spec.frozen_names)
    return train_graph(spec.loss, model, parameters, spec.input_grad, graph_buffers(spec), frozen)


def _expected_optimizer_graph(spec: GraphSpec, model: GraphSpec) -> GraphSpec:
    if spec.update_rule not in RULES:
        raise ValueError(f"{spec.file}: no update rule {spec.update_rule!r}")
    parameters = [(t.name, t.shape) for t in spec.inputs if t.role is Role.PARAMETER]
    return optimizer_graph(spec.update_rule, parameters)


@dataclass(frozen=True)
class KindRecord:
    """What a graph kind is to the runtime: the spec lossx writes for a manifest entry of this
    kind (its loss, and the shapes that vary between artifacts, read off the entry), where the
    model's weights sit among its initializers, and whether it is at the artifact's precision.
    The modules it is exported from and checked against are lossx.build.graph_modules's."""

    expected_spec: Callable[[GraphSpec, GraphSpec], GraphSpec]  # (entry, model graph) -> spec
    weights_prefix: str | None  # None: the weights are inputs (or absent), not initializers
    follows_precision: bool  # loss and training graphs are fp32 in every artifact


KINDS: dict[GraphKind, KindRecord] = {
    GraphKind.MODEL: KindRecord(lambda spec, model: model, "", True),
    GraphKind.LOSS: KindRecord(
        lambda spec, model: loss_graph(spec.loss, max(0, len(spec.inputs[0].shape) - 2)),
        None,
        False,
    ),
    GraphKind.FUSED: KindRecord(lambda spec, model: fused_graph(spec.loss, model), "model.", True),
    GraphKind.TRAIN: KindRecord(_expected_train_graph, None, False),
    GraphKind.OPTIMIZER: KindRecord(_expected_optimizer_graph, None, False),
}
if KINDS.keys() != set(GraphKind):
    raise ImportError(f"graph kinds without a record: {set(GraphKind) - KINDS.keys()}")


def expected_spec(spec: GraphSpec, model: GraphSpec) -> GraphSpec:
    """The spec lossx writes for a graph of `spec`'s kind, loss and varying shapes, in an
    artifact whose model graph is `model`."""
    return KINDS[spec.kind].expected_spec(spec, model)


def resolve_losses(losses: list[LossSpec | str] | tuple[LossSpec | str, ...]) -> list[LossSpec]:
    """Loss specs for an artifact: parsed, each loss at most once."""
    specs = [parse_loss_spec(s) if isinstance(s, str) else s for s in losses]
    if not specs:
        raise SpecError("no losses given")
    names = [spec.name for spec in specs]
    for name in names:
        if names.count(name) > 1:
            raise SpecError(f"loss {name} given twice; an artifact holds one spec per loss")
    return specs


def check_loss_classes(specs: list[LossSpec], classes: int) -> None:
    """Refuse a loss whose weights are sized for another number of classes than the model's."""
    for spec in specs:
        length = spec.class_weight_length
        if length is not None and length != classes:
            dim = "classes" if spec.info.class_dim else "logits per image"
            raise SpecError(f"{spec}: weights for {length} {dim}; the model has {classes}")
