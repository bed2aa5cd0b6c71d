"""Options several commands share, each checked as it is parsed."""

import functools
from pathlib import Path

import click

from lossx.errors import LossxError
from lossx.files import output_file
from lossx.runtime.options import (
    MAX_SEED,
    MAX_THREADS,
    OPTIMIZATION_LEVELS,
    PROVIDER_CHOICES,
    SessionOptions,
    check_sha256,
    parse_model_args,
)


class PathArg(click.Path):
    """click.Path that refuses an empty string, which pathlib would read as the current
    directory."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path", param, ctx)
        return super().convert(value, param, ctx)


def path_arg(**kwargs) -> PathArg:
    return PathArg(path_type=Path, **kwargs)


def output_check(what: str, text: bool = False):
    """A callback checking, as the options are parsed, that an output file can be written;
    a `text` output may be `-`, stdout (a binary one may not)."""

    def check(ctx, param, value):
        if value is not None and str(value) == "-":
            if not text:
                raise click.BadParameter(f"'-' (stdout) cannot take a {what}; give a file name")
        elif value is not None:
            try:
                output_file(Path(value), what)
            except LossxError as e:
                raise click.BadParameter(str(e), ctx, param) from None
        return value

    return check


STDOUT_HELP = " ('-': stdout, the other output then on stderr)"


SEED = click.IntRange(0, MAX_SEED)


def check_sha256_option(ctx, param, value):
    if value is not None:
        try:
            check_sha256(value)
        except LossxError as e:
            raise click.BadParameter(str(e), ctx, param) from None
    return value


require_sha256_option = click.option(
    "--require-sha256",
    metavar="HEX",
    callback=check_sha256_option,
    help="Refuse the artifact unless its manifest.json has this sha256 (lossx export prints it).",
)


weights_option = click.option(
    "--weights",
    type=path_arg(dir_okay=False),
    help="Run with these weights instead of the artifact's: an .npz by state_dict name, as "
    "`lossx train --engine onnxruntime` writes.",
)


def with_options(command, options):
    for option in reversed(options):
        command = option(command)
    return command


DATA_HELP = (
    "CIFAR-10 (a folder holding cifar-10-batches-py/), an image folder (DIR/<class>/<image>, "
    "optionally under train/ and test/ or val/) or an .npz of images and labels"
)


def with_data_options(command):
    """--data-dir, --split, --limit, --batch-size and --strict: the images eval and check
    read."""
    return with_options(
        command,
        [
            click.option(
                "--data-dir",
                type=path_arg(),
                help=f"{DATA_HELP}; default: the packaged 1,000 CIFAR-10 test images.",
            ),
            click.option(
                "--split", type=click.Choice(["test", "train"]), default="test", show_default=True
            ),
            click.option(
                "--limit", type=click.IntRange(min=1), help="Use only the first N images."
            ),
            click.option(
                "--batch-size", type=click.IntRange(min=1), default=256, show_default=True
            ),
            click.option(
                "--strict",
                is_flag=True,
                help="Refuse a file that cannot be read as an image (default: skip it and "
                "count it in the report).",
            ),
        ],
    )


def _parsed(parse):
    """A click callback applying `parse` (a lossx.runtime.contract parser) to a given value."""

    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return parse(value)
        except LossxError as e:
            raise click.BadParameter(str(e), ctx, param) from None

    return callback


def _numbers(what: str):
    def parse(text: str):
        from lossx.runtime.contract import parse_numbers

        return parse_numbers(text, what)

    return parse


def _shape(text: str):
    from lossx.runtime.contract import parse_shape

    return parse_shape(text)


def _class_names(text: str):
    from lossx.runtime.contract import parse_class_names

    return parse_class_names(text)


def with_contract_options(command):
    """--input-shape, --mean, --std, --class-names and --resize: the image contract a model is
    exported or trained with (lossx.runtime.contract)."""
    return with_options(
        command,
        [
            click.option(
                "--input-shape",
                metavar="C,H,W",
                callback=_parsed(_shape),
                help="The images the model takes.  [default: 3,32,32, CIFAR-10's]",
            ),
            click.option(
                "--mean",
                metavar="M[,M...]",
                callback=_parsed(_numbers("--mean")),
                help="Per-channel mean subtracted after scaling pixels to [0, 1] (one value for "
                "every channel).  [default: 0]",
            ),
            click.option(
                "--std",
                metavar="S[,S...]",
                callback=_parsed(_numbers("--std")),
                help="Per-channel std divided by after the mean.  [default: 1]",
            ),
            click.option(
                "--class-names",
                metavar="A,B,...",
                callback=_parsed(_class_names),
                help="A name per logit.  [default: the dataset's classes, CIFAR-10's for 10 "
                "logits, else the indices]",
            ),
            click.option(
                "--resize",
                type=click.Choice(["stretch", "crop"]),
                help="How image files of another size are fitted: stretched, or the shorter "
                "side fitted and the centre cut out.  [default: stretch]",
            ),
        ],
    )


def _globs(ctx, param, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    globs = tuple(g.strip() for g in value.split(",") if g.strip())
    if not globs:
        raise click.BadParameter("no patterns given", ctx, param)
    return globs


def with_trainable_options(command):
    """--trainable, --frozen and --frozen-bn: which parameters a training step trains."""
    return with_options(
        command,
        [
            click.option(
                "--trainable",
                metavar="GLOB[,GLOB...]",
                callback=_globs,
                help="Train only the parameters these shell globs match (state_dict names, "
                "e.g. 'fc.*'); the others stay as they are.  [default: all]",
            ),
            click.option(
                "--frozen",
                metavar="GLOB[,GLOB...]",
                callback=_globs,
                help="Train all parameters but the ones these globs match.",
            ),
            click.option(
                "--frozen-bn",
                type=click.Choice(["eval", "train"]),
                default="eval",
                show_default=True,
                help="A batch norm whose parameters are all frozen: eval (its running "
                "statistics normalise and stay fixed) or train (batch statistics, running "
                "statistics updated).",
            ),
        ],
    )


def with_session_options(command):
    """--provider, --threads, --optimization and --tf32: how ONNX Runtime runs the graphs,
    given to the command as one value, `session` (a SessionOptions)."""

    @functools.wraps(command)
    def with_session(*args, provider, threads, optimization, tf32, **kwargs):
        session = SessionOptions(provider, threads, optimization, tf32)
        return command(*args, session=session, **kwargs)

    options = [
        click.option(
            "--provider",
            type=click.Choice(PROVIDER_CHOICES),
            default="cpu",
            show_default=True,
            help="Execution provider; cuda fails (exit 3) unless CUDA is really used, auto "
            "takes CUDA when it works.",
        ),
        click.option(
            "--threads",
            type=click.IntRange(1, MAX_THREADS),
            help=f"Intra-op threads, at most 4 per core ({MAX_THREADS} here).  [default: one "
            "per core]",
        ),
        click.option(
            "--optimization",
            type=click.Choice(OPTIMIZATION_LEVELS),
            default="all",
            show_default=True,
            help="ONNX Runtime graph optimisation level.",
        ),
        click.option(
            "--tf32", is_flag=True, help="Let CUDA use TF32 (faster, but not fp32 parity)."
        ),
    ]
    return with_options(with_session, options)


def _model_args(ctx, param, value: tuple[str, ...]) -> dict[str, object]:
    try:
        return parse_model_args(value)
    except LossxError as e:
        raise click.BadParameter(str(e), ctx, param) from None


model_arg_option = click.option(
    "--model-arg",
    "model_args",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_model_args,
    help="A keyword argument of the model's constructor, VALUE a Python literal (e.g. "
    "num_classes=10, dropout=0.0, name='s'); repeatable.",
)


def picture_option(name: str, help: str):
    """An option naming a PNG file to draw to, checked as it is parsed (not `-`)."""
    return click.option(
        name, type=path_arg(dir_okay=False), callback=output_check("picture"), help=help
    )


def given_on_command_line(options: dict) -> dict:
    """The options among `options` that the command line set (not left at their defaults)."""
    ctx = click.get_current_context()
    source = click.core.ParameterSource.COMMANDLINE
    return {name: value for name, value in options.items()
            if ctx.get_parameter_source(name) is source}  # fmt: skip


def artifact_with_weights(artifact_dir: Path, require_sha256: str | None, weights: Path | None):
    from lossx.runtime import load_artifact

    artifact = load_artifact(artifact_dir, require_sha256)
    return artifact if weights is None else artifact.with_weights(weights)
