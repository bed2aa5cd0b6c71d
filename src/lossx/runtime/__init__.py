"""The ONNX Runtime side of lossx. It never imports torch or torchvision.

The names below load on first use, so that importing one light module of this package (the
command line parses its options with lossx.runtime.options) does not import numpy and
onnxruntime.
"""

from lossx import lazy_exports

_EXPORTS = {
    "Artifact": "artifact",
    "EvalResult": "evaluation",
    "ImageContract": "contract",
    "ImageSet": "image_set",
    "Manifest": "manifest",
    "Prediction": "api",
    "Runtime": "api",
    "evaluate": "evaluation",
    "load_artifact": "artifact",
    "load_cifar10": "cifar10",
    "load_dataset": "datasets",
    "load_manifest": "manifest",
    "load_packaged_sample": "cifar10",
    "model_input": "api",
    "open_artifact": "api",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
