"""`lossx eval`, `lossx predict` and `lossx losses`: the commands that run an artifact."""

import json
from pathlib import Path

import click

from lossx.build.torch_side import require_export_extra
from lossx.cli.app import echo, main, write_picture, write_text
from lossx.cli.options import (
    PathArg,
    artifact_with_weights,
    output_check,
    path_arg,
    picture_option,
    require_sha256_option,
    weights_option,
    with_data_options,
    with_session_options,
)
from lossx.cli.progress import progress_bar
from lossx.compare.tolerances import check_overrides, resolve_tolerances
from lossx.parity.profiles import tolerance_profiles
from lossx.runtime.loss_specs import LOSSES, catalogue_text
from lossx.runtime.options import SessionOptions


@main.command(short_help="Classify image files with an artifact's model.")
@click.argument("artifact_dir", type=path_arg())
@click.argument("images", nargs=-1, required=True, type=path_arg())
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many classes per image, at most the model's classes.",
)
@with_session_options
@require_sha256_option
@weights_option
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
def predict(
    artifact_dir: Path,
    images: tuple[Path, ...],
    top_k: int,
    as_json: bool,
    require_sha256: str | None,
    weights: Path | None,
    session: SessionOptions,
) -> None:
    """Classify IMAGES (PNG, JPEG, ... files, or folders of them) with the model in
    ARTIFACT_DIR, each read and fitted as its manifest's preprocessing says."""
    from lossx.runtime import Runtime
    from lossx.runtime.image_folder import image_files

    runtime = Runtime(artifact_with_weights(artifact_dir, require_sha256, weights), session)
    predictions = runtime.predict_files(image_files(list(images)), top_k)
    echo(json.dumps(predictions.to_dict(), indent=2) if as_json else predictions.to_text())


@main.command(short_help="List the losses and their options.")
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def losses(as_json: bool) -> None:
    """List the losses `lossx export --loss` takes, with their options and defaults."""
    if as_json:
        echo(json.dumps([info.to_dict() for info in LOSSES.values()], indent=2))
    else:
        echo(catalogue_text())


@main.command(name="eval", short_help="Evaluate an artifact on CIFAR-10 with ONNX Runtime.")
@click.argument("artifact_dir", type=path_arg())
@with_data_options
@with_session_options
@click.option(
    "--json",
    "json_path",
    type=PathArg(),
    callback=output_check("JSON", text=True),
    help="Also write the figures as JSON to this path ('-': stdout, the table then on stderr).",
)
@click.option(
    "--download",
    is_flag=True,
    help="Fetch CIFAR-10 into --data-dir first (needs torchvision and a network).",
)
@require_sha256_option
@weights_option
@click.option(
    "--jpeg-quality",
    type=click.IntRange(1, 95),
    help="Score JPEG copies of the images instead: each saved by Pillow at this quality (4:2:0 "
    "chroma) and decoded, as a JPEG photo reaches the model.",
)
@click.option(
    "--compare-eager",
    is_flag=True,
    help="Also run eager PyTorch and check parity, under the artifact's precision's tolerance "
    "profile (fp32: fp32-cuda on CUDA, else fp32-cpu).",
)
@picture_option(
    "--confusion-png",
    "Also draw the confusion matrix (rows: true class, columns: predicted) to this PNG.",
)
@click.option("--atol", type=float, help="Absolute tolerance for --compare-eager.")
@click.option("--rtol", type=float, help="Relative tolerance for --compare-eager.")
def eval_(
    artifact_dir: Path,
    data_dir: Path | None,
    split: str,
    batch_size: int,
    limit: int | None,
    strict: bool,
    json_path: str | None,
    download: bool,
    require_sha256: str | None,
    weights: Path | None,
    jpeg_quality: int | None,
    compare_eager: bool,
    atol: float | None,
    rtol: float | None,
    confusion_png: Path | None,
    session: SessionOptions,
) -> None:
    """Evaluate the artifact in ARTIFACT_DIR on labelled images with ONNX Runtime."""
    from lossx.compare.render import strict_json, to_text
    from lossx.runtime import evaluate, load_dataset
    from lossx.runtime.feeds import check_batch_size

    if (atol is not None or rtol is not None) and not compare_eager:
        raise click.UsageError("--atol and --rtol apply only with --compare-eager")
    check_overrides(atol, rtol)  # a meaningless tolerance is refused first
    if compare_eager:
        require_export_extra("--compare-eager", ("torch",))
    if download:
        if data_dir is None:
            raise click.UsageError("--download needs --data-dir")
        require_export_extra("--download", ("torchvision",))
        from lossx.build.download import download_cifar10

        download_cifar10(data_dir)
    artifact = artifact_with_weights(artifact_dir, require_sha256, weights)
    check_batch_size(batch_size)
    # a provider problem (or a graph that contradicts its manifest) stops here, before data
    profile, fp32_profile = tolerance_profiles(artifact, session)
    data = load_dataset(data_dir, split, artifact.contract, limit, stream=True, strict=strict)
    if jpeg_quality is not None:
        from lossx.runtime.images import as_jpeg

        data = as_jpeg(data, jpeg_quality)
    tolerances = None
    if compare_eager:
        tolerances = resolve_tolerances(profile, atol, rtol, fp32_profile=fp32_profile)
    with progress_bar(len(data), "evaluating") as bar:
        result = evaluate(artifact, data, batch_size, session, bar.update)
    to_stderr = json_path == "-"  # stdout then carries the JSON alone
    echo(result.to_text(), err=to_stderr)
    if confusion_png is not None:
        from lossx.runtime.pictures import confusion_png as draw

        write_picture(confusion_png, draw(result), "the confusion matrix")
    report = None
    if compare_eager:
        from lossx.parity.check import compare_with_eager

        with progress_bar(len(data), "comparing with eager PyTorch") as bar:
            report = compare_with_eager(
                artifact, data, tolerances, profile, batch_size, session,
                progress=lambda inputs: bar.update(len(inputs.labels)),
            )  # fmt: skip
        echo("\n" + to_text(report), err=to_stderr)
    if json_path:
        payload = {"eval": result.to_dict(), "parity": report.to_dict() if report else None}
        write_text(json_path, strict_json(payload) + "\n")
    if report:
        report.raise_if_failed()
