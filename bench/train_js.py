"""Training steps/s of one artifact in Python, Node.js and a browser tab, on the same plan.

    python bench/train_js.py --data-dir ../shared/data/cifar10 [--steps 32] [--batch-size 64]

Exports the shipped seed CNN with its ce training graph into a temporary folder, writes a plan of
--steps steps (`lossx train --write-plan`, the default recipe on the first steps x batch-size
training images), then replays it three ways, one after the other on the same machine:

- Python: lossx's onnxruntime engine step (onnxruntime, numpy SGD), --threads intra-op threads;
- Node.js: examples/node/train.js (onnxruntime-node, JavaScript SGD), --threads;
- browser: examples/web in headless Debian Chromium (onnxruntime-web's WASM backend, as many
  threads as the page takes: up to 4, one per core), driven by examples/web/drive.js.

Each figure times the steps alone (sessions opened and files read beforehand), the first step
included, and is the best of --repeats trials, the runtimes taking turns. The table gives
steps/s, images/s, the ratio to Python and each runtime's largest weight difference from
Python's after the last step. Needs node, Chromium and both examples' npm packages (.ci/run).
"""

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime

from lossx.build import export_artifact
from lossx.runtime import load_artifact
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.options import SessionOptions
from lossx.runtime.weights import read_weights
from lossx.training.ort_engine import OnnxRuntimeEngine
from lossx.training.plan import read_plan, write_plan
from lossx.training.recipe import TrainConfig

REPO = Path(__file__).resolve().parents[1]
NODE_TRAIN = REPO / "examples" / "node" / "train.js"
WEB = REPO / "examples" / "web"


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line]
    return names[0] if names else platform.processor() or "unknown CPU"


def python_run(artifact_dir: Path, plan: Path, config: TrainConfig, threads: int, out: Path):
    """Replays the plan with lossx's onnxruntime engine: (seconds, weights, version)."""
    _, steps = read_plan(plan)
    artifact = load_artifact(artifact_dir)
    engine = OnnxRuntimeEngine(artifact, config, out, SessionOptions(threads=threads))
    started = time.perf_counter()
    for pixels, labels, lr, momentum in steps:
        engine.step(CONTRACT.scale(pixels), labels, lr, momentum)
    return (
        time.perf_counter() - started,
        engine.state_dict(),
        f"onnxruntime {onnxruntime.__version__}",
    )


def node_run(node: str, artifact_dir: Path, plan: Path, threads: int, out: Path):
    command = [node, str(NODE_TRAIN), str(artifact_dir), "--plan", str(plan), "--out", str(out),
               "--threads", str(threads), "--json"]  # fmt: skip
    report = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return report["seconds"], read_weights(out), f"onnxruntime-node {report['onnxruntime_node']}"


def browser_run(node: str, artifact_dir: Path, plan: Path, out: Path):
    serve = [node, str(WEB / "serve.js"), str(artifact_dir), "--plan", str(plan), "--port", "0"]
    server = subprocess.Popen(serve, stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        drive = [node, str(WEB / "drive.js"), url, str(out)]
        subprocess.run(drive, check=True, capture_output=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
    results = json.loads((out / "results.json").read_text())
    train = results["train"]
    what = (f"onnxruntime-web {results['onnxruntime_web']} ({results['threads']} threads), "
            f"Chromium {results['browser']}")  # fmt: skip
    return train["seconds"], read_weights(out / "weights.npz"), what


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="trials; the best counts")
    parser.add_argument("--no-browser", action="store_true", help="Python and Node.js only")
    args = parser.parse_args()
    node = shutil.which("node")
    if node is None:
        parser.error("node is not on PATH")

    config = TrainConfig(epochs=1, batch_size=args.batch_size, limit=args.steps * args.batch_size)
    runtimes = ["Python", "Node.js"] + ([] if args.no_browser else ["browser (WASM)"])
    best = dict.fromkeys(runtimes, float("inf"))
    with tempfile.TemporaryDirectory(prefix="lossx-bench-train-js-") as scratch:
        scratch = Path(scratch)
        artifact_dir = scratch / "artifact"
        export_artifact(artifact_dir, losses=["ce"], train=True)
        plan = scratch / "plan.npz"
        steps, images = write_plan(plan, args.data_dir, config)
        for trial in range(args.repeats):  # the runtimes take turns, so drifting load hits all
            folder = scratch / str(trial)
            folder.mkdir()
            for name in runtimes:
                if name == "Python":
                    run = python_run(artifact_dir, plan, config, args.threads, folder / "p.npz")
                elif name == "Node.js":
                    run = node_run(node, artifact_dir, plan, args.threads, folder / "n.npz")
                else:
                    run = browser_run(node, artifact_dir, plan, folder)
                seconds, weights, what = run
                if seconds < best[name]:
                    best[name] = seconds
                if trial == 0:
                    best[name, "weights"], best[name, "what"] = weights, what

    print(f"{cpu_name()}, {args.threads} threads (browser: the page's own), {steps} steps of "
          f"{args.batch_size} images ({images:,} images), seed CNN, ce")  # fmt: skip
    print()
    print("| runtime | version | steps/s | images/s | x Python | max weight diff vs Python |")
    print("|---|---|---|---|---|---|")
    reference = best["Python", "weights"]
    for name in runtimes:
        weights = best[name, "weights"]
        diff = max(float(np.abs(weights[k] - reference[k]).max()) for k in reference)
        rate = steps / best[name]
        ratio = best["Python"] / best[name]
        print(f"| {name} | {best[name, 'what']} | {rate:.2f} | {rate * args.batch_size:,.0f} | "
              f"{ratio:.2f} | {diff:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
