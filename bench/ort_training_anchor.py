"""The onnxruntime-training 1.19.2 side of bench/onnxruntime_training.py, run by that package's
own venv (it needs numpy<2, onnx 1.16 and torch, and its onnxruntime is 1.19.2: it cannot share
lossx's). Imports nothing of lossx.

    ANCHOR/bin/python bench/ort_training_anchor.py FORWARD.onnx BATCHES.npz OUT_DIR
        --requires-grad NAME,... [--optimizer sgd|adamw] [--threads 2] [--rounds 3]

Generates the training artifacts (generate_artifacts: cross-entropy, the optimizer) from the
train-mode forward graph, then times Module(images, labels) + Optimizer.step() +
lazy_reset_grad() over the batches, best round of --rounds; prints JSON {images_per_second}.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnxruntime.training import artifacts
from onnxruntime.training.api import CheckpointState, Module, Optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("forward", type=Path)
    parser.add_argument("batches", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--requires-grad", required=True)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(args.forward))
    trainable = args.requires_grad.split(",")
    others = [t.name for t in model.graph.initializer if t.name not in trainable]
    optimizer = {"sgd": artifacts.OptimType.SGD, "adamw": artifacts.OptimType.AdamW}
    artifacts.generate_artifacts(
        model,
        requires_grad=trainable,
        frozen_params=others,
        loss=artifacts.LossType.CrossEntropyLoss,
        optimizer=optimizer[args.optimizer],
        artifact_directory=str(args.out),
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    state = CheckpointState.load_checkpoint(str(args.out / "checkpoint"))
    # no eval model: with batch norm, the one generate_artifacts writes does not load
    module = Module(str(args.out / "training_model.onnx"), state, session_options=options)
    step = Optimizer(str(args.out / "optimizer_model.onnx"), module)
    module.train()
    with np.load(args.batches) as npz:
        batches = [(npz[f"images{i}"], npz[f"labels{i}"]) for i in range(int(npz["count"]))]
    rates = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for images, labels in batches:
            module(images, labels)
            step.step()
            module.lazy_reset_grad()
        rates.append(sum(len(y) for _, y in batches) / (time.perf_counter() - started))
    print(json.dumps({"images_per_second": max(rates), "onnxruntime": onnxruntime.__version__}))


if __name__ == "__main__":
    main()
