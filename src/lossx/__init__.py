"""lossx: export a PyTorch CIFAR-10 classifier and its losses to ONNX and prove parity."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lossx")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
