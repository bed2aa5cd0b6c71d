"""The `lossx` command line: parse, call lossx.build / lossx.runtime, render.

torch is imported only by the commands that need it (export, eval --compare-eager).
Exit codes: 0 success, 1 parity failure, 2 bad usage or input, 3 environment, 4 export failed.
"""

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import click

from lossx import __version__
from lossx.errors import EnvironmentProblem, LossxError, ParityError
from lossx.runtime.evaluate import LOSS_DESCRIPTIONS
from lossx.runtime.session import PROVIDER_CHOICES

DEFAULT_LOSSES = "ce,mse,l1"


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
@click.option("--losses", default=DEFAULT_LOSSES, show_default=True, help="Comma-separated losses.")
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path, dir_okay=False),
    help="state_dict to export (loaded with weights_only=True); default: seeded initial weights.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the initial weights.")
@click.option("--opset", default=20, show_default=True, help="ONNX opset (17..23).")
def export(
    out_dir: Path, model_name: str, losses: str, checkpoint: Path | None, seed: int, opset: int
) -> None:
    """Export the model, each loss and each model+loss graph to OUT_DIR, verified against eager."""
    _require_torch("lossx export")
    from lossx.build import export_artifact, parse_losses

    loss_names = parse_losses(losses)
    manifest = export_artifact(
        out_dir,
        model_name=model_name,
        losses=loss_names,
        checkpoint=checkpoint,
        seed=seed,
        opset=opset,
        progress=lambda file: click.echo(f"exporting {file}", err=True),
    )
    click.echo(
        f"wrote {out_dir}: {len(manifest.graphs)} graphs at opset {manifest.opset}, "
        "each verified against eager PyTorch"
    )
    for name, info in manifest.files.items():
        click.echo(f"  {name:<16} {info['bytes']:>9,} bytes  sha256 {info['sha256'][:16]}")


@main.command(name="eval")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="Folder holding cifar-10-batches-py/; default: the packaged 1,000 test images.",
)
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N images.")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="cpu", show_default=True)
@click.option(
    "--json", "json_path", help="Also write the figures as JSON to this path ('-': stdout)."
)
@click.option(
    "--download",
    is_flag=True,
    help="Fetch CIFAR-10 into --data-dir first (needs torchvision and a network).",
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
    provider: str,
    json_path: str | None,
    download: bool,
    compare_eager: bool,
    atol: float | None,
    rtol: float | None,
) -> None:
    """Evaluate the artifact in ARTIFACT_DIR on CIFAR-10 with ONNX Runtime."""
    from lossx.parity.compare import DEFAULT_ATOL, DEFAULT_RTOL
    from lossx.runtime import evaluate, load_artifact, load_cifar10

    if (atol is not None or rtol is not None) and not compare_eager:
        raise click.UsageError("--atol and --rtol apply only with --compare-eager")
    if download:
        if data_dir is None:
            raise click.UsageError("--download needs --data-dir")
        _require_torch("--download")
        from lossx.build.download import download_cifar10

        download_cifar10(data_dir)
    artifact = load_artifact(artifact_dir)
    data = load_cifar10(data_dir, split, limit)
    with _progress(len(data), "evaluating") as bar:
        result = evaluate(artifact, data, batch_size, provider, progress=bar.update)
    click.echo(_render_eval(result))
    report = None
    if compare_eager:
        _require_torch("--compare-eager")
        from lossx.parity.eager import artifact_parity

        atol = DEFAULT_ATOL if atol is None else atol
        rtol = DEFAULT_RTOL if rtol is None else rtol
        with _progress(len(data), "comparing with eager PyTorch") as bar:
            report = artifact_parity(
                artifact, data, atol, rtol, batch_size, provider, progress=bar.update
            )
        click.echo(_render_parity(report, atol, rtol))
    if json_path:
        payload = {"eval": result.to_dict(), "parity": report.to_dict() if report else None}
        _write_json(json_path, payload)
    if report and not report.passed:
        worst = report.failures[0]
        raise ParityError(
            f"parity failed for {len(report.failures)} output(s), first {worst.graph}/"
            f"{worst.output}: max abs error {worst.max_abs_error:.3g}"
        )


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
        (f"{name} loss", f"{value:.6f}  ({LOSS_DESCRIPTIONS[name]})")
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
        return
    target = Path(path)
    try:
        with tempfile.NamedTemporaryFile(
            "w", dir=target.parent, prefix=f".{target.name}.", delete=False
        ) as f:
            f.write(text)
        os.replace(f.name, target)
    except OSError as e:
        raise LossxError(f"cannot write {path}: {e.strerror or e}") from None


if __name__ == "__main__":
    main()
