"""Loss specs: the losses lossx exports, their options, and what each loss graph takes.

A loss spec is a loss name and its options, written like a call: `ce(label_smoothing=0.1,
reduction=sum)`. Parsing and validation live here, without torch, so the command line, the
manifest and the runtime all read specs the same way. Defaults are torch.nn's defaults, so `ce`
means exactly `torch.nn.CrossEntropyLoss()`.
"""

import ast
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lossx.errors import SpecError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Option:
    """One option of a loss, with the values it accepts."""

    name: str
    kind: str  # "float", "int", "bool", "choice" or "floats" (a list, or None)
    default: object
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    minimum_excluded: bool = False

    def accepted(self) -> str:
        """The values this option accepts, in words."""
        if self.kind == "choice":
            return " | ".join(self.choices)
        if self.kind == "floats":
            return "list of numbers"
        if self.kind == "bool":
            return "true | false"
        low = (
            ""
            if self.minimum is None
            else f"{'>' if self.minimum_excluded else '>='} {self.minimum:g}"
        )
        high = "" if self.maximum is None else f"<= {self.maximum:g}"
        return " and ".join(filter(None, (low, high))) or {"int": "integer"}.get(
            self.kind, "number"
        )

    def validate(self, loss: str, value: object) -> object:
        """`value` in canonical form (lists become tuples), or SpecError naming what is wrong."""

        def refuse(why: str) -> SpecError:
            return SpecError(f"{loss}: option {self.name}={value!r} {why}")

        if self.kind == "choice":
            if value not in self.choices:
                raise refuse(f"is not one of {', '.join(self.choices)}")
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise refuse("must be true or false")
            return value
        if self.kind == "floats":
            if value is None or value == "none":
                return None
            if not isinstance(value, list | tuple) or not value:
                raise refuse("must be a non-empty list of numbers, e.g. [1, 2.5]")
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                raise refuse("must hold numbers only")
            if not all(math.isfinite(v) for v in value):
                raise refuse("must hold finite numbers only")
            return tuple(float(v) for v in value)
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise refuse("must be an integer")
            if not INT64_MIN <= value <= INT64_MAX:
                raise refuse("is outside the int64 range -2**63..2**63-1 the graphs compute in")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise refuse("must be a number")
        elif not math.isfinite(value):
            raise refuse("must be finite")
        low_ok = (
            self.minimum is None
            or value > self.minimum
            or (value == self.minimum and not self.minimum_excluded)
        )
        if not low_ok or (self.maximum is not None and value > self.maximum):
            raise refuse(f"is out of range; expected {self.accepted()}")
        return value if self.kind == "int" else float(value)


def _reduction(*extra: str) -> Option:
    return Option(
        "reduction",
        "choice",
        "mean",
        "how the per-element losses are combined",
        choices=("none", "mean", "sum", *extra),
    )


_WEIGHT = Option("weight", "floats", None, "a weight per class (one number per class)")
_IGNORE = Option("ignore_index", "int", -100, "a label value that contributes nothing")


# What `lossx eval` feeds a loss (LossInfo.eval_input), the targets it builds from the labels
# (by the target's values) and how it combines batches (by reduction), in words.
EVAL_INPUTS = {
    "logits": "the logits",
    "softmax": "the softmax probabilities",
    "log_softmax": "the log-softmax of the logits",
}
EVAL_TARGETS = {
    "class_index": "the labels",
    "probabilities": "one-hot labels",
    "unit": "one-hot labels",
    "real": "one-hot labels",
    "log_probabilities": "the log of one-hot labels (log 0 taken as log of float32's tiny)",
}
EVAL_AGGREGATES = {
    "mean": "batch values averaged with batch-size weights",
    "batchmean": "batch values averaged with batch-size weights",
    "sum": "summed over all images",
    "none": "per-element losses averaged over all elements",
}


def _real(options: Mapping[str, object]) -> str:
    return "real"


