"""How much of the default parity tolerance each graph uses, per batch size, on real data.

    python bench/parity_margin.py ARTIFACT_DIR --data-dir ../shared/data/cifar10 \\
        --split train --limit 10000

Prints, for every output of every graph, the max absolute error and the share of the tolerance
(|onnx - eager| / (atol + rtol * |eager|), worst element) at batch sizes 1, 7, 64 and 256.
The figures of docs/parity.md come from this table.
"""

import argparse
from pathlib import Path

from lossx.compare.tolerances import DEFAULT_PROFILE, resolve_tolerances
from lossx.parity.check import compare_with_eager
from lossx.runtime import load_artifact, load_cifar10

BATCH_SIZES = (1, 7, 64, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    artifact = load_artifact(args.artifact)
    data = load_cifar10(args.data_dir, args.split, args.limit)
    tolerances = resolve_tolerances(DEFAULT_PROFILE)
    reports = {
        size: compare_with_eager(artifact, data, tolerances, DEFAULT_PROFILE, size)
        for size in BATCH_SIZES
    }
    atol, rtol = tolerances.default.atol, tolerances.default.rtol
    print(f"{len(data):,} images of {data.source}; atol {atol:g}, rtol {rtol:g} (gradients "
          "under the gradient rule)")  # fmt: skip
    header = "".join(f"{f'batch {s}':>22}" for s in BATCH_SIZES)
    print(f"{'graph/output':<18}{header}")
    print(f"{'':<18}" + "".join(f"{'max abs':>12}{'tol used':>10}" for _ in BATCH_SIZES))
    first = reports[BATCH_SIZES[0]].outputs
    for index, row in enumerate(first):
        cells = "".join(
            f"{reports[s].outputs[index].max_abs_error:>12.2e}"
            f"{reports[s].outputs[index].max_tolerance_used:>10.1%}"
            for s in BATCH_SIZES
        )
        print(f"{row.graph + '/' + row.output:<18}{cells}")


if __name__ == "__main__":
    main()
