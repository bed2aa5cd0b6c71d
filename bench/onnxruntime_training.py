"""lossx's training step beside onnxruntime-training 1.19.2's and eager torch's, in one run.

    python bench/onnxruntime_training.py [--anchor-venv ../ortt] [--data-dir DIR]
        [--models tudui,resnet20] [--threads 2] [--steps 10] [--rounds 3]
        [--trainable 'resnet20=fc.*']

onnxruntime-training stopped at 1.19.2 and needs its own venv (numpy<2, onnx 1.16, torch):

    python3 -m venv ../ortt && ../ortt/bin/pip install onnxruntime-training==1.19.2 \\
        'onnx==1.16.*' 'numpy<2' torch==2.14.1

Without it (no --anchor-venv, or its python missing) the anchor's column says so and the rest
runs. For each model (seeded random weights) and batch size (64, 256), on the same batches of
the default recipe (the packaged test images without --data-dir):

- onnxruntime-training: its artifacts generated from a train-mode forward export
  (torch.onnx.export, TrainingMode.TRAINING, dynamo=False), cross-entropy and its SGD (plain:
  no momentum, no weight decay, no clipping), Module + Optimizer.step, in its venv
  (bench/ort_training_anchor.py);
- lossx: `lossx train --engine onnxruntime`'s step (train_ce.onnx, then optimizer_sgd.onnx:
  clipping, Nesterov momentum, weight decay);
- eager torch: `lossx train --engine torch`'s step (channels-last, torch.optim.SGD).

With --trainable 'resnet20=fc.*' also a fine-tuning row for that model: only those
parameters train in all three (onnxruntime-training's requires_grad, lossx's --trainable,
torch's requires_grad_).
Prints images/s (best round) and lossx's speed over each.
"""

import argparse
import itertools
import json
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from runtime_speed import cpu_name

from lossx.build import export_artifact
from lossx.build.models import build_model
from lossx.build.torch_engine import TorchEngine
from lossx.runtime import load_artifact, load_cifar10, load_packaged_sample
from lossx.runtime.options import SessionOptions
from lossx.training.ort_engine import OnnxRuntimeEngine
from lossx.training.recipe import TrainConfig, frozen_parameters
from lossx.training.schedule import epoch_batches


def best_rate(engine, batches, rounds: int) -> float:
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        for images, labels in batches:
            engine.step(images, labels, 0.01, 0.9)
        rates.append(sum(len(y) for _, y in batches) / (time.perf_counter() - started))
    return max(rates)


def anchor_rate(venv: Path | None, model_name, batches, trainable, args, work: Path) -> str:
    """onnxruntime-training's images/s on `batches`, or why there is none."""
    python = venv / "bin" / "python" if venv else None
    if python is None or not python.exists():
        return "not installed"
    model = build_model(model_name, seed=0).train()
    forward = work / "forward.onnx"
    warnings.simplefilter("ignore")  # the legacy exporter's, which the anchor needs
    torch.onnx.export(model, (torch.from_numpy(batches[0][0]),), str(forward),
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                      dynamo=False, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17)  # fmt: skip
    arrays = {"count": np.array(len(batches))}
    for index, (images, labels) in enumerate(batches):
        arrays[f"images{index}"], arrays[f"labels{index}"] = images, labels
    np.savez(work / "batches.npz", **arrays)
    command = [str(python), str(Path(__file__).with_name("ort_training_anchor.py")),
               str(forward), str(work / "batches.npz"), str(work / "anchor"),
               "--requires-grad", ",".join(trainable), "--threads", str(args.threads),
               "--rounds", str(args.rounds)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return f"failed: {result.stderr.strip().splitlines()[-1]}"
    return json.loads(result.stdout.strip().splitlines()[-1])["images_per_second"]


def measure(model_name: str, split, args, fine_tune: tuple[str, ...] | None) -> None:
    names = [n for n, _ in build_model(model_name, seed=0).named_parameters()]
    frozen = frozen_parameters(names, fine_tune, None)
    trainable = [n for n in names if n not in frozen]
    for batch in (64, 256):
        steps = args.steps if batch == 64 else max(2, args.steps // 4)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            export_artifact(work / "a", model_name, losses=["ce"], init="random", seed=0,
                            train=True, trainable=fine_tune)  # fmt: skip
            config = TrainConfig(model=model_name, batch_size=batch, seed=0, trainable=fine_tune)
            artifact = load_artifact(work / "a")
            batches = list(itertools.islice(epoch_batches(split, config, 1, artifact.contract),
                                            steps))  # fmt: skip
            anchor = anchor_rate(args.anchor_venv, model_name, batches, trainable, args, work)
            lossx = best_rate(OnnxRuntimeEngine(artifact, config, work / "o.npz",
                                                SessionOptions(threads=args.threads)),
                              batches, args.rounds)  # fmt: skip
            eager = best_rate(TorchEngine(config, work / "t.pt"), batches, args.rounds)
        what = f"{model_name}, {'last layer' if fine_tune else 'all'}"
        anchor_text = f"{anchor:,.0f}" if isinstance(anchor, float) else anchor
        over_anchor = f"{lossx / anchor:.2f}x" if isinstance(anchor, float) else "-"
        print(f"| {what} | {batch} | {anchor_text} | {lossx:,.0f} | {eager:,.0f} | "
              f"{over_anchor} | {lossx / eager:.2f}x |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchor-venv", type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--models", default="tudui,resnet20")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trainable", help="fine-tuning rows, MODEL=GLOB[,GLOB...][;MODEL=...]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = (load_cifar10(args.data_dir, "train", limit=256 * args.steps) if args.data_dir
             else load_packaged_sample())  # fmt: skip
    print(f"{cpu_name()}, {args.threads} threads; images/s, best of {args.rounds} rounds\n")
    print("| model, trains | batch | onnxruntime-training 1.19.2 | lossx (onnxruntime) | "
          "eager torch | lossx / ort-training | lossx / torch |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    heads = dict(item.split("=", 1) for item in args.trainable.split(";")) if args.trainable else {}
    for model_name in args.models.split(","):
        measure(model_name, split, args, None)
        if model_name in heads:
            measure(model_name, split, args, tuple(heads[model_name].split(",")))


if __name__ == "__main__":
    main()
