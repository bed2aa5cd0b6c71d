"""The `lossx` command line: parse, call lossx.build / lossx.runtime, render.

torch is imported only by the commands that need it (export, eval --compare-eager).
Exit codes: 0 success, 1 parity failure, 2 bad usage or input, 3 environment, 4 export failed.
"""

import importlib.util
import json
import sys
from pathlib import Path

import click

from lossx import __version__
from lossx.errors import EnvironmentProblem, LossxError, ParityError
from lossx.files import write_atomically
from lossx.parity.report import PROFILES
from lossx.runtime.artifact import MANIFEST_FILE, sha256_of
from lossx.runtime.graphs import DEFAULT_OPSET, MIN_OPSET
from lossx.runtime.losses import LOSSES, format_value, parse_loss_spec
from lossx.runtime.session import OPTIMIZATION_LEVELS, PROVIDER_CHOICES

DEFAULT_LOSSES = ("ce", "mse", "l1")


_require_sha256 = click.option(
    "--require-sha256",
    metavar="HEX",
    help="Refuse the artifact unless its manifest.json has this sha256 (lossx export prints it).",
)


_weights = click.option(
    "--weights",
    type=click.Path(path_type=Path, dir_okay=False),
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
                type=click.Path(path_type=Path),
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
            type=click.IntRange(min=1),
            help="Intra-op threads.  [default: one per core]",
        ),
        click.option(
            "--optimization",
            type=click.Choice(list(OPTIMIZATION_LEVELS)),
            default="all",
            show_default=True,
            help="ONNX Runtime graph optimisation level.",
        ),
        click.option(
            "--tf32", is_flag=True, help="Let CUDA use TF32 (faster, but not fp32 parity)."
        ),
    ]
    return _with_options(command, options)


