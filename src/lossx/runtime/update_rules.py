"""The optimizers lossx trains with, as records: what each optimizer graph takes and keeps
(lossx.runtime.optimizer_graphs builds them, lossx.runtime.graphs describes them)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Hyperparameter:
    """A scalar an optimizer graph takes on every step."""

    name: str
    dtype: str  # float64 as torch.optim holds it in a Python float; bool; int64
    meaning: str
    check_range: tuple[float, float]  # where `lossx check` draws it from


@dataclass(frozen=True)
class UpdateRule:
    """An optimizer: the torch optimizer its graph equals, its per-parameter state (zeros
    before the first step) and its hyperparameters."""

    name: str
    equals: str
    state: tuple[str, ...]
    hyperparameters: tuple[Hyperparameter, ...]


_COMMON = (
    Hyperparameter("lr", "float64", "learning rate", (1e-4, 0.1)),
    Hyperparameter("weight_decay", "float64", "weight decay (AdamW's decoupled)", (0.0, 0.01)),
    Hyperparameter(
        "clip_norm", "float64", "max global L2 norm of the gradients; 0: no clipping", (0.0, 5.0)
    ),
)
RULES = {
    "sgd": UpdateRule(
        "sgd",
        "torch.optim.SGD(momentum, nesterov, weight_decay), dampening 0",
        ("momentum_buffer",),
        (
            *_COMMON,
            Hyperparameter("momentum", "float64", "momentum", (0.8, 0.95)),
            Hyperparameter("nesterov", "bool", "Nesterov momentum", (0, 1)),
        ),
    ),
    "adamw": UpdateRule(
        "adamw",
        "torch.optim.AdamW(betas, eps, weight_decay), amsgrad off",
        ("exp_avg", "exp_avg_sq"),
        (
            *_COMMON,
            Hyperparameter(
                "beta1", "float64", "first moment's decay (the schedule's momentum)", (0.85, 0.95)
            ),
            Hyperparameter("beta2", "float64", "second moment's decay", (0.99, 0.9999)),
            Hyperparameter("eps", "float64", "added to the second moment's root", (1e-8, 1e-6)),
            Hyperparameter("step", "int64", "the step being taken, counted from 1", (1, 1000)),
        ),
    ),
}
NONNEGATIVE_STATE = ("exp_avg_sq",)  # running squares


def state_name(state: str, parameter: str) -> str:
    """The graph input holding optimizer state `state` of `parameter`."""
    return f"{state}.{parameter}"
