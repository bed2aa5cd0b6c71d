"""Models by name or by import path, seeded construction and safe checkpoint loading.

A model is a registry name ("tudui") or a user's `MODULE:ATTR`: `MODULE` imported as `python -m`
imports (the current directory first on sys.path), `ATTR` an nn.Module subclass or a function
returning one, which takes float32 [N,C,H,W] images (CIFAR-10's 3x32x32 unless the export says
otherwise) and returns [N,classes] logits. Importing it runs the user's code, by their choice.
"""

import hashlib
import importlib
import inspect
import linecache
import os
import re
import sys
import sysconfig
import warnings
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lossx.errors import CheckpointError, SpecError, first_line, with_article
from lossx.files import regular_file
from lossx.runtime.cifar10 import CLASS_NAMES
from lossx.runtime.cifar10 import IMAGE_SHAPE as DEFAULT_INPUT_SHAPE  # the registry's models'
from lossx.runtime.contract import ImageContract, contract_for, default_class_names
from lossx.runtime.graphs import DEFAULT_MODEL
from lossx.runtime.weights import check_finite, file_kind, read_weights
from lossx.training.checkpoints import checkpoint_state
from lossx.training.recipe import TrainConfig

MODELS: dict[str, Callable[[], nn.Module]] = {}
# Trained weights in lossx/build/weights: `lossx train` checkpoints (docs/training.md).
PACKAGED_WEIGHTS = {DEFAULT_MODEL: "tudui_cifar10.pt", "resnet20": "resnet20_cifar10.pt"}


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


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers and a residual addition; a stride-2 block halves the
    image and doubles the channels, its shortcut subsampling and zero-padding the input (He et
    al. 2016's option A, which adds no parameters)."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.pad = outputs - inputs  # channels the shortcut adds, half on each side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad:
            half = self.pad // 2
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.pad - half))
        return F.relu(out + shortcut)


@register_model("resnet20")
class ResNet20(nn.Module):
    """He et al. 2016's CIFAR-10 ResNet-20: a 3x3 stem, three stages of three BasicBlocks (16,
    32, 64 channels; the last two start with stride 2), global average pooling, one linear.
    0.27 M parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, channels = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for index in range(3):
                blocks.append(BasicBlock(channels, width, stride if index == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, 10)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(images))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _separable(inputs: int, outputs: int, stride: int) -> nn.Sequential:
    """A depthwise 3x3 conv (one filter per channel) and a pointwise 1x1 conv, each with
    BatchNorm and ReLU6."""
    return nn.Sequential(
        nn.Conv2d(inputs, inputs, 3, stride=stride, padding=1, groups=inputs, bias=False),
        nn.BatchNorm2d(inputs),
        nn.ReLU6(),
        nn.Conv2d(inputs, outputs, 1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU6(),
    )


@register_model("dsnet")
class DepthwiseSeparableNet(nn.Module):
    """A MobileNet-style CIFAR-10 net: a 3x3 stem, five depthwise-separable blocks (two of them
    stride 2), average pooling, Dropout, one linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU6(),
            _separable(32, 64, 1),
            _separable(64, 128, 2),
            _separable(128, 128, 1),
            _separable(128, 256, 2),
            _separable(256, 256, 1),
            nn.AvgPool2d(8),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(256, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def packaged_weights(name: str) -> Path:
    """The trained checkpoint lossx ships for model `name`."""
    if name not in PACKAGED_WEIGHTS:
        raise SpecError(
            f"no trained weights ship for model {name!r}; use --init random or --checkpoint"
        )
    return Path(str(resources.files("lossx.build").joinpath("weights", PACKAGED_WEIGHTS[name])))


def build_model(
    name: str = DEFAULT_MODEL, seed: int = 0, args: dict[str, object] | None = None
) -> nn.Module:
    """A model from the registry or a `MODULE:ATTR` import path, constructed with keyword
    `args`, its initial weights drawn from `seed`, in eval mode (`model_contract` or
    `check_model` then checks what it takes and gives)."""
    constructor = model_constructor(name)
    torch.manual_seed(seed)
    try:
        model = constructor(**(args or {}))
    except Exception as e:
        raise SpecError(f"--model {name}: constructing it failed: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(
            f"--model {name}: returned {with_article(type(model).__name__)}, not an nn.Module"
        )
    return model.eval()


def model_constructor(name: str) -> Callable[[], nn.Module]:
    """What builds model `name`: a registry entry, or the class or function at `MODULE:ATTR`."""
    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        raise SpecError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}, or give your "
            "own as MODULE:ATTR"
        )
    module = _import_module(name)
    target = module
    for part in name.split(":", 1)[1].split("."):
        if not hasattr(target, part):
            raise SpecError(f"--model {name}: {module.__name__} has no attribute {part!r}")
        target = getattr(target, part)
    if (isinstance(target, type) and issubclass(target, nn.Module)) or inspect.isfunction(target):
        return target
    raise SpecError(
        f"--model {name}: {type(target).__name__} is not a model; give an nn.Module subclass "
        "or a function returning one"
    )


_DOTTED_NAME = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"


def _import_module(name: str):
    module_name, _, attr = name.partition(":")
    if not all(re.fullmatch(_DOTTED_NAME, part) for part in (module_name, attr)):
        raise SpecError(f"--model {name!r}: write MODULE:ATTR, e.g. mymodels:ResNet")
    here = os.getcwd()
    sys.path.insert(0, here)  # as `python -m` does
    try:
        return importlib.import_module(module_name)
    except Exception as e:  # the user's module may raise anything while importing
        raise SpecError(
            f"--model {name}: cannot import {module_name}: {type(e).__name__}: {first_line(e)}"
        ) from None
    finally:
        sys.path.remove(here)


