"""The torch side of lossx: models, losses and the export to ONNX."""

from lossx.build.export import export_artifact, export_loss
from lossx.build.losses import exported_loss, reference_loss
from lossx.build.models import MODELS, build_model, load_checkpoint

__all__ = [
    "MODELS",
    "build_model",
    "export_artifact",
    "export_loss",
    "exported_loss",
    "load_checkpoint",
    "reference_loss",
]
