"""The torch side of lossx: models, losses and the export to ONNX.

The names below load on first use, so that the torch-free modules of this package
(lossx.build.torch_side, lossx.build.preflight) can be imported without importing torch.
"""

from lossx import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
