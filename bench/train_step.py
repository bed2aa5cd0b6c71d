"""One training step in ONNX Runtime beside eager PyTorch: `lossx train`'s two engines.

    python bench/train_step.py [--threads 2] [--steps 20] [--rounds 3] [--profile]

Exports the shipped weights with `--train`, then runs the step each engine of `lossx train`
takes, on the same real CIFAR-10 batches (the packaged test images), at batch 64 and 256:

- onnxruntime: train_ce.onnx in ONNX Runtime, then clipping and Nesterov SGD in numpy;
- torch: eager forward, backward, clipping and torch.optim.SGD.

The engines alternate in rounds of --steps steps; the best round of each counts. Prints
images/s, the ratio, and how far apart the two engines' weights are after the same steps.
--profile adds ONNX Runtime's time per operator type (SessionOptions.enable_profiling).
"""

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lossx.build import export_artifact
from lossx.build.train import TorchEngine
from lossx.runtime import load_artifact, load_packaged_sample, to_model_input
from lossx.runtime.recipe import TrainConfig
from lossx.runtime.train import OnnxRuntimeEngine

LR, MOMENTUM = 0.01, 0.9


def timed_round(engine, batches) -> float:
    started = time.perf_counter()
    for images, labels in batches:
        engine.step(images, labels, LR, MOMENTUM)
    return sum(len(labels) for _, labels in batches) / (time.perf_counter() - started)


def profile(artifact, batches, threads: int, folder: Path) -> None:
    spec = artifact.graph("train_ce").spec
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    session = ort.InferenceSession(
        str(artifact.path / spec.file), options, disabled_optimizers=["NchwcTransformer"]
    )
    parameters = artifact.parameters()
    for images, labels in batches:
        session.run(None, {"images": images, "labels": labels, **parameters})
    with open(session.end_profiling()) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and "op_name" in e["args"]]
    by_op = collections.Counter()
    for event in events:
        by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values())
    print(
        "  ONNX Runtime time by operator: "
        + ", ".join(f"{op} {share / total:.0%}" for op, share in by_op.most_common(6))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sample = load_packaged_sample()
    images, labels = to_model_input(sample.images), sample.labels
    with tempfile.TemporaryDirectory() as tmp:
        export_artifact(Path(tmp) / "a", losses=["ce"], train=True)
        artifact = load_artifact(Path(tmp) / "a")
        config = TrainConfig(weight_decay=5e-4, clip_norm=5.0)
        print(
            f"{args.threads} threads, {args.rounds} rounds of {args.steps} steps (lr {LR}, "
            f"Nesterov momentum {MOMENTUM}, weight decay 5e-4, clipping at 5), best round"
        )
        print(
            f"{'batch':>6}{'onnxruntime img/s':>19}{'torch img/s':>13}{'ratio':>8}"
            f"{'weights apart':>15}"
        )
        for batch in (64, 256):
            batches = [
                (images[s : s + batch], labels[s : s + batch])
                for s in (step * batch % (len(labels) - batch) for step in range(args.steps))
            ]
            onnx = OnnxRuntimeEngine(
                artifact, config, Path(tmp) / "o.npz", {"threads": args.threads}
            )
            eager = TorchEngine(config, Path(tmp) / "t.pt")
            eager.model.load_state_dict(
                {k: torch.from_numpy(v) for k, v in artifact.parameters().items()}
            )
            speeds = {"onnx": [], "eager": []}
            for _ in range(args.rounds):
                speeds["onnx"].append(timed_round(onnx, batches))
                speeds["eager"].append(timed_round(eager, batches))
            state = eager.model.state_dict()
            apart = max(
                float(np.abs(onnx.parameters[k] - v.numpy()).max() / np.abs(v.numpy()).max())
                for k, v in state.items()
            )
            best_onnx, best_eager = max(speeds["onnx"]), max(speeds["eager"])
            print(
                f"{batch:>6}{best_onnx:>19,.0f}{best_eager:>13,.0f}{best_onnx / best_eager:>7.2f}x"
                f"{apart:>15.2g}"
            )
            if args.profile:
                profile(artifact, batches, args.threads, Path(tmp))


if __name__ == "__main__":
    main()
