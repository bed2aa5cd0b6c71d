"""The torch module each graph of an artifact is exported from, and the one it must equal."""

from collections.abc import Callable
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from lossx.build.backward import ReferenceTrainingStep, TrainingStep
from lossx.build.losses import OnLogits, exported_loss, reference_loss
from lossx.build.optimizer_step import OptimizerStep
from lossx.runtime.graphs import GraphKind, GraphSpec
from lossx.runtime.optimizer_graphs import optimizer_proto


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


class StateAsInputs(nn.Module):
    """The model with every state_dict entry an input after the images: forward(images,
    *state) in `names` order. The model graph is exported from it so that no weight can be
    folded into an anonymous constant (a zero bias dropped, GroupNorm's ones merged, a Linear's
    weight transposed ahead of time); lossx.build.torch_onnx then makes each input an
    initializer under its state_dict name, which other weights replace by name."""

    WRAPPED = "model"  # the attribute holding the model: its module paths start `model.`

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names = list(model.state_dict())

    def forward(self, images, *state):
        return torch.func.functional_call(self.model, dict(zip(self.names, state, strict=True)),
                                          (images,))  # fmt: skip


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


@dataclass(frozen=True)
class KindModules:
    """The eager modules of a graph kind, given a graph spec and the model: the one its graph
    must equal and the one torch.onnx exports it from (each forward takes the spec's inputs in
    order). A composed kind is not traced: lossx.build.surgery composes it from the model's and
    the loss's graphs. A built kind is not traced either: `built(spec, opset)` writes it."""

    reference: Callable[[GraphSpec, nn.Module], nn.Module]
    exported: Callable[[GraphSpec, nn.Module], nn.Module] | None
    composed: bool = False
    built: Callable[[GraphSpec, int], onnx.ModelProto] | None = None


MODULES: dict[GraphKind, KindModules] = {
    GraphKind.MODEL: KindModules(
        lambda spec, model: model, lambda spec, model: StateAsInputs(model)
    ),
    GraphKind.LOSS: KindModules(
        lambda spec, model: reference_loss(spec.loss),
        lambda spec, model: exported_loss(spec.loss),
    ),
    GraphKind.FUSED: KindModules(
        lambda spec, model: Fused(model, OnLogits(reference_loss(spec.loss), spec.loss)),
        lambda spec, model: Fused(model, OnLogits(exported_loss(spec.loss), spec.loss)),
        composed=True,
    ),
    GraphKind.TRAIN: KindModules(
        lambda spec, model: ReferenceTrainingStep(model, spec),
        lambda spec, model: TrainingStep(model, spec),
    ),
    # an optimizer step is no module's forward to trace: lossx.runtime.optimizer_graphs
    GraphKind.OPTIMIZER: KindModules(
        lambda spec, model: OptimizerStep(spec), None, built=optimizer_proto
    ),
}
if MODULES.keys() != set(GraphKind):
    raise ImportError(f"graph kinds without modules: {set(GraphKind) - MODULES.keys()}")


def reference_module(spec: GraphSpec, model: nn.Module) -> nn.Module:
    """The eager module graph `spec` must equal; its forward takes the spec's inputs in order."""
    return MODULES[spec.kind].reference(spec, model)


def exported_module(spec: GraphSpec, model: nn.Module) -> nn.Module:
    """The module graph `spec` is exported from (a composed kind's is only what it computes)."""
    return MODULES[spec.kind].exported(spec, model)
