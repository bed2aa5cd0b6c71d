"""Models by name, seeded construction and safe checkpoint loading."""

import re
import warnings
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lossx.errors import CheckpointError, SpecError, first_line
from lossx.files import regular_file
from lossx.runtime.artifact import check_finite, file_kind, read_weights
from lossx.runtime.graphs import DEFAULT_MODEL
from lossx.runtime.ort_engine import checkpoint_state

MODELS: dict[str, Callable[[], nn.Module]] = {}
# Trained weights in lossx/build/weights: `lossx train` checkpoints (docs/training.md).
PACKAGED_WEIGHTS = {DEFAULT_MODEL: "tudui_cifar10.pt"}


def register_model(name: str) -> Callable:
    def register(constructor: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        MODELS[name] = constructor
        return constructor

    return register


@register_model("tudui")
class Tudui(nn.Module):
    """The CIFAR-10 CNN of the classic tutorial: three 5x5 conv + max-pool stages, two linears.

    The layers live in `model1` so a state_dict saved from the tutorial's network loads as is.
    Max-pooling is its only non-linearity.
    """

    def __init__(self) -> None:
        super().__init__()
        self.model1 = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(1024, 64),
            nn.Linear(64, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model1(images)


def packaged_weights(name: str) -> Path:
    """The trained checkpoint lossx ships for model `name`."""
    if name not in PACKAGED_WEIGHTS:
        raise SpecError(
            f"no trained weights ship for model {name!r}; use --init random or --checkpoint"
        )
    return Path(str(resources.files("lossx.build").joinpath("weights", PACKAGED_WEIGHTS[name])))


def build_model(name: str = DEFAULT_MODEL, seed: int = 0) -> nn.Module:
    """A model from the registry, its initial weights drawn from `seed`, in eval mode."""
    if name not in MODELS:
        raise SpecError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def _state_dict_from(obj: object, path: Path) -> Mapping[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model"):  # common training-script wrappers
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{path}: not a state_dict (a mapping of names to tensors)")
    return obj


def _load_failure(error: Exception) -> str:
    """One line saying why torch.load refused a file."""
    text = str(error)
    global_name = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if global_name:
        return (
            f"it pickles {global_name.group(1)}, refused under weights_only=True; "
            "save model.state_dict() rather than the whole model"
        )
    if "WeightsUnpickler error" in text or isinstance(error, EOFError):
        return "not a torch checkpoint (unreadable or truncated pickle)"
    return first_line(error).split(". ")[0]


def load_checkpoint(model: nn.Module, path: Path) -> object:
    """Load a checkpoint into `model`: a state_dict or `lossx train` checkpoint (loaded with
    `torch.load(weights_only=True)`), or an .npz of weights by name (`lossx train --engine
    onnxruntime` writes those; never a pickle).

    The file's kind is read from its content, not its name. Returns what the file held (a
    training checkpoint also carries its recipe and log).
    """
    path = regular_file(path, "checkpoint", CheckpointError)
    kind = file_kind(path)
    if kind not in ("npz", "torch"):
        raise CheckpointError(f"{path}: not a checkpoint ({kind})")
    if kind == "npz":
        obj = {"model": {k: torch.from_numpy(v) for k, v in read_weights(path).items()}}
        obj.update(checkpoint_state(path) or {})
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about pickle protocols it refuses
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load checkpoint: {_load_failure(e)}") from None
    state = _state_dict_from(obj, path)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else "")
            )
        raise CheckpointError(f"{path}: keys do not fit the model: {'; '.join(parts)}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {list(tensor.shape)}, the model needs "
                f"{list(expected[key].shape)}"
            )
    check_finite({k: v.numpy() for k, v in state.items()}, str(path))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return obj


def weights_to_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
