"""`lossx eval` on an image folder of JPEG files, beside decoding alone and beside torchvision.

    python bench/decode_speed.py --data-dir ../shared/data/cifar10 [--images 10000] [--workers 2]

Writes the first --images CIFAR-10 training images as JPEG files (Pillow, quality 90) in
torchvision's ImageFolder layout, then times, in one run, side by side:
- lossx: `Runtime.evaluate` of the shipped seed CNN over the folder (decoding, preprocessing,
  the model and its loss graphs), the decode pool at --workers threads;
- Pillow alone: the same files decoded and converted to RGB by --workers threads (the floor
  lossx can reach if the model hides behind decoding);
- torchvision: `ImageFolder` + `DataLoader(num_workers=--workers)` feeding the eager model, what
  a user runs today.
Each is timed --repeats times; the best is kept. Goals (issue 30): lossx >= 0.85x Pillow alone,
>= 1.5x torchvision.
"""

import argparse
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lossx.build import export_artifact
from lossx.build.models import build_model, load_checkpoint, packaged_weights
from lossx.runtime import Runtime, load_artifact, load_cifar10
from lossx.runtime.image_folder import walk
from lossx.runtime.options import SessionOptions


def write_folder(root: Path, data_dir: Path, count: int) -> list[Path]:
    split = load_cifar10(data_dir, "train", count)
    for index, (image, label) in enumerate(zip(split.images, split.labels, strict=True)):
        folder = root / split.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:05d}.jpg", quality=90)
    return list(walk(root))


def best(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def pillow_alone(files: list[Path], workers: int) -> None:
    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(decode, files, chunksize=64):
            pass


def torchvision_loader(root: Path, workers: int, batch: int) -> None:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    model = build_model("tudui")
    load_checkpoint(model, packaged_weights("tudui"))
    loader = torch.utils.data.DataLoader(
        ImageFolder(str(root), transform=ToTensor()), batch_size=batch, num_workers=workers
    )
    correct = 0
    with torch.inference_mode():
        for images, labels in loader:
            correct += int((model(images).argmax(1) == labels).sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.workers)
    with tempfile.TemporaryDirectory() as scratch:
        root, art = Path(scratch) / "jpegs", Path(scratch) / "art"
        files = write_folder(root, args.data_dir, args.images)
        export_artifact(art, losses=["ce"])
        runtime = Runtime(load_artifact(art), SessionOptions(threads=args.workers),
                          args.batch_size)  # fmt: skip
        accuracy = []

        def lossx_eval() -> None:
            data = runtime.dataset(root, "test")
            accuracy.append(runtime.evaluate(data).top1_accuracy)

        seconds = {
            "lossx eval (decode pool + ONNX Runtime)": best(args.repeats, lossx_eval),
            "Pillow decoding alone": best(args.repeats, lambda: pillow_alone(files, args.workers)),
            "torchvision ImageFolder + DataLoader + eager torch": best(
                args.repeats, lambda: torchvision_loader(root, args.workers, args.batch_size)
            ),
        }
    machine = platform.processor() or platform.machine()
    print(f"{len(files):,} JPEG files (32x32, quality 90), {args.workers} workers, {machine}; "
          f"lossx accuracy {accuracy[-1]:.2%}")  # fmt: skip
    base = seconds["lossx eval (decode pool + ONNX Runtime)"]
    print("| pipeline | seconds | images/s | lossx speed relative to it |\n|---|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.2f} | {len(files) / value:,.0f} | {value / base:.2f}x |")


if __name__ == "__main__":
    main()
