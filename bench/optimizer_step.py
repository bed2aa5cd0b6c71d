"""The optimizer's update graph beside the same update in numpy and in torch.optim.

    python bench/optimizer_step.py [--models tudui,resnet20] [--threads 2] [--steps 50]

For each model's parameters (seeded random weights, random gradients), times one update of
every parameter, clipping included: the ONNX graph `lossx train --engine onnxruntime` runs
(lossx.runtime.optimizer_graphs, SGD and AdamW), Nesterov SGD written in numpy in place, and
torch.optim (SGD and AdamW, after clip_grad_norm_). Prints the best of three rounds in ms per
update.
"""

import argparse
import time

import numpy as np
import torch
from runtime_speed import cpu_name

from lossx.build.models import build_model
from lossx.runtime.optimizer_graphs import optimizer_model
from lossx.runtime.options import SessionOptions
from lossx.runtime.session import open_session
from lossx.training.optimizers import GraphOptimizer


def numpy_sgd(weights, buffers, grads, lr, momentum, decay, clip):
    """Nesterov SGD with clipping and weight decay, in place, in float32 numpy."""
    norm = np.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    factor = np.float32(min(clip / (norm + 1e-6), 1.0))
    for name, w in weights.items():
        g = grads[name] * factor
        g += decay * w
        buffer = buffers[name]
        buffer *= momentum
        buffer += g
        g += momentum * buffer
        g *= lr
        w -= g


def best_ms(update, steps: int, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            update()
        times.append((time.perf_counter() - started) / steps * 1e3)
    return min(times)


def measure(model_name: str, args) -> None:
    torch.set_num_threads(args.threads)
    model = build_model(model_name, seed=0)
    weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    rng = np.random.default_rng(0)
    grads = {n: rng.standard_normal(w.shape).astype(np.float32) for n, w in weights.items()}
    shapes = [(n, w.shape) for n, w in weights.items()]
    options = SessionOptions(threads=args.threads)
    row = [model_name, f"{sum(w.size for w in weights.values()):,}"]
    for rule in ("sgd", "adamw"):
        session = open_session(optimizer_model(rule, shapes), options)
        mine = GraphOptimizer(rule, session, dict(weights), 5e-4, 5.0)
        row.append(f"{best_ms(lambda m=mine: m.step(grads, 0.01, 0.9), args.steps):.2f}")
    buffers = {n: np.zeros_like(w) for n, w in weights.items()}
    copies = {n: w.copy() for n, w in weights.items()}
    numpy_step = lambda: numpy_sgd(copies, buffers, grads, 0.01, 0.9, 5e-4, 5.0)  # noqa: E731
    row.append(f"{best_ms(numpy_step, args.steps):.2f}")
    params = list(model.parameters())
    for name, param in model.named_parameters():
        param.grad = torch.from_numpy(grads[name].copy())
    for optimizer in (
        torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
        torch.optim.AdamW(params, lr=0.001, weight_decay=5e-4),
    ):

        def torch_step(o=optimizer):
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            o.step()

        row.append(f"{best_ms(torch_step, args.steps):.2f}")
    print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tudui,resnet20")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    print(f"{cpu_name()}, {args.threads} threads; ms per update of every parameter\n")
    print("| model | parameters | ONNX SGD | ONNX AdamW | numpy SGD | torch SGD | torch AdamW |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        measure(name, args)


if __name__ == "__main__":
    main()
