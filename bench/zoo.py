"""The zoo matrix: torchvision's classifiers (and a small ViT) through every command.

    python bench/zoo.py --data-dir ../shared/data/cifar10 [--sizes 32 64] [--models resnet18 ...]

For each model and image size, as a user runs them (each command its own process, timed, its
peak memory read from the kernel): `lossx export --train` (random weights, 10 classes, dropout
0.0 where the constructor has it), `lossx check` of every graph (training graphs included) on
64 real images, then 4 steps of `lossx train` with each engine on the same 64 images (no
augmentation), and the largest difference of the two runs' weights, relative to each tensor's
largest |weight| (at least 1e-3); beside it, the same for two torch runs, on 1 and on 2 threads
(oneDNN splits its sums otherwise): how far rounding alone carries the weights in those steps.
Prints a table; the first line of any error in the last column.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODELS = {
    "resnet18": ("torchvision.models:resnet18", []),
    "mobilenet_v2": ("torchvision.models:mobilenet_v2", ["dropout=0.0"]),
    "mobilenet_v3_small": ("torchvision.models:mobilenet_v3_small", ["dropout=0.0"]),
    "shufflenet_v2_x0_5": ("torchvision.models:shufflenet_v2_x0_5", []),
    "squeezenet1_1": ("torchvision.models:squeezenet1_1", ["dropout=0.0"]),
    "efficientnet_b0": (
        "torchvision.models:efficientnet_b0",
        ["dropout=0.0", "stochastic_depth_prob=0.0"],
    ),
    "regnet_x_400mf": ("torchvision.models:regnet_x_400mf", []),
    "vit (TransformerEncoder)": ("tests.build.zoo_models:SmallViT", ["dropout=0.0"]),
}
RECIPE = ["--epochs", "1", "--limit", "64", "--batch-size", "16", "--no-augment", "--seed", "0"]


def run(command: list[str], env: dict[str, str] | None = None) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS of that process in GB, last line of its stderr)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                 env={**os.environ, **(env or {})})  # fmt: skip
        _, status, usage = os.wait4(child.pid, 0)
        err.seek(0)
        last = (err.read().strip().splitlines() or [""])[-1]
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.perf_counter() - started, usage.ru_maxrss / 1e6, last


def lossx(*args: str) -> list[str]:
    return [sys.executable, "-m", "lossx.cli", *map(str, args)]


def one(name: str, size: int, data: Path, work: Path) -> list[str]:
    target, extra = MODELS[name]
    args = ["num_classes=10", *extra] + ([f"image_size={size}"] if "ViT" in target else [])
    model = ["--model", target] + [part for a in args for part in ("--model-arg", a)]
    shape = ["--input-shape", f"3,{size},{size}"]
    art = work / f"{name.split()[0]}-{size}"
    row = [name, str(size)]
    code, seconds, peak, last = run(lossx("export", art, *model, *shape, "--init", "random",
                                          "--train", "--loss", "ce"))  # fmt: skip
    row.append(f"{seconds:.0f} s, {peak:.1f} GB" if code == 0 else f"exit {code}")
    if code != 0:
        return [*row, "-", "-", "-", last]
    code, seconds, peak, last = run(lossx("check", art, "--data-dir", data, "--limit", "64"))
    row.append(f"{'PASS' if code == 0 else f'exit {code}'} {seconds:.0f} s, {peak:.1f} GB")
    if code != 0:
        return [*row, "-", "-", last]
    ort_run = run(lossx("train", art, "--engine", "onnxruntime", "--data-dir", data, *RECIPE,
                        "--out", work / "o.npz"))  # fmt: skip
    torch_run = run(lossx("train", "--data-dir", data, *model, *shape, *RECIPE,
                          "--out", work / "t.pt"))  # fmt: skip
    one_thread = run(lossx("train", "--data-dir", data, *model, *shape, *RECIPE,
                           "--out", work / "t1.pt"), {"OMP_NUM_THREADS": "1"})  # fmt: skip
    if ort_run[0] or torch_run[0] or one_thread[0]:
        return [*row, "-", "-", ort_run[3] or torch_run[3] or one_thread[3]]
    trained = _float_weights(torch.load(work / "t.pt", weights_only=True)["model"])
    other = _float_weights(torch.load(work / "t1.pt", weights_only=True)["model"])
    with np.load(work / "o.npz") as npz:
        onnx = {k: npz[k] for k in trained}
    return [*row, f"{_apart(onnx, trained):.1e}", f"{_apart(other, trained):.1e}", ""]


def _float_weights(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in state.items() if v.is_floating_point()}


def _apart(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """The largest difference of two runs' weights, relative to each tensor's largest |weight|
    (at least 1e-3)."""
    return max(
        float(np.abs(got[k] - v).max() / max(float(np.abs(v).max()), 1e-3)) for k, v in want.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    )
    header = ["model", "size", "export --train", "check (all graphs)", "train parity",
              "torch 1 vs 2 threads", "error"]  # fmt: skip
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            for size in args.sizes:
                row = one(name, size, args.data_dir, Path(scratch))
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
