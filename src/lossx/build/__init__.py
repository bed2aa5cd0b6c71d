"""The torch side of lossx: models, losses and the export to ONNX."""

from lossx.build.export import export_artifact
from lossx.build.losses import LOSSES, parse_losses
from lossx.build.models import MODELS, build_model, load_checkpoint

__all__ = ["LOSSES", "MODELS", "build_model", "export_artifact", "load_checkpoint", "parse_losses"]
