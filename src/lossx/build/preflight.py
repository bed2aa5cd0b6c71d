"""What an export is asked to do, checked before torch is imported (this module imports no
torch, nor numpy until it checks): `lossx export` calls it while parsing, `export_artifact`
calls it for every caller, so the two cannot check differently. The opsets lossx exports at."""

from pathlib import Path

from lossx.errors import ArtifactError, SpecError
from lossx.files import check_destination
from lossx.runtime.graphs import resolve_losses
from lossx.runtime.loss_specs import LossSpec
from lossx.runtime.options import check_seed
from lossx.runtime.precisions import check_precision

MIN_OPSET = 17  # every graph exports from this opset on (up to what the installed tools support)
DEFAULT_OPSET = 20


def check_export_request(
    out_dir: Path,
    losses: list[LossSpec | str] | tuple[LossSpec | str, ...],
    checkpoint: Path | None = None,
    seed: int = 0,
    train: bool = False,
    input_grad: bool = False,
    precision: str = "fp32",
    calibrated: bool = False,
    trains: dict | None = None,
) -> tuple[Path, list[LossSpec]]:
    """The destination as an absolute path and the loss specs, or a one-line refusal of what
    cannot be exported: a loss spec, --input-grad without --train, a precision with options
    that do not go with it, a seed, a checkpoint that is neither an .npz nor a torch checkpoint,
    a destination that cannot be written, a choice of what trains (`trains`: trainable, frozen,
    frozen_bn) without --train or that contradicts itself."""
    from lossx.runtime.manifest import MANIFEST_FILE
    from lossx.training.checkpoints import check_checkpoint_kind
    from lossx.training.recipe import FROZEN_BN

    specs = resolve_losses(losses)
    if input_grad and not train:
        raise SpecError("--input-grad adds grad.images to training graphs; it needs --train")
    trains = {k: v for k, v in (trains or {}).items() if v is not None}
    if not train and set(trains) - {"frozen_bn"}:
        option = "--trainable" if "trainable" in trains else "--frozen"
        raise SpecError(f"{option} chooses what training graphs train; it needs --train")
    if trains.get("trainable") is not None and trains.get("frozen") is not None:
        raise SpecError("give --trainable or --frozen, not both")
    if trains.get("frozen_bn", "eval") not in FROZEN_BN:
        raise SpecError(f"--frozen-bn must be one of {', '.join(FROZEN_BN)}")
    check_precision(precision, train, calibrated)
    check_seed(seed)
    if checkpoint is not None:
        check_checkpoint_kind(Path(checkpoint), ("npz", "torch"))
    return check_destination(Path(out_dir), MANIFEST_FILE, ArtifactError), specs