@dataclass(frozen=True)
class LossInfo:
    """A loss lossx exports, everything about it that is not torch: its torch.nn module's name,
    its options, the inputs its graph takes and what `lossx eval` feeds it. The module it is
    exported from is lossx.build.losses.FORMULATIONS[name]."""

    name: str
    torch_class: str  # the reference: torch.nn.<torch_class>(**options)
    summary: str
    options: tuple[Option, ...]
    input_name: str  # the loss graph's first input: "logits", "log_probs" or "input"
    eval_input: str  # what `lossx eval` feeds it, a key of EVAL_INPUTS
    # Over a class dim (dim 1): inputs [N, C, d1, ...], class-index targets [N, d1, ...];
    # otherwise elementwise: input and target both [N, d1, ..., D].
    class_dim: bool = False
    # What the target holds given the options, in TensorSpec.values's words.
    target_values: Callable[[Mapping[str, object]], str] = _real
    # Refusals of option combinations beyond each option's own range (a SpecError).
    check: Callable[["LossSpec"], None] | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "torch_class": f"torch.nn.{self.torch_class}",
            "summary": self.summary,
            "options": [
                {"name": o.name, "default": o.default, "accepts": o.accepted(), "help": o.help}
                for o in self.options
            ],
        }

    def option(self, name: str) -> Option:
        for option in self.options:
            if option.name == name:
                return option
        known = ", ".join(o.name for o in self.options)
        raise SpecError(f"{self.name}: unknown option {name!r}; {self.name} takes {known}")


def _check_cross_entropy(spec: "LossSpec") -> None:
    if spec.target == "probabilities" and spec["ignore_index"] != -100:
        raise SpecError(
            "ce: option ignore_index applies to class-index targets only; torch ignores it "
            "with target=probs, so lossx refuses it rather than export an option with no effect"
        )


LOSSES: dict[str, LossInfo] = {
    info.name: info
    for info in (
        LossInfo(
            "ce",
            "CrossEntropyLoss",
            "cross-entropy of logits against class indices or class probabilities",
            (
                _WEIGHT,
                _IGNORE,
                Option(
                    "label_smoothing",
                    "float",
                    0.0,
                    "mix the target with the uniform distribution",
                    minimum=0.0,
                    maximum=1.0,
                ),
                _reduction(),
                Option(
                    "target",
                    "choice",
                    "index",
                    "targets are class indices (int64) or class probabilities (float)",
                    choices=("index", "probs"),
                ),
            ),
            input_name="logits",
            eval_input="logits",
            class_dim=True,
            target_values=lambda o: "class_index" if o["target"] == "index" else "probabilities",
            check=_check_cross_entropy,
        ),
        LossInfo(
            "nll",
            "NLLLoss",
            "negative log-likelihood of log-probabilities against class indices",
            (_WEIGHT, _IGNORE, _reduction()),
            input_name="log_probs",
            eval_input="log_softmax",
            class_dim=True,
            target_values=lambda o: "class_index",
        ),
        LossInfo(
            "mse",
            "MSELoss",
            "mean squared error",
            (_reduction(),),
            input_name="input",
            eval_input="softmax",
        ),
        LossInfo(
            "l1",
            "L1Loss",
            "mean absolute error",
            (_reduction(),),
            input_name="input",
            eval_input="softmax",
        ),
        LossInfo(
            "smooth_l1",
            "SmoothL1Loss",
            "squared error below beta, absolute error above",
            (
                _reduction(),
                Option(
                    "beta",
                    "float",
                    1.0,
                    "where the loss turns from squared to absolute",
                    minimum=0.0,
                ),
            ),
            input_name="input",
            eval_input="softmax",
        ),
        LossInfo(
            "huber",
            "HuberLoss",
            "squared error below delta, delta-scaled absolute error above",
            (
                _reduction(),
                Option(
                    "delta",
                    "float",
                    1.0,
                    "where the loss turns from squared to absolute",
                    minimum=0.0,
                    minimum_excluded=True,
                ),
            ),
            input_name="input",
            eval_input="softmax",
        ),
        LossInfo(
            "bce_logits",
            "BCEWithLogitsLoss",
            "binary cross-entropy of logits against targets in [0, 1], per element",
            (
                Option("weight", "floats", None, "a weight per element of the last dimension"),
                _reduction(),
                Option(
                    "pos_weight",
                    "floats",
                    None,
                    "a weight of positive targets per class (last dim)",
                ),
            ),
            input_name="logits",
            eval_input="logits",
            target_values=lambda o: "unit",
        ),
        LossInfo(
            "kl_div",
            "KLDivLoss",
            "Kullback-Leibler divergence of the target from log-probabilities",
            (
                _reduction("batchmean"),
                Option("log_target", "bool", False, "the target is given as log-probabilities"),
            ),
            input_name="log_probs",
            eval_input="log_softmax",
            target_values=lambda o: "log_probabilities" if o["log_target"] else "probabilities",
        ),
    )
}


for _info in LOSSES.values():  # each record's words are in the tables above
    if (
        _info.eval_input not in EVAL_INPUTS
        or not {c for o in _info.options if o.name == "reduction" for c in o.choices}
        <= EVAL_AGGREGATES.keys()
    ):
        raise ImportError(f"loss {_info.name}: its eval input or a reduction has no description")

