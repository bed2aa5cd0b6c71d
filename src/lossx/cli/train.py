"""`lossx train`, with either engine, and its --write-plan."""

from pathlib import Path

import click

from lossx.build.torch_side import require_export_extra
from lossx.cli.app import echo, main, write_picture
from lossx.cli.options import (
    DATA_HELP,
    SEED,
    STDOUT_HELP,
    given_on_command_line,
    model_arg_option,
    output_check,
    path_arg,
    picture_option,
    with_contract_options,
    with_session_options,
    with_trainable_options,
)
from lossx.cli.progress import EpochProgress
from lossx.runtime.options import SessionOptions
from lossx.training.recipe import (
    CONTRACT_FIELDS,
    DEFAULT_LR,
    MAX_ACCUMULATE,
    MAX_EPOCHS,
    MAX_TRAIN_BATCH,
    OPTIMIZERS,
    TrainConfig,
)

RECIPE = TrainConfig()  # the defaults of lossx train's options


@main.command(short_help="Train a model with eager PyTorch or an artifact in ONNX Runtime.")
@click.argument("artifact_dir", required=False, type=path_arg())
@click.option(
    "--engine",
    type=click.Choice(["torch", "onnxruntime"]),
    default="torch",
    show_default=True,
    help="torch: eager PyTorch and autograd. onnxruntime: ARTIFACT_DIR's training and optimizer "
    "graphs in ONNX Runtime, no torch (export it with --train).",
)
@click.option(
    "--data-dir",
    type=path_arg(),
    help=f"{DATA_HELP} (required). A dataset of one split needs --holdout.",
)
@click.option(
    "--model",
    default=RECIPE.model,
    show_default=True,
    metavar="NAME|MODULE:ATTR",
    help="--engine torch: a registry model or your own MODULE:ATTR (as for export).",
)
@model_arg_option
@with_contract_options
@with_trainable_options
@click.option("--epochs", type=click.IntRange(1, MAX_EPOCHS), default=RECIPE.epochs,
              show_default=True, help="Passes over the training images.")  # fmt: skip
@click.option("--batch-size", type=click.IntRange(1, MAX_TRAIN_BATCH), default=RECIPE.batch_size,
              show_default=True, help="Images per step.")  # fmt: skip
