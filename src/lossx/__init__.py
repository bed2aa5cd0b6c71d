"""lossx: export a PyTorch CIFAR-10 classifier and its losses to ONNX and prove parity."""

__version__ = "0.1.0"  # the package's one version (pyproject.toml reads it from here)


def lazy_exports(package: str, exports: dict[str, str]):
    """`__getattr__` and `__dir__` for `package` whose names in `exports` (name -> module of the
    package) load on first use, so that importing one light module of the package does not
    import what its heavy modules need."""
    import importlib

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted([*vars(importlib.import_module(package)), *exports])

    return __getattr__, __dir__
