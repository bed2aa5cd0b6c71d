"""The `lossx` command line: parse, call lossx.build / lossx.runtime / lossx.parity, render.

Every value is checked before any work, and before torch is imported: torch is imported only
by the commands that need it (export, check, eval --compare-eager, train --engine torch), and
in an install without the `export` extra they stop with one line. Neither is numpy nor ONNX
Runtime imported to parse options, so `--help` and bad usage answer at once.

Exit codes: 0 success, 1 parity failure, 2 bad usage or input, 3 environment, 4 export failed,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Every error is one line on stderr.
"""

import atexit
import contextlib
import gc
import importlib
import importlib.util
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import click

from lossx import __version__
from lossx.compare.tolerances import PROFILES, default_profile, resolve_tolerances
from lossx.errors import EnvironmentProblem, LossxError, first_line
from lossx.files import output_file, regular_file, write_atomically
from lossx.runtime.graphs import DEFAULT_MODEL, DEFAULT_OPSET, MIN_OPSET, resolve_losses
from lossx.runtime.loss_specs import DEFAULT_LOSSES, LOSSES, catalogue_text
from lossx.runtime.options import (
    CALIBRATION_METHODS,
    DEFAULT_LR,
    MAX_EPOCHS,
    MAX_SEED,
    MAX_THREADS,
    MAX_TRAIN_BATCH,
    OPTIMIZATION_LEVELS,
    PRECISIONS,
    PROVIDER_CHOICES,
    TrainConfig,
    check_precision,
    check_sha256,
)

EXPORT_EXTRA = "pip install 'lossx[export]'"
RECIPE = TrainConfig()  # the defaults of lossx train's options
INTERRUPTED, TERMINATED = 130, 143  # the shell's codes: 128 + SIGINT, 128 + SIGTERM
USER_EXIT = 2  # a user's code asked to end the process in the middle of a command


class _Path(click.Path):
    """click.Path that refuses an empty string, which pathlib would read as the current
    directory."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path", param, ctx)
        return super().convert(value, param, ctx)


def _path(**kwargs) -> _Path:
    return _Path(path_type=Path, **kwargs)


def _output(what: str, text: bool = False):
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


_STDOUT_HELP = " ('-': stdout, the other output then on stderr)"


_seed = click.IntRange(0, MAX_SEED)


def _sha256(ctx, param, value):
    if value is not None:
        try:
            check_sha256(value)
        except LossxError as e:
            raise click.BadParameter(str(e), ctx, param) from None
    return value


_require_sha256 = click.option(
    "--require-sha256",
    metavar="HEX",
    callback=_sha256,
    help="Refuse the artifact unless its manifest.json has this sha256 (lossx export prints it).",
)


_weights = click.option(
    "--weights",
    type=_path(dir_okay=False),
    help="Run with these weights instead of the artifact's: an .npz by state_dict name, as "
    "`lossx train --engine onnxruntime` writes.",
)


def _with_options(command, options):
    for option in reversed(options):
        command = option(command)
    return command


def _data_options(command):
    """--data-dir, --split, --limit and --batch-size: the CIFAR-10 images eval and check read."""
    return _with_options(
        command,
        [
            click.option(
                "--data-dir",
                type=_path(),
                help="Folder holding cifar-10-batches-py/; default: the packaged 1,000 test "
                "images.",
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
        ],
    )


def _session_options(command):
    """--provider, --threads, --optimization and --tf32: how ONNX Runtime runs the graphs."""
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
    return _with_options(command, options)


_signals: list[int] = []  # the signals this command received


def _on_signal(signum, frame) -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt where the command is, so that it cleans
    up; which one came is remembered, since a library may wrap the exception in its own."""
    _signals.append(signum)
    raise KeyboardInterrupt


def _exit_with(message: str, exit_code: int) -> click.ClickException:
    error = click.ClickException(message)
    error.exit_code = exit_code
    return error


