"""Augmentation throughput: lossx's vectorised crop+flip against per-image torchvision transforms.

    python bench/augmentation.py --data-dir ../shared/data/cifar10

Both produce random 32x32 crops of 4-pixel zero-padded images, flipped left-right with p=0.5,
as float32 NCHW in [0, 1]. Prints images/s for each, measured side by side in one run.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from lossx.runtime import load_cifar10
from lossx.runtime.cifar10 import CONTRACT
from lossx.training.schedule import augment

BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    split = load_cifar10(args.data_dir, "train" if args.data_dir else "test", args.images)
    rng = np.random.default_rng(0)

    started = time.perf_counter()
    for start in range(0, len(split), BATCH):
        torch.from_numpy(CONTRACT.to_model_input(augment(split.images[start : start + BATCH], rng)))
    vectorised = len(split) / (time.perf_counter() - started)

    per_image = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )
    started = time.perf_counter()
    for start in range(0, len(split), BATCH):
        torch.stack([per_image(Image.fromarray(x)) for x in split.images[start : start + BATCH]])
    pil = len(split) / (time.perf_counter() - started)

    print(f"{len(split):,} images, batch {BATCH}, {torch.get_num_threads()} torch threads")
    print(f"{'pipeline':<44}{'images/s':>12}")
    print(f"{'lossx: vectorised uint8 crop+flip, scale':<44}{vectorised:>12,.0f}")
    print(f"{'torchvision: PIL RandomCrop+Flip+ToTensor':<44}{pil:>12,.0f}")
    print(f"{'ratio':<44}{vectorised / pil:>11.1f}x")


if __name__ == "__main__":
    main()