DEFAULT_LOSSES = ("ce", "mse", "l1")  # what an artifact holds unless told otherwise


def catalogue_text() -> str:
    """The losses, their options and defaults, as `lossx losses` prints them."""
    lines = []
    for info in LOSSES.values():
        lines.append(f"{info.name:<11} torch.nn.{info.torch_class}: {info.summary}")
        for option in info.options:
            default = format_value(option.default)
            lines.append(
                f"{'':<13}{option.name:<16} default {default:<8} {option.accepted():<28} "
                f"{option.help}"
            )
    lines.append(
        '\nexample: lossx export out/ --loss "ce(label_smoothing=0.1, reduction=sum)" --loss mse'
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class LossSpec:
    """A loss and every one of its options (defaults filled in), hashable and comparable."""

    name: str
    options: tuple[tuple[str, object], ...]  # in the order of LossInfo.options

    @property
    def info(self) -> LossInfo:
        return LOSSES[self.name]

    def __getitem__(self, option: str) -> object:
        return dict(self.options)[option]

    @property
    def target(self) -> str:
        """What the target holds, in TensorSpec.values's words."""
        return self.info.target_values(dict(self.options))

    @property
    def eval_description(self) -> str:
        """What `lossx eval` reports for this loss, in words."""
        return (
            f"{self.info.torch_class} {self} of {EVAL_INPUTS[self.info.eval_input]} against "
            f"{EVAL_TARGETS[self.target]}; {EVAL_AGGREGATES[self['reduction']]}"
        )

    @property
    def class_weight_length(self) -> int | None:
        """The number of classes (or last-dim elements) the weight options fix, if any."""
        lengths = {len(v) for k, v in self.options if k in ("weight", "pos_weight") and v}
        return max(lengths, default=None)

    @property
    def lower_bound(self) -> float | None:
        """The least value the loss takes on inputs of the form it is defined on: 0 for every
        loss here, unless a weight option is negative (then none)."""
        weights = (x for k, v in self.options if k in ("weight", "pos_weight") and v for x in v)
        return None if any(x < 0 for x in weights) else 0.0

    def to_dict(self) -> dict:
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}
        return {"name": self.name, "options": options}

    @classmethod
    def from_dict(cls, data: dict) -> "LossSpec":
        return make_loss_spec(data["name"], **data["options"])

    def __str__(self) -> str:
        changed = [
            f"{k}={format_value(v)}"
            for (k, v), option in zip(self.options, self.info.options, strict=True)
            if v != option.default
        ]
        return f"{self.name}({', '.join(changed)})" if changed else self.name


def format_value(value: object) -> str:
    """An option value as a loss spec writes it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def make_loss_spec(name: str, **options: object) -> LossSpec:
    """A validated spec: unknown losses, unknown options and out-of-range values are refused."""
    if name not in LOSSES:
        raise SpecError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    info = LOSSES[name]
    for key in options:
        info.option(key)
    values = tuple(
        (o.name, o.validate(name, options[o.name]) if o.name in options else o.default)
        for o in info.options
    )
    spec = LossSpec(name, values)
    if info.check is not None:
        info.check(spec)
    if len({len(v) for k, v in values if k in ("weight", "pos_weight") and v}) > 1:
        raise SpecError(f"{name}: weight and pos_weight must have the same length")
    return spec


def parse_loss_spec(text: str) -> LossSpec:
    """`"ce(label_smoothing=0.1, reduction=sum)"` -> LossSpec; SpecError for anything else."""
    text = text.strip()
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise SpecError(
            f"cannot read loss spec {text!r}; write e.g. ce(label_smoothing=0.1)"
        ) from None
    if isinstance(tree, ast.Name):
        return make_loss_spec(tree.id)
    if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Name) or tree.args:
        raise SpecError(
            f"cannot read loss spec {text!r}; write name(option=value, ...), "
            "e.g. ce(label_smoothing=0.1)"
        )
    options = {}
    for keyword in tree.keywords:
        if keyword.arg is None or keyword.arg in options:
            raise SpecError(f"loss spec {text!r}: each option must be given once, by name")
        options[keyword.arg] = _literal(text, keyword.value)
    return make_loss_spec(tree.func.id, **options)


def _literal(text: str, node: ast.expr) -> object:
    """A number, a bare word (true/false read as booleans) or a list; nothing is evaluated."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str):
        return node.value
    if isinstance(node, ast.Name):
        return {"true": True, "false": False}.get(node.id.lower(), node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _literal(text, node.operand)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.List):
        return [_literal(text, element) for element in node.elts]
    raise SpecError(f"loss spec {text!r}: cannot read the value {ast.unparse(node)!r}")
