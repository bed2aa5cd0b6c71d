"""The torch side of lossx: models, losses and the export to ONNX.

The names below load on first use, so that the torch-free modules of this package
(lossx.build.torch_side, lossx.build.preflight) can be imported without importing torch.
"""

import importlib

_EXPORTS = {
    "MODELS": "models",
    "build_model": "models",
    "export_artifact": "export",
    "export_loss": "export",
    "exported_loss": "losses",
    "load_checkpoint": "models",
    "reference_loss": "losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