class _ProcessExit(BaseException):
    """os._exit called by code lossx runs (a user's model), turned into an exception."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def _user_code_contained():
    """While a command runs, code it imports or calls (a user's model module) can neither end
    the process nor write into lossx's output: print() and anything else written to stdout go
    to stderr, stdout carrying lossx's own output alone (`_echo`), and os._exit raises
    _ProcessExit in this process (a forked child still exits as it asks); SystemExit is caught
    by `_LossxGroup.invoke`. What no process can intercept (a C library's exit(), a signal
    that kills) is beyond this (docs/security.md)."""
    global _stdout
    pid, real_exit = os.getpid(), os._exit

    def contained_exit(code: int) -> None:
        if os.getpid() != pid:
            real_exit(code)
        raise _ProcessExit(code)

    sys.stdout.flush()
    saved_fd = None
    try:
        saved_fd = os.dup(sys.stdout.fileno())  # a real stdout: redirect the descriptor too
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        _stdout = sys.stdout  # click's CliRunner: no descriptor to redirect
    if saved_fd is not None:
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        _stdout = io.TextIOWrapper(
            io.FileIO(saved_fd, "w", closefd=False),
            encoding=sys.stdout.encoding,
            errors=sys.stdout.errors,
            write_through=True,
        )
    os._exit = contained_exit
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        os._exit = real_exit
        _stdout.flush()
        if saved_fd is not None:
            sys.stdout.flush()
            os.dup2(saved_fd, sys.stdout.fileno())
            os.close(saved_fd)
        _stdout = None


_stdout = None  # where lossx's own output goes while a command runs (_user_code_contained)


def _echo(message: str = "", err: bool = False, nl: bool = True) -> None:
    """click.echo to stdout, which while a command runs carries lossx's output alone (or to
    stderr with `err`)."""
    click.echo(message, file=None if err else _stdout or sys.stdout, err=err, nl=nl)


class _LossxGroup(click.Group):
    """Every error as one line, `Error: ...` on stderr, with its documented exit code: lossx's
    own errors, click's usage errors (with a pointer to --help instead of the usage text),
    interruptions (130 for Ctrl-C, 143 for SIGTERM), and an exit a user's code asked for in
    the middle of a command (2)."""

    def invoke(self, ctx: click.Context):
        try:
            with _user_code_contained():
                return super().invoke(ctx)
        except BaseException as e:
            if _signals or isinstance(e, KeyboardInterrupt):
                if signal.SIGTERM in _signals:
                    raise _exit_with("terminated (SIGTERM)", TERMINATED) from None
                raise _exit_with("interrupted", INTERRUPTED) from None
            if isinstance(e, LossxError):
                raise _exit_with(str(e), e.exit_code) from None
            if isinstance(e, SystemExit | _ProcessExit):
                how = "os._exit" if isinstance(e, _ProcessExit) else "sys.exit"
                raise _exit_with(
                    f"code lossx {ctx.invoked_subcommand} ran (your model's module) called "
                    f"{how}({e.code!r}); lossx stopped there, and what it writes appears whole "
                    "or not at all",
                    USER_EXIT,
                ) from None
            raise

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _signals.clear()
        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = super().main(
                args, prog_name or "lossx", complete_var, standalone_mode=False, **extra
            )
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            code = e.exit_code
        except click.ClickException as e:
            message = first_line(click.ClickException(e.format_message()))
            if isinstance(e, click.UsageError) and e.ctx is not None:
                message += f" (see {e.ctx.command_path} --help)"
            click.echo(f"Error: {message}", err=True)
            code = e.exit_code
        except click.exceptions.Abort:  # Ctrl-C while click itself was parsing
            click.echo("Error: interrupted", err=True)
            code = INTERRUPTED
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(cls=_LossxGroup)
@click.version_option(__version__, prog_name="lossx")
def main() -> None:
    """Export a CIFAR-10 model and its losses to ONNX, evaluate them, prove parity."""


@main.command(short_help="Export a model and its losses to ONNX graphs, each verified.")
@click.argument("out_dir", type=_path())
@click.option(
    "--model",
    "model_name",
    default=DEFAULT_MODEL,
    show_default=True,
    metavar="NAME|MODULE:ATTR",
    help="A registry model, or your own: MODULE:ATTR, an nn.Module subclass or a function "
    "returning one (imported with the current directory first on sys.path).",
)
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
    type=_path(dir_okay=False),
    help="state_dict or `lossx train` checkpoint to export (loaded with weights_only=True).",
)
@click.option(
    "--init",
    type=click.Choice(["trained", "random"]),
    default="trained",
    show_default=True,
    help="Without --checkpoint: the trained weights lossx ships, or seeded random weights.",
)
@click.option(
    "--seed", type=_seed, default=0, show_default=True, help="Seed of the random weights."
)
@click.option(
    "--train",
    is_flag=True,
    help="Also export train_<loss>.onnx per loss: loss, logits and every parameter's gradient.",
)
@click.option("--input-grad", is_flag=True, help="Training graphs also output grad.images.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="The model's precision in model.onnx and the model+loss graphs (losses stay fp32).",
)
@click.option(
    "--calibration-data",
    type=_path(),
    help="int8: a folder holding cifar-10-batches-py/ whose training split calibrates.  "
    "[default: 512 training images packaged with lossx]",
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
    from lossx.files import check_destination
    from lossx.runtime.artifact import MANIFEST_FILE

    specs = resolve_losses(losses)
    if options["input_grad"] and not options["train"]:
        raise click.UsageError("--input-grad adds grad.images to training graphs; it needs --train")
    calibration_options = {
        "data_dir": options.pop("calibration_data"),
        "images": options.pop("calibration_images"),
        "method": options.pop("calibration_method"),
    }
    calibrated = any(v is not None for v in calibration_options.values())
    check_precision(options["precision"], options["train"], calibrated)
    if options["checkpoint"] is not None:
        _checkpoint_file(options["checkpoint"], ("npz", "torch"))
    check_destination(out_dir, MANIFEST_FILE)
    if options["precision"] == "int8":  # its images are read and checked before torch loads
        from lossx.runtime.calibration import load_calibration

        calibration_options["method"] = calibration_options["method"] or "minmax"
        options["calibration"] = load_calibration(seed=options["seed"], **calibration_options)
    _require_export_extra("lossx export")
    _import_for_good("lossx.build.export")
    from lossx.build.export import export_artifact, export_summary

    manifest = export_artifact(
        out_dir,
        losses=specs,
        progress=lambda file: click.echo(f"exporting {file}", err=True),
        **options,
    )
    _echo(export_summary(manifest, out_dir))


@main.command(short_help="Classify image files with an artifact's model.")
@click.argument("artifact_dir", type=_path())
@click.argument("images", nargs=-1, required=True, type=_path())
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many classes per image, at most the model's classes.",
)
@_session_options
@_require_sha256
@_weights
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
def predict(
    artifact_dir: Path,
    images: tuple[Path, ...],
    top_k: int,
    as_json: bool,
    require_sha256: str | None,
    weights: Path | None,
    **session_options,
) -> None:
    """Classify IMAGES (PNG, JPEG, ...) with the model in ARTIFACT_DIR."""
    from lossx.runtime import open_artifact

    runtime = open_artifact(
        artifact_dir, manifest_sha256=require_sha256, weights=weights, **session_options
    )
    predictions = runtime.predict_files(list(images), top_k)
    _echo(json.dumps(predictions.to_dict(), indent=2) if as_json else predictions.to_text())


@main.command(short_help="Check every graph of an artifact against eager PyTorch: a CI gate.")
@click.argument("artifact_dir", type=_path())
@click.option(
    "--checkpoint",
    type=_path(dir_okay=False),
    help="Eager weights from this checkpoint instead of the artifact's weights.npz.",
)
@click.option(
    "--baseline",
    type=_path(),
    help="Compare with this artifact's ONNX Runtime outputs instead of eager PyTorch.",
)
@click.option(
    "--model",
    "model_name",
    metavar="NAME|MODULE:ATTR",
    help="The eager model, a registry name or MODULE:ATTR, instead of the one the manifest "
    "records (e.g. after its module moved); it must take the artifact's weights.",
)
@_data_options
@_session_options
@click.option(
    "--tolerance-profile",
    type=click.Choice(list(PROFILES)),
    help="Default tolerances.  [default: fp32-cuda on CUDA, else fp32-cpu]",
)
@click.option("--atol", type=float, help="Absolute tolerance for every output.")
@click.option("--rtol", type=float, help="Relative tolerance for every output.")
@click.option(
    "--atol-for",
    multiple=True,
    metavar="OUTPUT=X",
    help="Absolute tolerance for one output (logits, or graph/output); repeatable.",
)
@click.option("--seed", type=_seed, default=0, show_default=True, help="Seed of the random inputs.")
@click.option(
    "--report-json",
    type=_path(),
    callback=_output("report", text=True),
    help="Write the JSON report" + _STDOUT_HELP + ".",
)
@click.option(
    "--junit-xml",
    type=_path(),
    callback=_output("report", text=True),
    help="Write a JUnit XML report" + _STDOUT_HELP + ".",
)
@click.option(
    "--markdown",
    type=_path(),
    callback=_output("report", text=True),
    help="Write a Markdown summary" + _STDOUT_HELP + ".",
)
@_require_sha256
@_weights
@click.option(
    "--repro",
    type=_path(dir_okay=False),
    callback=_output("repro file"),
    help="On a parity failure, save the failing inputs and both outputs here.  [default: "
    "lossx-check-failure.npz beside the first report written, else not saved]",
)
def check(
    artifact_dir: Path,
    checkpoint: Path | None,
    baseline: Path | None,
    model_name: str | None,
    data_dir: Path | None,
    split: str,
    limit: int | None,
    batch_size: int,
    tolerance_profile: str | None,
    atol: float | None,
    rtol: float | None,
    atol_for: tuple[str, ...],
    seed: int,
    report_json: Path | None,
    junit_xml: Path | None,
    markdown: Path | None,
    require_sha256: str | None,
    weights: Path | None,
    repro: Path | None,
    **session_options,
) -> None:
    """Check every graph in ARTIFACT_DIR against eager PyTorch (or --baseline): a CI gate.

    Exit codes: 0 all outputs within tolerance, 1 a parity failure, 2 a usage or input error,
    3 an environment problem (e.g. the requested provider is not really available).
    """
    from lossx.runtime import load_artifact, load_cifar10
    from lossx.runtime.feeds import check_batch_size

    if checkpoint is not None and baseline is not None:
        raise click.UsageError("--checkpoint and --baseline exclude each other")
    if model_name is not None and baseline is not None:
        raise click.UsageError("--model and --baseline exclude each other")
    reports = {"json": report_json, "junit": junit_xml, "markdown": markdown}
    to_stdout = [kind for kind, path in reports.items() if str(path) == "-"]
    if len(to_stdout) > 1:
        raise click.UsageError("only one of --report-json, --junit-xml and --markdown can be '-'")
    files = {kind: path for kind, path in reports.items() if kind not in to_stdout}
    resolve_tolerances(tolerance_profile or "fp32-cpu", atol, rtol, atol_for)  # refused first
    check_batch_size(batch_size)
    _require_export_extra("lossx check")
    artifact = _load_artifact(artifact_dir, require_sha256, weights)
    if checkpoint is not None:
        _checkpoint_file(checkpoint, ("npz", "torch"))
    reference = load_artifact(baseline) if baseline is not None else checkpoint
    data = load_cifar10(data_dir, split, limit, stream=True)
    profile, fp32_profile = _profiles(artifact, session_options, tolerance_profile)
    tolerances = resolve_tolerances(profile, atol, rtol, atol_for, fp32_profile)
    tolerances.check_names([entry.spec for entry in artifact.manifest.graphs])
    from lossx.compare.render import RENDERERS, repro_beside, to_text, write_reports
    from lossx.parity.check import check_artifact

    report = check_artifact(
        artifact,
        data,
        tolerances,
        profile,
        reference=reference,
        batch_size=batch_size,
        seed=seed,
        session_options=session_options,
        repro=repro or repro_beside(list(files.values())),
        progress=lambda inputs: click.echo(f"compared {inputs.label}", err=True),
        model_name=model_name,
    )
    _echo(to_text(report), err=bool(to_stdout))
    write_reports(report, files)
    if to_stdout:
        _echo(RENDERERS[to_stdout[0]](report), nl=False)
    report.raise_if_failed()


@main.command(short_help="List the losses and their options.")
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def losses(as_json: bool) -> None:
    """List the losses `lossx export --loss` takes, with their options and defaults."""
    if as_json:
        _echo(json.dumps([info.to_dict() for info in LOSSES.values()], indent=2))
    else:
        _echo(catalogue_text())


@main.command(name="eval", short_help="Evaluate an artifact on CIFAR-10 with ONNX Runtime.")
@click.argument("artifact_dir", type=_path())
@_data_options
@_session_options
@click.option(
    "--json",
    "json_path",
    type=_Path(),
    callback=_output("JSON", text=True),
    help="Also write the figures as JSON to this path ('-': stdout, the table then on stderr).",
)
@click.option(
    "--download",
    is_flag=True,
    help="Fetch CIFAR-10 into --data-dir first (needs torchvision and a network).",
)
@_require_sha256
@_weights
@click.option(
    "--jpeg-quality",
    type=click.IntRange(1, 95),
    help="Score JPEG copies of the images instead: each saved by Pillow at this quality (4:2:0 "
    "chroma) and decoded, as a JPEG photo reaches the model.",
)
@click.option("--compare-eager", is_flag=True, help="Also run eager PyTorch and check parity.")
@click.option("--atol", type=float, help="Absolute tolerance for --compare-eager.")
@click.option("--rtol", type=float, help="Relative tolerance for --compare-eager.")
def eval_(
    artifact_dir: Path,
    data_dir: Path | None,
    split: str,
    batch_size: int,
    limit: int | None,
    json_path: str | None,
    download: bool,
    require_sha256: str | None,
    weights: Path | None,
    jpeg_quality: int | None,
    compare_eager: bool,
    atol: float | None,
    rtol: float | None,
    **session_options,
) -> None:
    """Evaluate the artifact in ARTIFACT_DIR on CIFAR-10 with ONNX Runtime."""
    from lossx.compare.render import strict_json, to_text
    from lossx.runtime import evaluate, load_cifar10
    from lossx.runtime.feeds import check_batch_size

    if (atol is not None or rtol is not None) and not compare_eager:
        raise click.UsageError("--atol and --rtol apply only with --compare-eager")
    resolve_tolerances("fp32-cpu", atol, rtol)  # a meaningless tolerance is refused first
    if compare_eager:
        _require_export_extra("--compare-eager", ("torch",))
    if download:
        if data_dir is None:
            raise click.UsageError("--download needs --data-dir")
        _require_export_extra("--download", ("torchvision",))
        from lossx.build.download import download_cifar10

        download_cifar10(data_dir)
    artifact = _load_artifact(artifact_dir, require_sha256, weights)
    data = load_cifar10(data_dir, split, limit, stream=True)
    if jpeg_quality is not None:
        from lossx.runtime.images import as_jpeg

        data = as_jpeg(data, jpeg_quality)
    check_batch_size(batch_size)
    profile, fp32_profile = _profiles(artifact, session_options)  # a provider problem stops here
    tolerances = None
    if compare_eager:
        tolerances = resolve_tolerances(profile, atol, rtol, fp32_profile=fp32_profile)
    with _progress(len(data), "evaluating") as bar:
        result = evaluate(artifact, data, batch_size, progress=bar.update, **session_options)
    to_stderr = json_path == "-"  # stdout then carries the JSON alone
    _echo(result.to_text(), err=to_stderr)
    report = None
    if compare_eager:
        from lossx.parity.check import compare_with_eager

        with _progress(len(data), "comparing with eager PyTorch") as bar:
            report = compare_with_eager(
                artifact, data, tolerances, profile, batch_size, session_options,
                progress=lambda inputs: bar.update(len(inputs.labels)),
            )  # fmt: skip
        _echo("\n" + to_text(report), err=to_stderr)
    if json_path:
        payload = {"eval": result.to_dict(), "parity": report.to_dict() if report else None}
        _write_text(json_path, strict_json(payload) + "\n")
    if report:
        report.raise_if_failed()


@main.command(short_help="Train a model with eager PyTorch or an artifact in ONNX Runtime.")
@click.argument("artifact_dir", required=False, type=_path())
@click.option(
    "--engine",
    type=click.Choice(["torch", "onnxruntime"]),
    default="torch",
    show_default=True,
    help="torch: eager PyTorch and autograd. onnxruntime: ARTIFACT_DIR's training graph in ONNX "
    "Runtime with numpy updates, no torch (export it with --train).",
)
@click.option(
    "--data-dir",
    type=_path(),
    help="Folder holding cifar-10-batches-py/ with the training batches (required).",
)
@click.option(
    "--model",
    default=RECIPE.model,
    show_default=True,
    metavar="NAME|MODULE:ATTR",
    help="--engine torch: a registry model or your own MODULE:ATTR (as for export).",
)
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
    type=click.Choice(["sgd", "adamw"]),
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
@click.option("--seed", type=_seed, default=RECIPE.seed, show_default=True)
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
    type=_path(dir_okay=False),
    callback=_output("checkpoint"),
    help="Checkpoint written after every epoch.  [default: checkpoint.pt (torch), trained.npz "
    "(onnxruntime)]",
)
@click.option(
    "--resume",
    type=_path(dir_okay=False),
    help="Continue the run saved in this checkpoint, with the recipe it was saved with: a "
    "recipe option that differs from it is refused.",
)
@click.option(
    "--log-json",
    type=_path(),
    callback=_output("log", text=True),
    help="Write one JSON line per epoch" + _STDOUT_HELP + ".",
)
@click.option(
    "--write-plan",
    type=_path(dir_okay=False),
    callback=_output("plan"),
    help="Do not train: write the steps this recipe takes (batches, LR, momentum) to this .npz "
    "for another runtime to replay (examples/node/train.js, examples/web).",
)
@_session_options
def train(
    artifact_dir: Path | None,
    engine: str,
    data_dir: Path | None,
    out: Path | None,
    resume: Path | None,
    log_json: Path | None,
    write_plan: Path | None,
    provider: str,
    threads: int | None,
    optimization: str,
    tf32: bool,
    **recipe,
) -> None:
    """Train the model on the CIFAR-10 training split: with eager PyTorch, or with ARTIFACT_DIR's
    training graph in ONNX Runtime (--engine onnxruntime). Both follow the same recipe: from
    the same weights and seed they take the same steps, to float rounding."""
    if data_dir is None:
        raise click.UsageError("--data-dir is required: the training images do not ship with lossx")
    if write_plan is not None:
        _write_plan(write_plan, data_dir, TrainConfig(**recipe))
        return
    if engine == "torch" and artifact_dir is not None:
        raise click.UsageError(
            "ARTIFACT_DIR is for --engine onnxruntime; --engine torch needs none"
        )
    if engine == "onnxruntime" and artifact_dir is None:
        raise click.UsageError("--engine onnxruntime needs ARTIFACT_DIR (exported with --train)")
    if engine == "onnxruntime" and recipe["model"] != RECIPE.model:
        raise click.UsageError("--model is for --engine torch; onnxruntime trains ARTIFACT_DIR's")
    config = TrainConfig(**recipe)
    config.validate()
    given = _given_on_command_line(recipe)  # with --resume, each must agree with the checkpoint
    from lossx.files import input_folder

    input_folder(data_dir, "data directory")
    kinds = ("torch",) if engine == "torch" else ("npz",)
    if resume is not None:
        _checkpoint_file(resume, kinds)
    out = out or Path("checkpoint.pt" if engine == "torch" else "trained.npz")
    if out.exists() and out != resume:  # by kind here; the engine then reads it whole
        _checkpoint_file(out, kinds, overwrite=True)
    if engine == "torch":
        _require_export_extra("lossx train --engine torch", ("torch",))
        from lossx.build.torch_engine import train as run_training
    else:
        from functools import partial

        from lossx.runtime import load_artifact
        from lossx.runtime.ort_engine import train as train_onnxruntime

        options = {"provider": provider, "threads": threads, "optimization": optimization,
                   "tf32": tf32}  # fmt: skip
        run_training = partial(train_onnxruntime, load_artifact(artifact_dir),
                               session_options=options)  # fmt: skip
    with _EpochProgress(log_json) as progress:
        history = run_training(data_dir, out, None if resume else config, resume=resume,
                               on_batch=progress.batch, on_epoch=progress.epoch,
                               given=given)  # fmt: skip
    if history:
        last = history[-1]
        _echo(
            f"wrote {out}: epoch {last.epoch}/{last.epochs}, {last.eval_split} accuracy "
            f"{last.eval_accuracy:.2%}"
        )


def _given_on_command_line(options: dict) -> dict:
    """The options among `options` that the command line set (not left at their defaults)."""
    ctx = click.get_current_context()
    source = click.core.ParameterSource.COMMANDLINE
    return {name: value for name, value in options.items()
            if ctx.get_parameter_source(name) is source}  # fmt: skip


def _write_plan(path: Path, data_dir: Path, config: TrainConfig) -> None:
    if config.optimizer != "sgd":
        raise click.UsageError("--write-plan records SGD steps; --optimizer adamw has no plan")
    config.validate()
    from lossx.files import input_folder
    from lossx.runtime.plan import write_plan

    input_folder(data_dir, "data directory")
    steps, images = write_plan(path, data_dir, config)
    _echo(
        f"wrote {path}: {steps} steps, {images:,} images in batches of {config.batch_size} "
        f"({path.stat().st_size:,} bytes)"
    )


class _EpochProgress:
    """Progress per epoch on stderr, then one line per epoch on stdout, and JSON lines to the
    --log-json file (or to stdout, `-`, the epoch lines then going to stderr)."""

    def __init__(self, log_json: Path | None) -> None:
        self.log_json = log_json
        self.log = None
        self.bar = None
        self.done = 0

    def __enter__(self) -> "_EpochProgress":
        if self.log_json and str(self.log_json) != "-":
            try:
                self.log = self.log_json.open("w", encoding="utf-8")
            except OSError as e:
                raise LossxError(f"cannot write {self.log_json}: {e.strerror}") from None
        return self

    def __exit__(self, *exc) -> None:
        self._close_bar()
        if self.log:
            self.log.close()

    def batch(self, epoch: int, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = _progress(total, f"epoch {epoch}", "images").__enter__()
            self.done = 0
        self.bar.update(done - self.done)
        self.done = done

    def epoch(self, result) -> None:
        self._close_bar()
        to_stdout = str(self.log_json) == "-"
        _echo(result.to_line(), err=to_stdout)
        line = json.dumps(result.to_dict())
        if to_stdout:
            _echo(line)
        elif self.log:
            self.log.write(line + "\n")
            self.log.flush()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _require_export_extra(what: str, modules: tuple[str, ...] = ("torch", "onnxscript")) -> None:
    """Exit 3 in one line where the `export` extra (torch and the exporter) is not installed."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise EnvironmentProblem(
            f"{what} needs {' and '.join(missing)}, which this install lacks; install "
            f"{EXPORT_EXTRA}"
        )


