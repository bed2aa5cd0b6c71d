"""The ONNX Runtime side of lossx. It never imports torch or torchvision."""

from lossx.runtime.api import Prediction, Runtime, model_input, open_artifact
from lossx.runtime.artifact import Artifact, Manifest, load_artifact, load_manifest
from lossx.runtime.cifar10 import Cifar10Split, load_cifar10, load_packaged_sample
from lossx.runtime.evaluate import EvalResult, evaluate
from lossx.runtime.preprocessing import to_model_input

__all__ = [
    "Artifact",
    "Cifar10Split",
    "EvalResult",
    "Manifest",
    "Prediction",
    "Runtime",
    "evaluate",
    "load_artifact",
    "load_cifar10",
    "load_manifest",
    "load_packaged_sample",
    "model_input",
    "open_artifact",
    "to_model_input",
]