@click.option(
    "--lr",
    type=float,
    help="Peak one-cycle LR.  [default: "
    + ", ".join(f"{lr:g} ({name})" for name, lr in DEFAULT_LR.items())
    + "]",
)
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    default=RECIPE.optimizer,
    show_default=True,
)
@click.option("--weight-decay", type=float, default=RECIPE.weight_decay, show_default=True)
@click.option(
    "--loss",
    default=RECIPE.loss,
    show_default=True,
    metavar="SPEC",
    help='Loss spec, e.g. "ce(label_smoothing=0.1)"; targets are the labels or their one-hot '
    "vectors.",
)
@click.option(
    "--clip-norm",
    type=float,
    default=RECIPE.clip_norm,
    show_default=True,
    help="Clip the gradients' global norm to this (0: no clipping).",
)
@click.option(
    "--accumulate",
    type=click.IntRange(1, MAX_ACCUMULATE),
    default=RECIPE.accumulate,
    show_default=True,
    metavar="K",
    help="Step the optimizer after every K batches, on the mean of their gradients (an "
    "effective batch of K x --batch-size; batch norms still see --batch-size).",
)
@click.option(
    "--augment/--no-augment",
    default=RECIPE.augment,
    show_default=True,
    help="Random 4-pixel-padded crops and left-right flips.",
)
@click.option(
    "--jpeg-augment/--no-jpeg-augment",
    default=RECIPE.jpeg_augment,
    show_default=True,
    help="JPEG-compress each training image with probability 0.5, at a quality drawn from "
    "50..95 (Pillow), before cropping.",
)
@click.option("--seed", type=SEED, default=RECIPE.seed, show_default=True)
@click.option(
    "--limit", type=click.IntRange(min=1), help="Train on the first N training images only."
)
@click.option(
    "--holdout",
    type=click.IntRange(min=0),
    default=RECIPE.holdout,
    show_default=True,
    help="Hold out the last N training images and evaluate on them instead of the test images.",
)
@click.option(
    "--out",
    type=path_arg(dir_okay=False),
    callback=output_check("checkpoint"),
    help="Checkpoint written after every epoch.  [default: checkpoint.pt (torch), trained.npz "
    "(onnxruntime)]",
)
@click.option(
    "--resume",
    type=path_arg(dir_okay=False),
    help="Continue the run saved in this checkpoint, with the recipe it was saved with: a "
    "recipe option that differs from it is refused.",
)
@click.option(
    "--log-json",
    type=path_arg(),
    callback=output_check("log", text=True),
    help="Write one JSON line per epoch" + STDOUT_HELP + ".",
)
@picture_option(
    "--curve-png",
    "When the run ends, draw its losses and accuracy per epoch (the whole log, resumed epochs "
    "included) to this PNG.",
)
@click.option(
    "--write-plan",
    type=path_arg(dir_okay=False),
    callback=output_check("plan"),
    help="Do not train: write the steps this recipe takes (batches, LR, momentum) to this .npz "
    "for another runtime to replay (examples/node/train.js, examples/web).",
)
@with_session_options
def train(
    artifact_dir: Path | None,
    engine: str,
    data_dir: Path | None,
    out: Path | None,
    resume: Path | None,
    log_json: Path | None,
    curve_png: Path | None,
    write_plan: Path | None,
    session: SessionOptions,
    **recipe,
) -> None:
    """Train the model on a dataset's training split: with eager PyTorch, or with
    ARTIFACT_DIR's training graph in ONNX Runtime (--engine onnxruntime). Both follow the same
    recipe: from the same weights and seed they take the same steps, to float rounding."""
    if data_dir is None:
        raise click.UsageError("--data-dir is required: the training images do not ship with lossx")
    recipe["resize"] = recipe["resize"] or RECIPE.resize
    if write_plan is not None:
        write_training_plan(write_plan, data_dir, TrainConfig(**recipe))
        return
    if engine == "torch" and artifact_dir is not None:
        raise click.UsageError(
            "ARTIFACT_DIR is for --engine onnxruntime; --engine torch needs none"
        )
    if engine == "onnxruntime" and artifact_dir is None:
        raise click.UsageError("--engine onnxruntime needs ARTIFACT_DIR (exported with --train)")
    if engine == "onnxruntime" and (recipe["model"] != RECIPE.model or recipe["model_args"]):
        raise click.UsageError(
            "--model and --model-arg are for --engine torch; onnxruntime trains ARTIFACT_DIR's"
        )
    given = given_on_command_line(recipe)  # with --resume, each must agree with the checkpoint
    contract_given = sorted(set(given) & set(CONTRACT_FIELDS))
    if engine == "onnxruntime" and contract_given:
        options = ", ".join(f"--{name.replace('_', '-')}" for name in contract_given)
        raise click.UsageError(
            f"{options}: --engine onnxruntime trains ARTIFACT_DIR's model on the images its "
            "manifest describes"
        )
    config = TrainConfig(**recipe)
    config.validate()
    check_data(data_dir)
    kinds = ("torch",) if engine == "torch" else ("npz",)
    if resume is not None:
        from lossx.training.checkpoints import check_checkpoint_kind

        check_checkpoint_kind(resume, kinds)
    out = out or Path("checkpoint.pt" if engine == "torch" else "trained.npz")
    if out.exists() and out != resume:  # by kind here; the engine then reads it whole
        from lossx.training.checkpoints import check_checkpoint_kind

        check_checkpoint_kind(out, kinds, overwrite=True)
    if engine == "torch":
        require_export_extra("lossx train --engine torch", ("torch",))
        from lossx.build.torch_engine import train as run_training
    else:
        from functools import partial

        from lossx.runtime import load_artifact
        from lossx.training.ort_engine import train as train_onnxruntime

        run_training = partial(train_onnxruntime, load_artifact(artifact_dir),
                               options=session)  # fmt: skip
    with EpochProgress(log_json) as progress:
        history = run_training(data_dir, out, None if resume else config, resume=resume,
                               on_batch=progress.batch, on_epoch=progress.epoch,
                               given=given)  # fmt: skip
    if history:
        last = history[-1]
        echo(
            f"wrote {out}: epoch {last.epoch}/{last.epochs}, {last.eval_split} accuracy "
            f"{last.eval_accuracy:.2%}"
        )
        if curve_png is not None:
            write_training_curve(curve_png, history, out)


def write_training_curve(path: Path, history: list, checkpoint: Path) -> None:
    """The run's log as two panels: the train and eval losses, and the eval accuracy."""
    from lossx.runtime.pictures import line_chart_png

    split = history[-1].eval_split
    losses = {"train loss": [e.train_loss for e in history],
              f"{split} cross-entropy": [e.eval_loss for e in history]}  # fmt: skip
    accuracy = {f"{split} accuracy": [100 * e.eval_accuracy for e in history]}
    picture = line_chart_png(
        f"training of {checkpoint}: {len(history)} epochs",
        [e.epoch for e in history],
        [("loss", losses, "{:.3f}"), ("accuracy, %", accuracy, "{:.1f}")],
    )
    write_picture(path, picture, "the training curve")


def write_training_plan(path: Path, data_dir: Path, config: TrainConfig) -> None:
    config.validate()
    from lossx.training.plan import write_plan

    check_data(data_dir)
    steps, images = write_plan(path, data_dir, config)
    echo(
        f"wrote {path}: {steps} steps, {images:,} images in batches of {config.batch_size} "
        f"({path.stat().st_size:,} bytes)"
    )


def check_data(data: Path) -> None:
    """Refuse a --data-dir that is neither a folder nor a file, before anything starts."""
    from lossx.errors import DataError
    from lossx.files import input_folder, regular_file
    from lossx.runtime.datasets import is_npz

    if data.is_file() or is_npz(data):
        regular_file(data, "data file", DataError)
    else:
        input_folder(data, "data directory")