def _import_for_good(module: str) -> None:
    """Import `module` (torch and its exporter: some 340k objects that live until exit) with
    the garbage collector paused, then freeze every object, now and again at exit: collections
    found little to free among them, yet each full one, the last at exit included, walked them
    all (about 1 s of an export here). Only a first import does this, so a process that had
    imported it before (a test session) keeps its own collector as it was."""
    if module in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        importlib.import_module(module)
    finally:
        if enabled:
            gc.enable()
    gc.freeze()
    atexit.register(gc.freeze)


def _checkpoint_file(path: Path, kinds: tuple[str, ...], overwrite: bool = False) -> None:
    """Refuse a checkpoint file that is not of `kinds` by content ("npz", "torch"), before torch
    is imported; with `overwrite`, a file about to be overwritten (lossx.runtime.trainer then
    refuses one that is of the kind but not the engine's checkpoint)."""
    from lossx.errors import CheckpointError
    from lossx.runtime.artifact import file_kind

    what = "--out" if overwrite else "checkpoint"
    kind = file_kind(regular_file(path, what, CheckpointError))
    if kind not in kinds:
        names = {"npz": "an .npz", "torch": "a torch checkpoint"}
        described = names.get(kind, kind)
        wanted = " or ".join(names[k] for k in kinds)
        if overwrite:
            raise CheckpointError(
                f"--out {path} exists and is {described}, not {wanted} of this engine; "
                "refusing to overwrite it (choose another --out)"
            )
        raise CheckpointError(f"checkpoint {path} is {described}; expected {wanted}")


