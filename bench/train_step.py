"""One training step in ONNX Runtime beside eager PyTorch: `lossx train`'s two engines.

    python bench/train_step.py [--data-dir DIR] [--models tudui,resnet20] [--threads 2]
        [--steps 20] [--rounds 3] [--profile] [--trainable GLOB[,GLOB...]]

For each model, exports seeded random weights with `--train` (the torch engine starts from the
same ones), then runs the step each engine of `lossx train` takes, on the same batches of the
default recipe (shuffled, augmented training images; the packaged test images without
--data-dir) with the one-cycle schedule, at batch 64 and 256:

- onnxruntime: train_ce.onnx in ONNX Runtime, then the update graph (clipping, Nesterov SGD);
- torch: eager forward, backward, clipping and torch.optim.SGD, channels-last as `lossx train`
  runs it, and in the default contiguous (NCHW) memory format beside it.

The engines alternate in rounds of --steps steps (a quarter as many at batch 256); the best
round of each counts. Prints images/s, the ratio, the share of this machine's fp32 peak each
engine reaches (the best sgemm rate of ONNX Runtime, torch.mm and numpy, measured in the same
run, against a step's FLOPs: forward, weight gradients and input gradients of every Conv2d and
Linear but the first layer's input gradient), and how far apart the two engines' weights are
after the same steps. --profile adds ONNX Runtime's time per operator type
(SessionOptions.enable_profiling). --trainable trains only the parameters its globs match in
both engines (fine-tuning: the artifact exported with --trainable, the torch engine given the
same); the FLOPs and peak shares then still count a full step.
"""

import argparse
import collections
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from runtime_speed import cpu_name, gemm_peaks, layer_flops, load_line

from lossx.build import export_artifact
from lossx.build.models import build_model
from lossx.build.torch_engine import TorchEngine
from lossx.runtime import load_artifact, load_cifar10, load_packaged_sample
from lossx.runtime.options import SessionOptions
from lossx.training.ort_engine import OnnxRuntimeEngine
from lossx.training.recipe import TrainConfig
from lossx.training.schedule import epoch_batches, one_cycle


def timed_round(engine, batches, first_step: int, total_steps: int) -> float:
    started = time.perf_counter()
    for index, (images, labels) in enumerate(batches):
        engine.step(images, labels, *one_cycle(first_step + index, total_steps, 0.02))
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
    parameters = artifact.state_dict()
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


def step_flops(model_name: str) -> int:
    """FLOPs of one training step per image: every Conv2d and Linear's forward and weight
    gradient, and its input gradient but for the first layer (the images need none)."""
    layers = [flops for _, flops in layer_flops(build_model(model_name))]
    return 3 * sum(layers) - layers[0]


def measure(model_name: str, split, args, peak: float) -> None:
    total_steps = args.rounds * args.steps
    with tempfile.TemporaryDirectory() as tmp:
        export_artifact(Path(tmp) / "a", model_name, losses=["ce"], init="random", seed=0,
                        train=True, trainable=args.trainable)  # fmt: skip
        artifact = load_artifact(Path(tmp) / "a")
        flops = step_flops(model_name)
        print(f"\n{model_name}: {flops / 1e6:.1f} MFLOP per image per step")
        print(f"{'batch':>6}{'onnxruntime img/s':>19}{'torch img/s':>13}{'ratio':>8}"
              f"{'ORT % peak':>12}{'torch % peak':>14}{'torch NCHW img/s':>18}"
              f"{'weights apart':>15}")  # fmt: skip
        for batch in (64, 256):
            steps = args.steps if batch == 64 else max(2, args.steps // 4)
            config = TrainConfig(model=model_name, batch_size=batch, seed=0,
                                 trainable=args.trainable)  # fmt: skip
            batches = epoch_batches(split, config, 1, artifact.contract)
            batches = list(itertools.islice(batches, steps))
            onnx = OnnxRuntimeEngine(
                artifact, config, Path(tmp) / "o.npz", SessionOptions(threads=args.threads)
            )
            eager = TorchEngine(config, Path(tmp) / "t.pt")
            nchw = TorchEngine(config, Path(tmp) / "n.pt", torch.contiguous_format)
            speeds = {"onnx": [], "eager": [], "nchw": []}
            for round_index in range(args.rounds):
                first = round_index * steps
                speeds["onnx"].append(timed_round(onnx, batches, first, total_steps))
                speeds["eager"].append(timed_round(eager, batches, first, total_steps))
                speeds["nchw"].append(timed_round(nchw, batches, first, total_steps))
            weights = onnx.state_dict()
            apart = max(
                float(np.abs(weights[k] - v.numpy()).max() / max(np.abs(v.numpy()).max(), 1e-12))
                for k, v in eager.model.state_dict().items()
            )
            best_onnx, best_eager, best_nchw = (max(speeds[k]) for k in ("onnx", "eager", "nchw"))
            print(f"{batch:>6}{best_onnx:>19,.0f}{best_eager:>13,.0f}"
                  f"{best_onnx / best_eager:>7.2f}x{best_onnx * flops / peak:>12.0%}"
                  f"{best_eager * flops / peak:>14.0%}{best_nchw:>18,.0f}"
                  f"{apart:>15.2g}")  # fmt: skip
            if args.profile:
                profile(artifact, batches, args.threads, Path(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument(
        "--models", default="tudui,resnet20", help="registry names or MODULE:ATTR, comma-separated"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--trainable", type=lambda text: tuple(text.split(",")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.data_dir:
        split = load_cifar10(args.data_dir, "train", limit=64 * args.steps)
    else:
        split = load_packaged_sample()
    peaks = gemm_peaks(args.threads, 3, 0.25)
    name, size, peak = max(
        ((n, k, r) for n, rates in peaks.items() for k, r in rates.items()), key=lambda x: x[2]
    )
    print(f"{cpu_name()}, {args.threads} threads; {load_line('start', os.cpu_count() or 1)}")
    print(
        f"fp32 peak {peak / 1e9:.1f} GFLOP/s ({name}, n={size}); {args.rounds} rounds of "
        f"{args.steps} steps (batch 64) of the default recipe on {split.source}, best round"
    )
    for model_name in args.models.split(","):
        measure(model_name, split, args, peak)
    print(load_line("end", os.cpu_count() or 1))


if __name__ == "__main__":
    main()