class _LossxGroup(click.Group):
    """Turns LossxError into a one-line `Error: ...` on stderr and its documented exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LossxError as e:
            error = click.ClickException(str(e))
            error.exit_code = e.exit_code
            raise error from None


@click.group(cls=_LossxGroup)
@click.version_option(__version__, prog_name="lossx")
def main() -> None:
    """Export a CIFAR-10 model and its losses to ONNX, evaluate them, prove parity."""


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--model", "model_name", default="tudui", show_default=True, help="Model name.")
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
    type=click.Path(path_type=Path, dir_okay=False),
    help="state_dict or `lossx train` checkpoint to export (loaded with weights_only=True).",
)
@click.option(
    "--init",
    type=click.Choice(["trained", "random"]),
    default="trained",
    show_default=True,
    help="Without --checkpoint: the trained weights lossx ships, or seeded random weights.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option(
    "--train",
    is_flag=True,
    help="Also export train_<loss>.onnx per loss: loss, logits and every parameter's gradient.",
)
@click.option("--input-grad", is_flag=True, help="Training graphs also output grad.images.")
@click.option(
    "--opset",
    default=DEFAULT_OPSET,
    show_default=True,
    help=f"ONNX opset, {MIN_OPSET} up to the newest the installed exporter and ONNX Runtime run.",
)
def export(
    out_dir: Path,
    model_name: str,
    losses: tuple[str, ...],
    checkpoint: Path | None,
    init: str,
    seed: int,
    train: bool,
    input_grad: bool,
    opset: int,
) -> None:
    """Export the model, each loss and each model+loss graph to OUT_DIR, verified against eager."""
    _require_torch("lossx export")
    from lossx.build import export_artifact

    manifest = export_artifact(
        out_dir,
        model_name=model_name,
        losses=[parse_loss_spec(text) for text in losses],
        checkpoint=checkpoint,
        seed=seed,
        opset=opset,
        init=init,
        progress=lambda file: click.echo(f"exporting {file}", err=True),
        train=train,
        input_grad=input_grad,
    )
    click.echo(
        f"wrote {out_dir}: {len(manifest.graphs)} graphs at opset {manifest.opset}, "
        "each verified against eager PyTorch"
    )
    for name, info in manifest.files.items():
        click.echo(f"  {name:<16} {info['bytes']:>9,} bytes  sha256 {info['sha256'][:16]}")
    manifest_sha256 = sha256_of(Path(out_dir) / MANIFEST_FILE)
    click.echo(f"manifest.json sha256 {manifest_sha256} (pin it with --require-sha256)")


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True)
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
    import numpy as np

    from lossx.runtime import open_artifact
    from lossx.runtime.images import load_image

    runtime = open_artifact(
        artifact_dir, manifest_sha256=require_sha256, weights=weights, **session_options
    )
    batch = np.stack([load_image(path) for path in images])  # every file read before any output
    classes, probabilities = runtime.predict(batch).top_k(top_k)
    results = [
        {
            "file": str(path),
            "top_k": [
                {"class": runtime.class_names[c], "index": int(c), "probability": float(p)}
                for c, p in zip(row_classes, row_probabilities, strict=True)
            ],
        }
        for path, row_classes, row_probabilities in zip(images, classes, probabilities, strict=True)
    ]
    if as_json:
        payload = {"artifact": str(artifact_dir), "providers": runtime.providers}
        click.echo(json.dumps({**payload, "predictions": results}, indent=2))
        return
    width = max(len(r["file"]) for r in results)
    for result in results:
        best = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in result["top_k"])
        click.echo(f"{result['file']:<{width}}  {best}")


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Eager weights from this checkpoint instead of the artifact's weights.npz.",
)
@click.option(
    "--baseline",
    type=click.Path(path_type=Path),
    help="Compare with this artifact's ONNX Runtime outputs instead of eager PyTorch.",
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
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--report-json", type=click.Path(path_type=Path), help="Write the JSON report.")
@click.option("--junit-xml", type=click.Path(path_type=Path), help="Write a JUnit XML report.")
@click.option("--markdown", type=click.Path(path_type=Path), help="Write a Markdown summary.")
@_require_sha256
@_weights
@click.option(
    "--repro",
    type=click.Path(path_type=Path, dir_okay=False),
    default="lossx-check-failure.npz",
    show_default=True,
    help="On a parity failure, save the failing inputs and both outputs here.",
)
def check(
    artifact_dir: Path,
    checkpoint: Path | None,
    baseline: Path | None,
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
    repro: Path,
    **session_options,
) -> None:
    """Check every graph in ARTIFACT_DIR against eager PyTorch (or --baseline): a CI gate.

    Exit codes: 0 all outputs within tolerance, 1 a parity failure, 2 a usage or input error,
    3 an environment problem (e.g. the requested provider is not really available).
    """
    _require_torch("lossx check")
    from lossx.parity.check import check_artifact, resolve_tolerances
    from lossx.parity.render import to_json, to_junit_xml, to_markdown, to_text
    from lossx.runtime import load_artifact, load_cifar10
    from lossx.runtime.session import provider_names

    if checkpoint is not None and baseline is not None:
        raise click.UsageError("--checkpoint and --baseline exclude each other")
    artifact = load_artifact(artifact_dir, require_sha256)
    if weights is not None:
        artifact = artifact.with_weights(weights)
    reference = load_artifact(baseline) if baseline is not None else None
    data = load_cifar10(data_dir, split, limit, stream=True)
    used = provider_names(artifact.session("model", **session_options))  # exit 3 comes first
    profile = tolerance_profile or ("fp32-cuda" if used[0] == "cuda" else "fp32-cpu")
    tolerances = resolve_tolerances(profile, atol, rtol, atol_for)
    report = check_artifact(
        artifact,
        data,
        tolerances,
        profile,
        checkpoint=checkpoint,
        baseline=reference,
        batch_size=batch_size,
        seed=seed,
        session_options=session_options,
        repro=repro,
        progress=lambda label: click.echo(f"comparing {label}", err=True),
    )
    click.echo(to_text(report))
    for path, render in (
        (report_json, to_json),
        (junit_xml, to_junit_xml),
        (markdown, to_markdown),
    ):
        if path is not None:
            text = render(report)
            write_atomically(path, lambda f, text=text: f.write(text.encode()))
    if not report.passed:
        worst = max(report.failures, key=lambda o: o.max_tolerance_used)
        where = (
            f"; first failing layer {report.first_failing_layer}"
            if report.first_failing_layer
            else ""
        )
        raise ParityError(
            f"parity failed for {len(report.failures)} of {len(report.outputs)} outputs, worst "
            f"{worst.name} (max abs error {worst.max_abs_error:.3g}){where}; failing case saved "
            f"to {report.repro}"
        )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def losses(as_json: bool) -> None:
    """List the losses `lossx export --loss` takes, with their options and defaults."""
    if as_json:
        click.echo(json.dumps([_loss_to_dict(info) for info in LOSSES.values()], indent=2))
        return
    for info in LOSSES.values():
        click.echo(f"{info.name:<11} torch.nn.{info.torch_class}: {info.summary}")
        for option in info.options:
            default = format_value(option.default)
            click.echo(
                f"{'':<13}{option.name:<16} default {default:<8} {option.accepted():<28} "
                f"{option.help}"
            )
    click.echo(
        '\nexample: lossx export out/ --loss "ce(label_smoothing=0.1, reduction=sum)" --loss mse'
    )


def _loss_to_dict(info) -> dict:
    return {
        "name": info.name,
        "torch_class": f"torch.nn.{info.torch_class}",
        "summary": info.summary,
        "options": [
            {"name": o.name, "default": o.default, "accepts": o.accepted(), "help": o.help}
            for o in info.options
        ],
    }


@main.command(name="eval")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@_data_options
@_session_options
@click.option(
    "--json",
    "json_path",
    help="Also write the figures as JSON to this path ('-': stdout, the table then on stderr).",
)
@click.option(
    "--download",
    is_flag=True,
    help="Fetch CIFAR-10 into --data-dir first (needs torchvision and a network).",
)
@_require_sha256
@_weights
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
    compare_eager: bool,
    atol: float | None,
    rtol: float | None,
    **session_options,
) -> None:
    """Evaluate the artifact in ARTIFACT_DIR on CIFAR-10 with ONNX Runtime."""
    from lossx.parity.compare import DEFAULT_ATOL, DEFAULT_RTOL
    from lossx.runtime import evaluate, load_artifact, load_cifar10
    from lossx.runtime.evaluate import check_batch_size

    if (atol is not None or rtol is not None) and not compare_eager:
        raise click.UsageError("--atol and --rtol apply only with --compare-eager")
    if download:
        if data_dir is None:
            raise click.UsageError("--download needs --data-dir")
        _require_torch("--download")
        from lossx.build.download import download_cifar10

        download_cifar10(data_dir)
    artifact = load_artifact(artifact_dir, require_sha256)
    if weights is not None:
        artifact = artifact.with_weights(weights)
    data = load_cifar10(data_dir, split, limit, stream=True)
    check_batch_size(batch_size)
    artifact.session("model", **session_options)  # a provider problem stops us before any output
    with _progress(len(data), "evaluating") as bar:
        result = evaluate(artifact, data, batch_size, progress=bar.update, **session_options)
    to_stderr = json_path == "-"  # stdout then carries the JSON alone
    click.echo(_render_eval(result), err=to_stderr)
    report = None
    if compare_eager:
        _require_torch("--compare-eager")
        from lossx.parity.eager import artifact_parity

        atol = DEFAULT_ATOL if atol is None else atol
        rtol = DEFAULT_RTOL if rtol is None else rtol
        with _progress(len(data), "comparing with eager PyTorch") as bar:
            report = artifact_parity(
                artifact, data, atol, rtol, batch_size, session_options["provider"], bar.update
            )
        click.echo(_render_parity(report, atol, rtol), err=to_stderr)
    if json_path:
        payload = {"eval": result.to_dict(), "parity": report.to_dict() if report else None}
        _write_json(json_path, payload)
    if report and not report.passed:
        worst = report.failures[0]
        raise ParityError(
            f"parity failed for {len(report.failures)} output(s), first {worst.graph}/"
            f"{worst.output}: max abs error {worst.max_abs_error:.3g}"
        )


@main.command()
@click.argument("artifact_dir", required=False, type=click.Path(path_type=Path))
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
    type=click.Path(path_type=Path),
    help="Folder holding cifar-10-batches-py/ with the training batches (required).",
)
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=0.02, show_default=True, help="Peak one-cycle LR.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option(
    "--loss",
    default="ce",
    show_default=True,
    metavar="SPEC",
    help='Loss spec, e.g. "ce(label_smoothing=0.1)"; targets are the labels or their one-hot '
    "vectors.",
)
@click.option(
    "--clip-norm",
    type=float,
    default=5.0,
    show_default=True,
    help="Clip the gradients' global norm to this (0: no clipping).",
)
@click.option(
    "--augment/--no-augment",
    default=True,
    show_default=True,
    help="Random 4-pixel-padded crops and left-right flips.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=int, help="Train on the first N training images only.")
@click.option(
    "--holdout",
    type=int,
    default=0,
    show_default=True,
    help="Hold out the last N training images and evaluate on them instead of the test images.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Checkpoint written after every epoch.  [default: checkpoint.pt (torch), trained.npz "
    "(onnxruntime)]",
)
@click.option(
    "--resume",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Continue the run saved in this checkpoint (its recipe wins).",
)
@click.option("--log-json", type=click.Path(path_type=Path), help="Write one JSON line per epoch.")
@_session_options
def train(
    artifact_dir: Path | None,
    engine: str,
    data_dir: Path | None,
    out: Path | None,
    resume: Path | None,
    log_json: Path | None,
    provider: str,
    threads: int | None,
    optimization: str,
    tf32: bool,
    **recipe,
) -> None:
    """Train the model on the CIFAR-10 training split: with eager PyTorch, or with ARTIFACT_DIR's
    training graph in ONNX Runtime (--engine onnxruntime). Both follow the same recipe: from
    the same weights and seed they take the same steps, to float rounding."""
    from lossx.runtime.recipe import TrainConfig

    if data_dir is None:
        raise click.UsageError("--data-dir is required: the training images do not ship with lossx")
    if engine == "torch" and artifact_dir is not None:
        raise click.UsageError(
            "ARTIFACT_DIR is for --engine onnxruntime; --engine torch needs none"
        )
    if engine == "onnxruntime" and artifact_dir is None:
        raise click.UsageError("--engine onnxruntime needs ARTIFACT_DIR (exported with --train)")
    config = TrainConfig(**recipe)
    if engine == "torch":
        _require_torch("lossx train --engine torch")
        from lossx.build.train import train as run_training

        out = out or Path("checkpoint.pt")
    else:
        from lossx.runtime import load_artifact
        from lossx.runtime.train import train as train_onnxruntime

        artifact = load_artifact(artifact_dir)
        session_options = {"provider": provider, "threads": threads,
                           "optimization": optimization, "tf32": tf32}  # fmt: skip

        def run_training(*args, **kwargs):
            return train_onnxruntime(artifact, *args, **kwargs, **session_options)

        out = out or Path("trained.npz")
    log = None
    if log_json:
        try:
            log = log_json.open("w", encoding="utf-8")
        except OSError as e:
            raise LossxError(f"cannot write {log_json}: {e.strerror}") from None
    progress = _EpochProgress(log)
    try:
        history = run_training(
            data_dir,
            out,
            config,
            resume=resume,
            on_batch=progress.batch,
            on_epoch=progress.epoch,
        )
    finally:
        progress.close()
        if log:
            log.close()
    if history:
        last = history[-1]
        click.echo(
            f"wrote {out}: epoch {last.epoch}/{last.epochs}, {last.eval_split} accuracy "
            f"{last.eval_accuracy:.2%}"
        )


class _EpochProgress:
    """A progress bar per epoch on stderr, then one line per epoch on stdout (and JSON lines)."""

    def __init__(self, log) -> None:
        self.log = log
        self.bar = None
        self.done = 0

    def batch(self, epoch: int, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = _progress(total, f"epoch {epoch}").__enter__()
            self.done = 0
        self.bar.update(done - self.done)
        self.done = done

    def epoch(self, result) -> None:
        self.close()
        click.echo(
            f"epoch {result.epoch:>3}/{result.epochs}  lr {result.lr:.5f}  "
            f"train loss {result.train_loss:.4f}  {result.eval_split} loss "
            f"{result.eval_loss:.4f}  {result.eval_split} accuracy {result.eval_accuracy:.2%}  "
            f"{result.images_per_second:,.0f} images/s  {result.seconds:.1f} s"
        )
        if self.log:
            self.log.write(json.dumps(result.to_dict()) + "\n")
            self.log.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _require_torch(what: str) -> None:
    if importlib.util.find_spec("torch") is None:
        raise EnvironmentProblem(f"{what} needs torch, which is not installed here")


def _progress(total: int, label: str):
    return click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True)


def _render_eval(result) -> str:
    rows = [
        ("data", result.data),
        ("images evaluated", f"{result.images:,}"),
        ("top-1 accuracy", f"{result.top1_accuracy:.2%}"),
    ]
    rows += [
        (f"{name} loss", f"{value:.6f}  ({result.loss_definitions[name]})")
        for name, value in result.losses.items()
    ]
    rows += [
        (
            "throughput",
            f"{result.images_per_second:,.0f} images/s end to end, "
            f"{result.model_images_per_second:,.0f} images/s model alone",
        ),
        ("providers", ", ".join(result.providers)),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _render_parity(report, atol: float, rtol: float) -> str:
    lines = [
        "",
        f"parity with eager PyTorch on {report.images:,} images "
        f"(pass: |onnx - eager| <= {atol:g} + {rtol:g} * |eager|)",
        f"{'graph':<14}{'output':<8}{'max abs err':>13}{'max rel err':>13}"
        f"{'tol used':>10}{'argmax agree':>14}  result",
    ]
    for c in report.comparisons:
        agree = "" if c.argmax_agreement is None else f"{c.argmax_agreement:.2%}"
        verdict = "ok" if c.passed else f"FAIL ({c.mismatches} of {c.elements} elements)"
        lines.append(
            f"{c.graph:<14}{c.output:<8}{c.max_abs_error:>13.3g}{c.max_rel_error:>13.3g}"
            f"{c.max_tolerance_used:>10.1%}{agree:>14}  {verdict}"
        )
    return "\n".join(lines)


def _write_json(path: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2) + "\n"
    if path == "-":
        click.echo(text, nl=False)
    else:
        write_atomically(Path(path), lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
