"""`lossx train --engine onnxruntime` beside `--engine torch`: how far apart the runs end up.

    python bench/train_parity.py --data-dir ../shared/data/cifar10 [--limit 5000] [--epochs 2]

For each loss, exports seeded random weights with --train (the torch engine starts from the
same seeded weights), trains both engines with the default recipe (one-cycle LR, Nesterov SGD,
weight decay, clipping, augmentation) on the first --limit training images, and prints the
largest difference of the per-step losses, of each run's test loss and accuracy, and of the
final weights (per tensor, relative to the tensor's largest |weight|).
"""

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lossx.build import export_artifact
from lossx.build.torch_engine import train as train_torch
from lossx.runtime import load_artifact
from lossx.runtime.options import SessionOptions
from lossx.training.ort_engine import train as train_onnxruntime
from lossx.training.recipe import TrainConfig


def compare(data_dir: Path, loss: str, config: TrainConfig, threads: int, work: Path) -> dict:
    export_artifact(work / loss, losses=[loss], init="random", seed=config.seed, train=True)
    curves: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    torch_log = train_torch(
        data_dir, work / f"{loss}.pt", config, on_step=lambda _, v: curves["torch"].append(v)
    )
    ort_log = train_onnxruntime(
        load_artifact(work / loss),
        data_dir,
        work / f"{loss}.npz",
        config,
        on_step=lambda _, v: curves["onnxruntime"].append(v),
        options=SessionOptions(threads=threads),
    )
    torch_weights = torch.load(work / f"{loss}.pt", weights_only=True)["model"]
    with np.load(work / f"{loss}.npz") as npz:
        weight_gap = max(
            float(np.abs(npz[k] - v.numpy()).max() / np.abs(v.numpy()).max())
            for k, v in torch_weights.items()
        )
    return {
        "steps": len(curves["torch"]),
        "loss_gap": float(np.abs(np.subtract(curves["torch"], curves["onnxruntime"])).max()),
        "eval_loss_gap": max(
            abs(a.eval_loss - b.eval_loss) for a, b in zip(torch_log, ort_log, strict=True)
        ),
        "accuracy": (torch_log[-1].eval_accuracy, ort_log[-1].eval_accuracy),
        "weight_gap": weight_gap,
        "seconds": (sum(e.seconds for e in torch_log), sum(e.seconds for e in ort_log)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--losses", nargs="+", default=["ce", "mse", "l1"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig(epochs=args.epochs, limit=args.limit, seed=args.seed)
    print(
        f"{args.limit:,} training images, {args.epochs} epochs, batch {config.batch_size}, "
        f"seed {args.seed}, default recipe"
    )
    print(
        f"{'loss':<6}{'steps':>6}{'max |dloss|':>13}{'max |d eval loss|':>19}"
        f"{'max weight gap':>16}{'accuracy torch / ort':>24}{'seconds torch / ort':>22}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for loss in args.losses:
            r = compare(args.data_dir, loss, replace(config, loss=loss), args.threads, Path(tmp))
            accuracy = f"{r['accuracy'][0]:.2%} / {r['accuracy'][1]:.2%}"
            seconds = f"{r['seconds'][0]:.1f} / {r['seconds'][1]:.1f}"
            print(
                f"{loss:<6}{r['steps']:>6}{r['loss_gap']:>13.3g}{r['eval_loss_gap']:>19.3g}"
                f"{r['weight_gap']:>16.3g}{accuracy:>24}{seconds:>22}"
            )


if __name__ == "__main__":
    main()
