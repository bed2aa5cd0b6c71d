"""One training step in ONNX Runtime (training graph + numpy SGD) beside eager PyTorch.

    python bench/train_step.py [--threads 2] [--steps 20]

Exports the shipped weights with `--train`, then times, side by side in one run, at batch 64
and 256 on real CIFAR-10 test images: ONNX Runtime running train_ce.onnx plus a numpy SGD
update (momentum 0.9, weight decay 5e-4), and eager PyTorch doing forward, backward and
torch.optim.SGD with the same settings. Prints images/s, the ratio, and how far the two sides'
weights are apart after the same steps.
"""

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lossx.build import export_artifact
from lossx.parity.eager import EagerRunner
from lossx.runtime import load_artifact, load_packaged_sample, to_model_input
from lossx.runtime.session import open_session

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


def onnx_steps(artifact, images, labels, batch: int, steps: int, threads: int):
    spec = artifact.graph("train_ce").spec
    session = open_session(artifact.path / spec.file, "cpu", threads)
    params = artifact.parameters()
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    names = spec.input_names[2:]
    started = time.perf_counter()
    for step in range(steps):
        start = (step * batch) % (len(labels) - batch)
        feed = {"images": images[start : start + batch], "labels": labels[start : start + batch]}
        outputs = session.run([f"grad.{n}" for n in names], {**feed, **params})
        for name, grad in zip(names, outputs, strict=True):
            grad = grad + WEIGHT_DECAY * params[name]
            velocity[name] = MOMENTUM * velocity[name] + grad
            params[name] = params[name] - LR * velocity[name]
    return steps * batch / (time.perf_counter() - started), params


def eager_steps(artifact, images, labels, batch: int, steps: int):
    model = EagerRunner(artifact).model.train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    started = time.perf_counter()
    for step in range(steps):
        start = (step * batch) % (len(labels) - batch)
        optimizer.zero_grad()
        F.cross_entropy(model(x[start : start + batch]), y[start : start + batch]).backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    return steps * batch / seconds, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    sample = load_packaged_sample()
    images, labels = to_model_input(sample.images), sample.labels
    with tempfile.TemporaryDirectory() as tmp:
        export_artifact(Path(tmp) / "a", losses=["ce"], train=True)
        artifact = load_artifact(Path(tmp) / "a")
        print(f"{args.threads} threads, {args.steps} steps of SGD (lr {LR}, momentum {MOMENTUM})")
        print(f"{'batch':>6}{'ONNX Runtime img/s':>20}{'eager img/s':>13}{'ratio':>8}"
              f"{'max |w_onnx - w_eager|':>25}")  # fmt: skip
        for batch in (64, 256):
            onnx_speed, onnx_weights = onnx_steps(
                artifact, images, labels, batch, args.steps, args.threads
            )
            eager_speed, eager_weights = eager_steps(artifact, images, labels, batch, args.steps)
            drift = max(np.abs(onnx_weights[k] - eager_weights[k]).max() for k in eager_weights)
            print(
                f"{batch:>6}{onnx_speed:>20,.0f}{eager_speed:>13,.0f}"
                f"{onnx_speed / eager_speed:>7.2f}x{drift:>25.3g}"
            )


if __name__ == "__main__":
    main()
