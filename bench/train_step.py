"""One training step in ONNX Runtime beside eager PyTorch: `lossx train`'s two engines.

    python bench/train_step.py [--data-dir DIR] [--model tudui] [--threads 2] [--steps 20]
        [--rounds 3] [--profile]

Exports seeded random weights with `--train` (the torch engine starts from the same ones), then
runs the step each engine of `lossx train` takes, on the same batches of the default recipe
(shuffled, augmented training images; the packaged test images without --data-dir) with the
one-cycle schedule, at batch 64 and 256:

- onnxruntime: train_ce.onnx in ONNX Runtime, then clipping and Nesterov SGD in numpy;
- torch: eager forward, backward, clipping and torch.optim.SGD, channels-last as `lossx train`
  runs it, and in the default contiguous (NCHW) memory format beside it.

The engines alternate in rounds of --steps steps; the best round of each counts. Prints
images/s, the ratio, and how far apart the two engines' weights are after the same steps.
--profile adds ONNX Runtime's time per operator type (SessionOptions.enable_profiling).
"""

import argparse
import collections
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lossx.build import export_artifact
from lossx.build.torch_engine import TorchEngine
from lossx.runtime import load_artifact, load_cifar10, load_packaged_sample
from lossx.runtime.options import TrainConfig
from lossx.runtime.ort_engine import OnnxRuntimeEngine
from lossx.runtime.recipe import epoch_batches, one_cycle


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
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--model", default="tudui", help="a registry name or MODULE:ATTR")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.data_dir:
        split = load_cifar10(args.data_dir, "train", limit=256 * args.steps)
    else:
        split = load_packaged_sample()
    total_steps = args.rounds * args.steps
    with tempfile.TemporaryDirectory() as tmp:
        export_artifact(
            Path(tmp) / "a", args.model, losses=["ce"], init="random", seed=0, train=True
        )
        artifact = load_artifact(Path(tmp) / "a")
        print(
            f"{args.model}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps "
            f"of the default recipe on {split.source}, best round"
        )
        print(f"{'batch':>6}{'onnxruntime img/s':>19}{'torch img/s':>13}{'ratio':>8}"
              f"{'torch NCHW img/s':>18}{'channels-last gain':>20}"
              f"{'weights apart':>15}")  # fmt: skip
        for batch in (64, 256):
            config = TrainConfig(model=args.model, batch_size=batch, seed=0)
            batches = list(itertools.islice(epoch_batches(split, config, 1), args.steps))
            onnx = OnnxRuntimeEngine(
                artifact, config, Path(tmp) / "o.npz", {"threads": args.threads}
            )
            eager = TorchEngine(config, Path(tmp) / "t.pt")
            nchw = TorchEngine(config, Path(tmp) / "n.pt", torch.contiguous_format)
            speeds = {"onnx": [], "eager": [], "nchw": []}
            for round_index in range(args.rounds):
                first = round_index * args.steps
                speeds["onnx"].append(timed_round(onnx, batches, first, total_steps))
                speeds["eager"].append(timed_round(eager, batches, first, total_steps))
                speeds["nchw"].append(timed_round(nchw, batches, first, total_steps))
            weights = onnx.weights()
            apart = max(
                float(np.abs(weights[k] - v.numpy()).max() / max(np.abs(v.numpy()).max(), 1e-12))
                for k, v in eager.model.state_dict().items()
            )
            best_onnx, best_eager, best_nchw = (max(speeds[k]) for k in ("onnx", "eager", "nchw"))
            print(f"{batch:>6}{best_onnx:>19,.0f}{best_eager:>13,.0f}"
                  f"{best_onnx / best_eager:>7.2f}x{best_nchw:>18,.0f}"
                  f"{best_eager / best_nchw:>19.2f}x{apart:>15.2g}")  # fmt: skip
            if args.profile:
                profile(artifact, batches, args.threads, Path(tmp))


if __name__ == "__main__":
    main()
