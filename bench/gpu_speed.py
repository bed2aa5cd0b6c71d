"""ONNX Runtime on CUDA beside ONNX Runtime on CPU and eager PyTorch on CUDA.

    python bench/gpu_speed.py ARTIFACT_DIR

On the embedded 1,000 test images (tiled to 10,000 for throughput) prints, for each runner,
model-only images/s at batch 1, 256 and 2048 (`Runtime.predict`, IO binding on CUDA), `lossx
eval` end to end at batch 2048, and parity with the CPU: the max absolute logit difference and
top-1 agreement, with TF32 off (lossx's default) and on. bench/gpu_check.sh runs it.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime

from lossx.runtime import ImageSet, load_packaged_sample, open_artifact
from lossx.runtime.cifar10 import CONTRACT

BATCHES = (1, 256, 2048)


def images_per_second(predict, images: np.ndarray, batch: int) -> float:
    count = 1000 if batch == 1 else len(images)
    predict(images[:batch])  # warm-up: first-run allocations and kernel choice
    started = time.perf_counter()
    for start in range(0, count, batch):
        predict(images[start : start + batch])
    return count / (time.perf_counter() - started)


def eager_cuda(artifact_dir: Path):
    """Eager PyTorch on the GPU with TF32 off, or None without torch/CUDA."""
    try:
        import torch

        from lossx.build.eager import EagerRunner
        from lossx.runtime import load_artifact
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = EagerRunner.of_artifact(load_artifact(artifact_dir)).model.cuda().eval()

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(CONTRACT.to_model_input(batch)).cuda()).cpu().numpy()

    return predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    args = parser.parse_args()
    sample = load_packaged_sample()
    images = np.concatenate([sample.images] * 10)
    workload = ImageSet(images, np.concatenate([sample.labels] * 10), sample.class_names, "x10")
    cpu = open_artifact(args.artifact, "cpu")
    reference = cpu.predict(sample.images).logits
    runners = {
        "onnxruntime cpu": cpu,
        "onnxruntime cuda": open_artifact(args.artifact, "cuda"),
        "onnxruntime cuda tf32": open_artifact(args.artifact, "cuda", tf32=True),
    }
    print(f"onnxruntime {onnxruntime.__version__}; {len(images):,} images (1,000 at batch 1)")
    header = "".join(f"{f'batch {b} img/s':>18}" for b in BATCHES)
    print(f"{'runner':<24}{header}{'eval img/s':>12}{'max abs vs cpu':>16}{'top-1 agree':>13}")
    for name, runtime in runners.items():
        speeds = "".join(
            f"{images_per_second(runtime.predict, images, b):>18,.0f}" for b in BATCHES
        )
        evaluated = runtime.evaluate(workload, batch_size=2048)
        logits = runtime.predict(sample.images).logits
        agree = (logits.argmax(1) == reference.argmax(1)).mean()
        print(
            f"{name:<24}{speeds}{evaluated.images_per_second:>12,.0f}"
            f"{np.abs(logits - reference).max():>16.3g}{agree:>13.2%}  {runtime.providers}"
        )
    eager = eager_cuda(args.artifact)
    if eager is not None:
        speeds = "".join(f"{images_per_second(eager, images, b):>18,.0f}" for b in BATCHES)
        logits = eager(sample.images)
        agree = (logits.argmax(1) == reference.argmax(1)).mean()
        print(
            f"{'eager torch cuda':<24}{speeds}{'':>12}"
            f"{np.abs(logits - reference).max():>16.3g}{agree:>13.2%}"
        )


if __name__ == "__main__":
    main()