def model_source(name: str) -> dict | None:
    """For a `MODULE:ATTR` model, its import path and the sha256 of its module's source file
    (what the manifest records); None for a registry model."""
    if name in MODELS:
        return None
    return source_record(name, _import_module(name))


def source_record(name: str, module) -> dict:
    """`name` with the file name and sha256 of `module`'s source (None where it has none)."""
    try:
        path = inspect.getsourcefile(module)
    except TypeError:  # a built-in module
        path = None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    return {"import": name, "file": Path(path).name if path else None, "sha256": digest}


PROBE_BATCHES = (1, 2)  # batch 1 too: a squeeze() that drops the batch dim shows only there


def model_contract(
    model: nn.Module,
    name: str,
    input_shape: tuple[int, int, int] | None = None,
    class_names: tuple[str, ...] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    resize: str = "stretch",
) -> ImageContract:
    """The image contract of `model` (lossx.runtime.contract): images of `input_shape` (default
    CIFAR-10's, the registry's models'), as many classes as its logits have (checked by
    `check_model`), named `class_names` (default: CIFAR-10's where there are 10, else the
    indices), normalised by `mean` and `std` (default none)."""
    shape = tuple(input_shape or DEFAULT_INPUT_SHAPE)
    classes = check_model(model, name, shape)
    names = tuple(class_names) if class_names else default_class_names(classes, CLASS_NAMES)
    if len(names) != classes:
        raise SpecError(
            f"--class-names names {len(names)} classes; --model {name} gives {classes} logits "
            f"for {list(shape)} images"
        )
    return contract_for(shape, names, mean, std, resize)


def check_model(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> int:
    """Refuse a model that does not map float32 [N,*input_shape] images to float32 [N,K]
    logits, the same K at batch 1 and 2; return K, its number of classes."""
    classes = None
    for batch in PROBE_BATCHES:
        shape = [batch, *input_shape]
        try:
            with torch.no_grad():
                logits = model.eval()(torch.zeros(shape))
        except Exception as e:
            raise SpecError(
                f"--model {name}: fails on float32 {shape} images: {first_line(e)} (give the "
                "images it takes with --input-shape C,H,W)"
            ) from None
        if not isinstance(logits, torch.Tensor):
            kind = with_article(type(logits).__name__)
            raise SpecError(
                f"--model {name}: returns {kind} for {shape} images; lossx needs a float32 "
                "[N, classes] tensor of logits"
            )
        wanted = classes or (logits.shape[1] if logits.dim() == 2 else "classes")
        if logits.dim() != 2 or logits.shape[0] != batch or logits.shape[1] != wanted:
            squeezed = " (a squeeze() drops N at 1)" if logits.dim() < 2 else ""
            raise SpecError(
                f"--model {name}: returns {list(logits.shape)} for {shape} images; lossx needs "
                f"[N, {wanted}] logits{squeezed}"
            )
        if logits.dtype != torch.float32:
            dtype = str(logits.dtype).removeprefix("torch.")
            raise SpecError(f"--model {name}: logits must be float32, got {dtype}")
        classes = logits.shape[1]
    return classes


_NOT_USER_CODE = tuple(
    str(Path(path))
    for path in (*torch.__path__, Path(__file__).parents[1], sysconfig.get_path("stdlib"))
)


def _is_user_code(file: str) -> bool:
    return not file.startswith(_NOT_USER_CODE) and not file.startswith("<")


def user_code_in_traceback(text: str) -> str | None:
    """The innermost frame of the model's own code in a printed traceback (torch's anomaly
    mode prints one), as `file.py:LINE `code``."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', text)
    for file, line, code in reversed(frames):
        if _is_user_code(file):
            return f"{Path(file).name}:{line} `{code.strip()}`"
    return None


def user_code_at(error: BaseException, model: nn.Module | None = None) -> str | None:
    """Where in the model's own code `error` (or an exception it was raised from) arose: the
    innermost frame outside torch, lossx and Python's standard library, as `file.py:LINE `code``,
    followed, in a method of one of `model`'s modules, by that module's path and class."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for exception in chain:
        frames = []
        tb = exception.__traceback__
        while tb is not None:
            frames.append(tb)
            tb = tb.tb_next
        for tb in reversed(frames):
            file = tb.tb_frame.f_code.co_filename
            if not _is_user_code(file):
                continue
            code = linecache.getline(file, tb.tb_lineno).strip()
            where = f"{Path(file).name}:{tb.tb_lineno} `{code}`"
            owner = tb.tb_frame.f_locals.get("self")
            paths = {id(m): p for p, m in model.named_modules()} if model is not None else {}
            if id(owner) in paths:
                where += f" in {paths[id(owner)] or 'the model'} ({type(owner).__name__})"
            return where
    return None


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


def recorded_contract(recipe: dict | None, given: dict) -> dict:
    """The image contract's facts for model_contract: those `given` (not None), else those
    `recipe` (a `lossx train` checkpoint's, None for any other weights) records."""
    recorded = TrainConfig.from_dict(recipe).contract_options if recipe else {}
    return {**recorded, **{name: value for name, value in given.items() if value is not None}}


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
