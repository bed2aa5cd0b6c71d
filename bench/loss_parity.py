"""How much of the default parity tolerance each loss graph uses, over many random inputs.

    python bench/loss_parity.py [--seeds 20]

For every loss and a set of option variants, exports the loss graph at ranks 2 and 4 (the
second as [N, C, H, W]), runs it in ONNX Runtime on random inputs at three value scales (1, 30,
1e4) and several sizes, and compares with torch.nn. Prints, per loss, the worst absolute and
relative error and the share of the tolerance used: |onnx - eager| / (atol + rtol * |eager|)
under the fp32-cpu profile's atol and rtol (above 100% would fail). The loss tolerance
figures of docs/losses.md come from this table.
"""

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

from lossx.build.export import export_loss
from lossx.build.losses import reference_loss
from lossx.compare.comparator import compare_arrays
from lossx.compare.inputs import sample_feed
from lossx.compare.tolerances import DEFAULT_PROFILE, PROFILES
from lossx.runtime.loss_specs import parse_loss_spec
from lossx.runtime.options import SessionOptions
from lossx.runtime.session import open_session

WEIGHTS = "[0.5, 2, 1, 3, 0.1]"
VARIANTS = {
    "ce": [
        "ce",
        "ce(label_smoothing=0.1)",
        f"ce(weight={WEIGHTS}, label_smoothing=0.2, ignore_index=1)",
        "ce(reduction=sum, label_smoothing=1)",
        "ce(reduction=none, label_smoothing=0.3)",
        "ce(target=probs, label_smoothing=0.1)",
        f"ce(target=probs, weight={WEIGHTS}, reduction=sum)",
    ],
    "nll": ["nll", f"nll(weight={WEIGHTS}, ignore_index=0)", "nll(reduction=none)"],
    "mse": ["mse", "mse(reduction=sum)", "mse(reduction=none)"],
    "l1": ["l1", "l1(reduction=sum)", "l1(reduction=none)"],
    "smooth_l1": ["smooth_l1", "smooth_l1(beta=0)", "smooth_l1(beta=2.5, reduction=sum)"],
    "huber": ["huber", "huber(delta=0.1)", "huber(delta=3, reduction=none)"],
    "bce_logits": [
        "bce_logits",
        f"bce_logits(pos_weight={WEIGHTS})",
        f"bce_logits(weight={WEIGHTS}, pos_weight={WEIGHTS}, reduction=sum)",
    ],
    "kl_div": ["kl_div", "kl_div(reduction=batchmean)", "kl_div(log_target=true, reduction=sum)"],
}
SCALES = (1.0, 30.0, 1e4)
TOLERANCE = PROFILES[DEFAULT_PROFILE]
SIZES = ({"N": 1, "C": 5, "D": 5, "d1": 1, "d2": 1}, {"N": 9, "C": 5, "D": 5, "d1": 4, "d2": 3})


def measure(text: str, extra_dims: int, seeds: int, directory: Path) -> list:
    """Comparisons of one loss graph with torch.nn over every scale, size and seed."""
    path = directory / "loss.onnx"
    graph = export_loss(parse_loss_spec(text), path, extra_dims=extra_dims)
    session = open_session(path, SessionOptions("cpu"))
    module = reference_loss(graph.loss)
    results = []
    for scale in SCALES:
        for sizes in SIZES:
            for seed in range(seeds):
                feed = sample_feed(graph, sizes, seed, scale, ignore_fraction=0.2)
                (got,) = session.run(None, feed)
                with torch.no_grad():
                    want = module(*map(torch.from_numpy, feed.values())).numpy()
                case = f"{text} rank {2 + extra_dims} x{scale:g}"
                results.append((case, compare_arrays(got, want, TOLERANCE)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="Random inputs per case.")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"atol {TOLERANCE.atol:g}, rtol {TOLERANCE.rtol:g}; scales {SCALES}; {args.seeds} seeds")
    print(f"{'loss':<11}{'draws':>7}{'max abs err':>13}{'max rel err':>13}{'tol used':>10}  worst")
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, variants in VARIANTS.items():
            results = [
                r
                for text in variants
                for dims in (0, 2)
                for r in measure(text, dims, args.seeds, Path(tmp))
            ]
            case, worst = max(results, key=lambda r: r[1].max_tolerance_used)
            print(
                f"{name:<11}{len(results):>7}{max(c.max_abs_error for _, c in results):>13.3g}"
                f"{max(c.max_rel_error for _, c in results):>13.3g}"
                f"{worst.max_tolerance_used:>10.1%}  {case}",
                flush=True,
            )
            if not all(c.passed for _, c in results):
                failed.append(name)
    print("all within tolerance" if not failed else f"OUT OF TOLERANCE: {', '.join(failed)}")


if __name__ == "__main__":
    main()
