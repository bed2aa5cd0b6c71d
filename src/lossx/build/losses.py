"""Every loss spec as two torch modules: torch.nn's (the reference) and the one lossx exports.

torch.onnx translates cross-entropy to ONNX's SoftmaxCrossEntropyLoss, which has no label
smoothing (the smoothing is silently dropped) and whose probability-target form ONNX Runtime
refuses to load; its binary cross-entropy overflows to inf for large logits. So ce, nll,
bce_logits and kl_div are exported from lossx's own formulations below, written in plain tensor
ops to compute what torch.nn computes; mse, l1, smooth_l1 and huber export correctly from
torch.nn's modules. Every exported graph is checked against the reference.
"""

from collections.abc import Callable

import torch
from torch import nn

from lossx.runtime.loss_specs import LOSSES, LossSpec


def _tensor(values: tuple[float, ...] | None) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.float32)


def reference_loss(spec: LossSpec) -> nn.Module:
    """torch.nn's module for `spec`, e.g. `nn.CrossEntropyLoss(label_smoothing=0.1)`."""
    options = {k: _tensor(v) if k in ("weight", "pos_weight") else v for k, v in spec.options}
    options.pop("target", None)  # lossx's name for the target form torch infers from the dtype
    return getattr(nn, LOSSES[spec.name].torch_class)(**options)


class ClassIndexLoss(nn.Module):
    """ce with class-index targets, and nll, as torch computes them (weight, ignore_index, label
    smoothing, every reduction), for inputs [N, C, d1, ...] and labels [N, d1, ...]."""

    def __init__(self, spec: LossSpec) -> None:
        super().__init__()
        self.takes_logits = spec.info.input_name == "logits"
        self.smoothing = dict(spec.options).get("label_smoothing", 0.0)
        self.ignore_index = spec["ignore_index"]
        self.reduction = spec["reduction"]
        self.register_buffer("weight", _tensor(spec["weight"]))

    def forward(self, input: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(input, 1) if self.takes_logits else input
        ignored = labels == self.ignore_index
        safe = torch.where(ignored, torch.zeros_like(labels), labels)
        picked = -log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
        if self.weight is None:
            weights = torch.ones_like(picked)
        else:
            weights = self.weight[safe]
            picked = picked * weights
        zero = torch.zeros_like(picked)
        nll = torch.where(ignored, zero, picked)
        weights = torch.where(ignored, zero, weights)
        smooth = None
        if self.smoothing > 0:
            spread = log_probs if self.weight is None else log_probs * self._class_weight(input)
            smooth = torch.where(ignored, zero, -spread.sum(1))
            classes = input.shape[1]
        if self.reduction == "none":
            if smooth is None:
                return nll
            return (1 - self.smoothing) * nll + smooth * (self.smoothing / classes)
        if self.reduction == "sum":
            loss, smooth_loss = nll.sum(), None if smooth is None else smooth.sum()
        else:  # mean: normalised by the total weight of the kept targets (NaN when none is kept)
            total = weights.sum()
            loss, smooth_loss = nll.sum() / total, None if smooth is None else smooth.sum() / total
        if smooth_loss is None:
            return loss
        return (1 - self.smoothing) * loss + smooth_loss * (self.smoothing / classes)

    def _class_weight(self, input: torch.Tensor) -> torch.Tensor:
        return self.weight.view(-1, *([1] * (input.dim() - 2)))


class ProbabilityTargetCrossEntropy(nn.Module):
    """ce with class-probability targets: -sum(target * log_softmax(input)) over the class dim."""

    def __init__(self, spec: LossSpec) -> None:
        super().__init__()
        self.smoothing = spec["label_smoothing"]
        self.reduction = spec["reduction"]
        self.register_buffer("weight", _tensor(spec["weight"]))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(input, 1)
        if self.smoothing > 0:
            target = target * (1 - self.smoothing) + self.smoothing / input.shape[1]
        product = log_probs * target
        if self.weight is not None:
            product = product * self.weight.view(-1, *([1] * (input.dim() - 2)))
        if self.reduction == "none":
            return -product.sum(1)
        if self.reduction == "sum":
            return -product.sum()
        return -product.sum() / product.sum(1).numel()  # mean over samples, as torch divides


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


class BinaryCrossEntropyWithLogits(nn.Module):
    """bce_logits as torch computes it, with a log-sigmoid that stays finite for large logits
    (torch.onnx's translation gives inf at logits of -1e4)."""

    def __init__(self, spec: LossSpec) -> None:
        super().__init__()
        self.reduction = spec["reduction"]
        self.register_buffer("weight", _tensor(spec["weight"]))
        self.register_buffer("pos_weight", _tensor(spec["pos_weight"]))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(input)
        log_sigmoid = torch.minimum(input, zero) - torch.log1p(torch.exp(-torch.abs(input)))
        if self.pos_weight is not None:
            log_sigmoid = log_sigmoid * ((self.pos_weight - 1) * target + 1)
        loss = (1 - target) * input - log_sigmoid
        if self.weight is not None:
            loss = loss * self.weight
        return _reduce(loss, self.reduction)


class KLDivergence(nn.Module):
    """kl_div elementwise: target * (log target - input), or exp(target) * (target - input)."""

    def __init__(self, spec: LossSpec) -> None:
        super().__init__()
        self.log_target = spec["log_target"]
        self.reduction = spec["reduction"]

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.log_target:
            pointwise = torch.exp(target) * (target - input)
        else:  # torch.xlogy(target, target): 0 where target is 0
            safe = torch.where(target == 0, torch.ones_like(target), target)
            pointwise = target * torch.log(safe) - target * input
        if self.reduction == "batchmean":
            return pointwise.sum() / input.shape[0]
        return _reduce(pointwise, self.reduction)


class OnLogits(nn.Module):
    """A loss applied to a model's logits in the form it is defined on: the log-softmax for
    losses of log-probabilities (nll, kl_div), the logits themselves for the others. Fused
    graphs, training graphs and `lossx train` score the model through it."""

    def __init__(self, loss: nn.Module, spec: LossSpec) -> None:
        super().__init__()
        self.loss = loss
        self.log_probs = spec.info.input_name == "log_probs"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(torch.log_softmax(logits, 1) if self.log_probs else logits, target)


def _cross_entropy(spec: LossSpec) -> nn.Module:
    if spec.target == "class_index":
        return ClassIndexLoss(spec)
    return ProbabilityTargetCrossEntropy(spec)


# The module each loss graph is exported from, by loss name: lossx's own formulation where
# torch.onnx's translation of torch.nn's module is wrong (module docstring), torch.nn's where it
# is right. A loss of LOSSES without an entry fails at import.
FORMULATIONS: dict[str, Callable[[LossSpec], nn.Module]] = {
    "ce": _cross_entropy,
    "nll": ClassIndexLoss,
    "mse": reference_loss,
    "l1": reference_loss,
    "smooth_l1": reference_loss,
    "huber": reference_loss,
    "bce_logits": BinaryCrossEntropyWithLogits,
    "kl_div": KLDivergence,
}
if FORMULATIONS.keys() != LOSSES.keys():
    raise ImportError(f"losses without a formulation: {LOSSES.keys() ^ FORMULATIONS.keys()}")


def exported_loss(spec: LossSpec) -> nn.Module:
    """The module a loss graph is exported from; the graph is then checked against
    `reference_loss(spec)`."""
    return FORMULATIONS[spec.name](spec)
