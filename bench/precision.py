"""fp32, int8 and fp16 side by side: file size, top-1, agreement with fp32, images/s.

    python bench/precision.py --data-dir ../shared/data/cifar10 --threads 2 [--provider cuda]

Exports the shipped model three times (`lossx export --precision fp32|int8|fp16`, int8
calibrated on the packaged training images) into a temporary folder, then prints one table:
model.onnx size (and its ratio to fp32), top-1 on the test images, argmax agreement with the
fp32 artifact, and images/s of the model graph alone at batch 1, 64 and 256 (inputs converted
beforehand; the best of --repeats trials of at least --min-seconds, the precisions taking turns
so drifting load hits all three). Also says which CPU ran it and whether it has VNNI, ONNX
Runtime's fast int8 path, and checks the goals (int8 <= 0.3x the size and within 1 point,
fp16 within 0.1 point; speed: int8 >= 1.5x fp32 with VNNI, fp16 >= 1.5x fp32 on CUDA at 256).
"""

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from lossx.build import export_artifact
from lossx.build.precision import has_vnni
from lossx.runtime import load_artifact, load_cifar10
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.options import SessionOptions
from lossx.runtime.precisions import PRECISIONS as PRECISION_RECORDS

PRECISIONS = tuple(PRECISION_RECORDS)
BATCH_SIZES = (1, 64, 256)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line]
    return names[0] if names else "unknown CPU"


def throughput(session, images: np.ndarray, min_seconds: float) -> float:
    feed = {"images": images}
    session.run(None, feed)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        session.run(None, feed)
        count += len(images)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="default: the packaged 1,000 test images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    args = parser.parse_args()

    test = load_cifar10(args.data_dir, "test")
    images = CONTRACT.to_model_input(test.images)
    with tempfile.TemporaryDirectory(prefix="lossx-bench-precision-") as scratch:
        artifacts, seconds = {}, {}
        for precision in PRECISIONS:
            started = time.perf_counter()
            export_artifact(Path(scratch) / precision, precision=precision)
            seconds[precision] = time.perf_counter() - started
            artifacts[precision] = load_artifact(Path(scratch) / precision)
        options = SessionOptions(args.provider, args.threads)
        sessions = {p: a.session("model", options) for p, a in artifacts.items()}
        logits = {
            p: np.concatenate([s.run(None, {"images": images[i : i + 256]})[0]
                               for i in range(0, len(images), 256)])
            for p, s in sessions.items()
        }  # fmt: skip
        speed = {(p, b): 0.0 for p in PRECISIONS for b in BATCH_SIZES}
        for _ in range(args.repeats):
            for batch in BATCH_SIZES:
                for precision in PRECISIONS:
                    got = throughput(sessions[precision], images[:batch], args.min_seconds)
                    speed[precision, batch] = max(speed[precision, batch], got)

    size = {p: a.manifest.files["model.onnx"]["bytes"] for p, a in artifacts.items()}
    top1 = {p: float(np.mean(v.argmax(1) == test.labels)) for p, v in logits.items()}
    agree = {p: float(np.mean(v.argmax(1) == logits["fp32"].argmax(1))) for p, v in logits.items()}
    vnni = has_vnni()
    print(f"CPU: {cpu_name()}; VNNI: {'yes' if vnni else 'no'}; provider {args.provider}, "
          f"{args.threads} threads; {len(test):,} test images ({test.source})")  # fmt: skip
    header = (
        f"{'precision':<10}{'model.onnx':>12}{'x fp32':>8}{'top-1':>9}{'agree':>9}"
        + "".join(f"{f'b{b} img/s':>13}" for b in BATCH_SIZES)
        + "".join(f"{f'b{b} x':>7}" for b in BATCH_SIZES)
        + f"{'export s':>10}"
    )
    print(header)
    for p in PRECISIONS:
        print(
            f"{p:<10}{size[p]:>12,}{size[p] / size['fp32']:>8.2f}{top1[p]:>9.2%}{agree[p]:>9.2%}"
            + "".join(f"{speed[p, b]:>13,.0f}" for b in BATCH_SIZES)
            + "".join(f"{speed[p, b] / speed['fp32', b]:>7.2f}" for b in BATCH_SIZES)
            + f"{seconds[p]:>10.1f}"
        )
    goals = [
        ("int8 model.onnx <= 0.30x fp32", size["int8"] <= 0.30 * size["fp32"]),
        ("int8 top-1 within 1 point of fp32", top1["int8"] >= top1["fp32"] - 0.01),
        ("fp16 top-1 within 0.1 point of fp32", top1["fp16"] >= top1["fp32"] - 0.001 - 1e-9),
    ]
    if args.provider == "cpu" and vnni:
        goals.append(("int8 >= 1.5x fp32 at batch 256 (VNNI)",
                      speed["int8", 256] >= 1.5 * speed["fp32", 256]))  # fmt: skip
    if args.provider == "cuda":
        goals.append(("fp16 >= 1.5x fp32 at batch 256 (CUDA, TF32 off)",
                      speed["fp16", 256] >= 1.5 * speed["fp32", 256]))  # fmt: skip
    for name, met in goals:
        print(f"{'MET' if met else 'MISSED':<7} {name}")


if __name__ == "__main__":
    main()
