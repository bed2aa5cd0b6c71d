"""The torch module each graph of an artifact is exported from, and the one it must equal."""

from torch import nn

from lossx.build.backward import ReferenceTrainingStep, TrainingStep
from lossx.build.losses import OnLogits, exported_loss, reference_loss
from lossx.runtime.graphs import GraphKind, GraphSpec


class Fused(nn.Module):
    """Model and loss in one graph: (images, target) -> (logits, loss), the loss scoring the
    logits in the form it is defined on (see OnLogits)."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images, target):
        logits = self.model(images)
        return logits, self.loss(logits, target)


class Together(nn.Module):
    """Several graphs' modules as one, to export them in one call: forward takes each graph's
    inputs in turn and returns each graph's outputs in turn."""

    PARTS = "parts"  # the attribute holding them: their state_dict names start `parts.<stem>.`

    def __init__(self, modules: dict[str, nn.Module], arities: list[int]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self.arities = arities  # how many inputs each takes

    def forward(self, *inputs):
        outputs, start = [], 0
        for module, arity in zip(self.parts.values(), self.arities, strict=True):
            result = module(*inputs[start : start + arity])
            outputs.extend(result if isinstance(result, tuple) else (result,))
            start += arity
        return tuple(outputs)


def _graph_module(spec: GraphSpec, model: nn.Module, make_loss, make_step) -> nn.Module:
    match spec.kind:
        case GraphKind.MODEL:
            return model
        case GraphKind.LOSS:
            return make_loss(spec.loss)
        case GraphKind.FUSED:
            return Fused(model, OnLogits(make_loss(spec.loss), spec.loss))
        case GraphKind.TRAIN:
            return make_step(model, spec)


def reference_module(spec: GraphSpec, model: nn.Module) -> nn.Module:
    """The eager module graph `spec` must equal; its forward takes the spec's inputs in order."""
    return _graph_module(spec, model, reference_loss, ReferenceTrainingStep)


def exported_module(spec: GraphSpec, model: nn.Module) -> nn.Module:
    """The module graph `spec` is exported from (lossx.build.export composes a fused graph from
    the model's and the loss's graphs instead)."""
    return _graph_module(spec, model, exported_loss, TrainingStep)
