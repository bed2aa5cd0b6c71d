"""The losses lossx exports, by name, and the torch modules every graph of an artifact computes."""

from torch import nn

from lossx.errors import SpecError
from lossx.runtime.graphs import LOSS_TARGETS, GraphSpec

LOSSES: dict[str, type[nn.Module]] = {
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "l1": nn.L1Loss,
}
LOSS_OPTIONS = {"reduction": "mean"}  # recorded in the manifest and each graph's metadata
assert LOSSES.keys() == LOSS_TARGETS.keys()


def parse_losses(text: str) -> list[str]:
    """`"ce,mse,l1"` -> `["ce", "mse", "l1"]`, refusing unknown names, duplicates and nothing."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise SpecError("no losses given; choose from " + ", ".join(LOSSES))
    for name in names:
        if name not in LOSSES:
            raise SpecError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    if len(set(names)) != len(names):
        raise SpecError(f"loss listed twice in {text!r}")
    return names


def make_loss(name: str) -> nn.Module:
    return LOSSES[name](**LOSS_OPTIONS)


class Fused(nn.Module):
    """Model and loss in one graph: (images, target) -> (logits, loss)."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images, target):
        logits = self.model(images)
        return logits, self.loss(logits, target)


def graph_module(spec: GraphSpec, model: nn.Module) -> nn.Module:
    """The eager module graph `spec` computes; its forward takes the spec's inputs in order."""
    if spec.kind == "model":
        return model
    if spec.kind == "loss":
        return make_loss(spec.loss)
    return Fused(model, make_loss(spec.loss))
