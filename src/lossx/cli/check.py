"""`lossx check`: every graph of an artifact against eager PyTorch, a CI gate."""

from pathlib import Path

import click

from lossx.build.torch_side import require_export_extra
from lossx.cli.app import echo, main
from lossx.cli.options import (
    SEED,
    STDOUT_HELP,
    artifact_with_weights,
    model_arg_option,
    output_check,
    path_arg,
    require_sha256_option,
    weights_option,
    with_data_options,
    with_session_options,
)
from lossx.compare.tolerances import PROFILES, check_overrides, resolve_tolerances
from lossx.parity.profiles import tolerance_profiles
from lossx.runtime.options import SessionOptions


@main.command(short_help="Check every graph of an artifact against eager PyTorch: a CI gate.")
@click.argument("artifact_dir", type=path_arg())
@click.option(
    "--checkpoint",
    type=path_arg(dir_okay=False),
    help="Eager weights from this checkpoint instead of the artifact's weights.npz.",
)
@click.option(
    "--baseline",
    type=path_arg(),
    help="Compare with this artifact's ONNX Runtime outputs instead of eager PyTorch.",
)
@click.option(
    "--model",
    "model_name",
    metavar="NAME|MODULE:ATTR",
    help="The eager model, a registry name or MODULE:ATTR, instead of the one the manifest "
    "records (e.g. after its module moved); it must take the artifact's weights.",
)
@model_arg_option
@with_data_options
@with_session_options
@click.option(
    "--tolerance-profile",
    type=click.Choice(list(PROFILES)),
    help="Default tolerances of every graph.  [default: the artifact's precision's profile for "
    "its model graphs (int8, fp16), else fp32-cuda on CUDA, else fp32-cpu]",
)
@click.option("--atol", type=float, help="Absolute tolerance for every output.")
@click.option("--rtol", type=float, help="Relative tolerance for every output.")
@click.option(
    "--atol-for",
    multiple=True,
    metavar="OUTPUT=X",
    help="Absolute tolerance for one output (logits, or graph/output); repeatable.",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random inputs.")
@click.option(
    "--report-json",
    type=path_arg(),
    callback=output_check("report", text=True),
    help="Write the JSON report" + STDOUT_HELP + ".",
)
@click.option(
    "--junit-xml",
    type=path_arg(),
    callback=output_check("report", text=True),
    help="Write a JUnit XML report" + STDOUT_HELP + ".",
)
@click.option(
    "--markdown",
    type=path_arg(),
    callback=output_check("report", text=True),
    help="Write a Markdown summary" + STDOUT_HELP + ".",
)
@require_sha256_option
@weights_option
@click.option(
    "--repro",
    type=path_arg(dir_okay=False),
    callback=output_check("repro file"),
    help="On a parity failure, save the failing inputs and both outputs here.  [default: "
    "lossx-check-failure.npz beside the first report written, else not saved]",
)
def check(
    artifact_dir: Path,
    checkpoint: Path | None,
    baseline: Path | None,
    model_name: str | None,
    model_args: dict[str, object],
    data_dir: Path | None,
    split: str,
    limit: int | None,
    batch_size: int,
    tolerance_profile: str | None,
    atol: float | None,
    rtol: float | None,
    atol_for: tuple[str, ...],
    seed: int,
    strict: bool,
    report_json: Path | None,
    junit_xml: Path | None,
    markdown: Path | None,
    require_sha256: str | None,
    weights: Path | None,
    repro: Path | None,
    session: SessionOptions,
) -> None:
    """Check every graph in ARTIFACT_DIR against eager PyTorch (or --baseline): a CI gate.

    Exit codes: 0 all outputs within tolerance, 1 a parity failure, 2 a usage or input error,
    3 an environment problem (e.g. the requested provider is not really available).
    """
    from lossx.runtime import load_artifact, load_dataset
    from lossx.runtime.feeds import check_batch_size

    if checkpoint is not None and baseline is not None:
        raise click.UsageError("--checkpoint and --baseline exclude each other")
    if model_name is not None and baseline is not None:
        raise click.UsageError("--model and --baseline exclude each other")
    if model_args and model_name is None:
        raise click.UsageError("--model-arg goes with --model; the artifact records its own")
    files, to_stdout = _report_targets(report_json, junit_xml, markdown)
    check_overrides(atol, rtol, atol_for)
    check_batch_size(batch_size)
    require_export_extra("lossx check")
    artifact = artifact_with_weights(artifact_dir, require_sha256, weights)
    if checkpoint is not None:
        from lossx.training.checkpoints import check_checkpoint_kind

        check_checkpoint_kind(checkpoint, ("npz", "torch"))
    reference = load_artifact(baseline) if baseline is not None else checkpoint
    profile, fp32_profile = tolerance_profiles(artifact, session, tolerance_profile)
    data = load_dataset(data_dir, split, artifact.contract, limit, stream=True, strict=strict)
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
        options=session,
        repro=repro or repro_beside(list(files.values())),
        progress=lambda inputs: click.echo(f"compared {inputs.label}", err=True),
        model_name=model_name,
        model_args=model_args or None,
    )
    echo(to_text(report), err=bool(to_stdout))
    if data.skipped:
        first = data.skipped[0]
        click.echo(
            f"skipped {len(data.skipped):,} files that are not readable images (the first: "
            f"{first.file}: {first.reason}); --strict refuses them",
            err=True,
        )
    write_reports(report, files)
    if to_stdout:
        echo(RENDERERS[to_stdout[0]](report), nl=False)
    report.raise_if_failed()


def _report_targets(
    report_json: Path | None, junit_xml: Path | None, markdown: Path | None
) -> tuple[dict[str, Path], list[str]]:
    """The report files by kind, and the kind written to stdout (`-`), if one is."""
    reports = {"json": report_json, "junit": junit_xml, "markdown": markdown}
    to_stdout = [kind for kind, path in reports.items() if str(path) == "-"]
    if len(to_stdout) > 1:
        raise click.UsageError("only one of --report-json, --junit-xml and --markdown can be '-'")
    files = {kind: path for kind, path in reports.items() if path and kind not in to_stdout}
    return files, to_stdout
