"""lossx: export a PyTorch CIFAR-10 classifier and its losses to ONNX and prove parity."""

__version__ = "0.1.0"  # the package's one version (pyproject.toml reads it from here)