def _load_artifact(artifact_dir: Path, require_sha256: str | None, weights: Path | None):
    from lossx.runtime import load_artifact

    artifact = load_artifact(artifact_dir, require_sha256)
    return artifact if weights is None else artifact.with_weights(weights)


def _fp32_profile(artifact, session_options: dict) -> str:
    """The fp32 profile of the provider ONNX Runtime really uses (exit 3 when it cannot)."""
    from lossx.runtime.session import provider_names

    return default_profile(provider_names(artifact.session("model", **session_options))[0])


def _profiles(artifact, session_options: dict, chosen: str | None = None):
    """The tolerance profile of the artifact's precision (`chosen` if given), and the fp32
    profile of the graphs it keeps fp32 (None where that is the same profile)."""
    fp32 = _fp32_profile(artifact, session_options)
    precision = artifact.manifest.precision_name
    if chosen is not None:
        return chosen, None
    return (fp32, None) if precision == "fp32" else (precision, fp32)


def _progress(total: int, label: str, unit: str = "images"):
    """Progress on stderr: a bar on a terminal; elsewhere (a CI log, a file) a line every
    PROGRESS_SECONDS, so that a long command shows it is alive."""
    if sys.stderr.isatty():
        return click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True)
    return _ProgressLines(total, label, unit)


PROGRESS_SECONDS = 10.0


class _ProgressLines:
    """click.progressbar's interface, writing `label: done/total unit (percent), rate` lines to
    stderr at most every PROGRESS_SECONDS, and once at the end."""

    def __init__(self, total: int, label: str, unit: str) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.done = 0

    def __enter__(self) -> "_ProgressLines":
        self.started = self.last = time.monotonic()
        return self

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            self._line(now)

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self.last > self.started:  # it has printed: say it finished
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-9)
        share = self.done / self.total if self.total else 1.0
        click.echo(f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({share:.0%}), "
                   f"{rate:,.0f} {self.unit}/s", err=True)  # fmt: skip


def _write_text(path: str, text: str) -> None:
    if path == "-":
        _echo(text, nl=False)
    else:
        write_atomically(Path(path), lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
