"""`lossx export`."""

from pathlib import Path

import click

from lossx.build.preflight import DEFAULT_OPSET, MIN_OPSET
from lossx.build.torch_side import import_for_good, require_export_extra
from lossx.cli.app import echo, main
from lossx.cli.options import (
    DATA_HELP,
    SEED,
    model_arg_option,
    path_arg,
    with_contract_options,
    with_trainable_options,
)
from lossx.runtime.graphs import DEFAULT_MODEL
from lossx.runtime.loss_specs import DEFAULT_LOSSES
from lossx.runtime.precisions import CALIBRATION_METHODS, PRECISIONS


@main.command(short_help="Export a model and its losses to ONNX graphs, each verified.")
@click.argument("out_dir", type=path_arg())
@click.option(
    "--model",
    "model_name",
    default=DEFAULT_MODEL,
    show_default=True,
    metavar="NAME|MODULE:ATTR",
    help="A registry model, or your own: MODULE:ATTR, an nn.Module subclass or a function "
    "returning one (imported with the current directory first on sys.path).",
)
@model_arg_option
@with_contract_options
@click.option(
    "--loss",
    "losses",
    multiple=True,
    default=DEFAULT_LOSSES,
    show_default=True,
    metavar="SPEC",
    help='A loss spec, e.g. "ce(label_smoothing=0.1, reduction=sum)"; repeat for more. '
    "`lossx losses` lists them.",
)
@click.option(
    "--checkpoint",
    type=path_arg(dir_okay=False),
    help="state_dict or `lossx train` checkpoint to export (loaded with weights_only=True).",
)
@click.option(
    "--init",
    type=click.Choice(["trained", "random"]),
    default="trained",
    show_default=True,
    help="Without --checkpoint: the trained weights lossx ships, or seeded random weights.",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random weights.")
@click.option(
    "--train",
    is_flag=True,
    help="Also export train_<loss>.onnx per loss: loss, logits and every parameter's gradient.",
)
@click.option("--input-grad", is_flag=True, help="Training graphs also output grad.images.")
@with_trainable_options
@click.option(
    "--precision",
    type=click.Choice(list(PRECISIONS)),
    default="fp32",
    show_default=True,
    help="The model's precision in model.onnx and the model+loss graphs (losses stay fp32).",
)
@click.option(
    "--calibration-data",
    type=path_arg(),
    help=f"int8: {DATA_HELP}, whose training split calibrates.  [default: 512 CIFAR-10 "
    "training images packaged with lossx]",
)
@click.option(
    "--calibration-images",
    type=click.IntRange(min=1),
    help="int8: how many training images calibrate, at least 256 (drawn with --seed).  "
    "[default: 512]",
)
@click.option(
    "--calibration-method",
    type=click.Choice(CALIBRATION_METHODS),
    help="int8: how activation ranges are chosen.  [default: minmax]",
)
@click.option(
    "--opset",
    type=click.IntRange(MIN_OPSET, 100),
    default=DEFAULT_OPSET,
    show_default=True,
    help=f"ONNX opset, {MIN_OPSET} up to the newest the installed exporter and ONNX Runtime run.",
)
def export(out_dir: Path, losses: tuple[str, ...], **options) -> None:
    """Export the model, each loss and each model+loss graph to OUT_DIR, verified against eager."""
    from lossx.build.preflight import check_export_request

    calibration_options = {
        "data_dir": options.pop("calibration_data"),
        "images": options.pop("calibration_images"),
        "method": options.pop("calibration_method"),
    }
    calibrated = any(v is not None for v in calibration_options.values())
    trains = {k: options[k] for k in ("trainable", "frozen", "frozen_bn")}
    check_export_request(
        out_dir, losses, options["checkpoint"], options["seed"], options["train"],
        options["input_grad"], options["precision"], calibrated, trains,
    )  # fmt: skip
    if PRECISIONS[options["precision"]].calibrated:  # images read and checked before torch
        from lossx.build.calibration import load_calibration

        calibration_options["method"] = calibration_options["method"] or "minmax"
        options["calibration"] = load_calibration(
            seed=options["seed"],
            input_shape=options["input_shape"],
            resize=options["resize"] or "stretch",
            **calibration_options,
        )
    require_export_extra("lossx export")
    import_for_good("lossx.build.export")
    from lossx.build.artifact_writer import export_summary
    from lossx.build.export import export_artifact

    manifest = export_artifact(
        out_dir,
        losses=losses,
        progress=lambda file: click.echo(f"exporting {file}", err=True),
        **options,
    )
    echo(export_summary(manifest, out_dir))
