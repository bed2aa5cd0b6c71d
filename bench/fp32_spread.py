"""How far apart correct fp32 computations of a training step land, measured against float64:
the evidence for FP32_SPREAD (lossx.compare.tolerances).

    python bench/fp32_spread.py ARTIFACT [ARTIFACT ...] [--limit 64]

For each artifact exported with `--train`, its training graph runs on the input sets
`lossx check` uses (the first --limit packaged test images in one batch, image 0 alone, images
1-7 as one batch, random inputs of each size), in float64 and by three fp32 engines: eager
torch on its oneDNN kernels, eager torch on its native kernels (`torch.backends.mkldnn` off),
and ONNX Runtime. Where both torch runs miss the output's rule against float64 (the
ill-conditioned cases float64 is asked to judge), it records each engine's largest distance from
float64. Prints, per artifact: how many such cases, the ratio between torch's two kernels
(further / nearer: how far apart two correct fp32 computations land; median and largest), and
ONNX Runtime's distance as a multiple of the further torch run (largest, unrouted: a near-tie
ONNX Runtime routed otherwise shows here at full size; `lossx check` judges those along its
own routing).
"""

import argparse
import itertools
import statistics
from pathlib import Path

import numpy as np
import torch

from lossx.build.eager import EagerRunner
from lossx.build.models import weights_to_arrays
from lossx.build.self_check import self_check_images
from lossx.compare.elementwise import element_errors
from lossx.compare.inputs import random_input_sets, real_input_sets
from lossx.compare.runners import OnnxRuntimeRunner
from lossx.compare.tolerances import resolve_tolerances
from lossx.runtime import load_artifact
from lossx.runtime.graphs import GraphKind


def cases(path: Path, limit: int) -> list[tuple[float, float, float]]:
    """(torch oneDNN, torch native, ONNX Runtime) distances from float64, per ill-conditioned
    (input set, output) of the artifact's first training graph."""
    artifact = load_artifact(path)
    spec = next(g.spec for g in artifact.manifest.graphs if g.spec.kind is GraphKind.TRAIN)
    eager, ort_runner = EagerRunner.of_artifact(artifact), OnnxRuntimeRunner.of_artifact(artifact)
    parameters, tolerances = weights_to_arrays(eager.model), resolve_tolerances()
    images = self_check_images(artifact.contract, limit)
    input_sets = itertools.chain(
        real_input_sets(images, limit, artifact.contract, odd_batches=True), random_input_sets(1)
    )
    found = []
    for inputs in input_sets:
        feed = inputs.feed(spec, None, parameters)
        try:
            onednn = eager.run(spec, feed)
        except ValueError:  # torch refuses a batch norm over one value per channel
            continue
        with torch.backends.mkldnn.flags(enabled=False):
            native = eager.run(spec, feed)
        exact, onnx = eager.run_float64(spec, feed), ort_runner.run(spec, feed)
        for name in spec.output_names:
            tolerance, want = tolerances.of(spec, name), exact[name]
            atol = tolerance.atol_for(want)
            runs = [np.asarray(run[name], np.float64) for run in (onednn, native, onnx)]
            if any(element_errors(r, want, atol, tolerance.rtol).failed.any() for r in runs):
                found.append(tuple(float(np.abs(r - want).max()) for r in runs))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--limit", type=int, default=64)
    args = parser.parse_args()
    print("| artifact | cases | torch's kernels apart: median | largest "
          "| ONNX Runtime / further torch: largest |")  # fmt: skip
    print("|---|---|---|---|---|")
    for path in args.artifacts:
        found = cases(path, args.limit)
        if not found:
            print(f"| {path.name} | 0 | - | - | - |")
            continue
        apart = [max(a, b) / max(min(a, b), 1e-300) for a, b, _ in found]
        onnx = [c / max(a, b, 1e-300) for a, b, c in found]
        print(f"| {path.name} | {len(found)} | {statistics.median(apart):.2f} | "
              f"{max(apart):.1f} | {max(onnx):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
