"""The recipe's steps, which both engines take: data order, augmentation, LR schedule, clipping.

Everything here is numpy, so `lossx train --engine torch` and `--engine onnxruntime` draw the
same batches and take the same steps from the same seed. Epoch e's randomness (shuffle, then
crop offsets and flips) comes from a generator seeded with (seed, e): a resumed run needs no
generator state to continue exactly where it stopped. The loop that follows the recipe is
lossx.training.trainer's.
"""

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from lossx.errors import SpecError
from lossx.runtime.contract import ImageContract
from lossx.runtime.datasets import has_splits, load_dataset
from lossx.runtime.feeds import log_softmax
from lossx.runtime.image_set import ImageSet
from lossx.runtime.images import jpeg_copy
from lossx.training.recipe import TrainConfig

PAD = 4  # pixels of zeros around each side before a random crop of the image's own size
JPEG_PROBABILITY = 0.5  # of each training image being JPEG-compressed, with --jpeg-augment
JPEG_QUALITIES = (50, 95)  # drawn uniformly, both ends included
# torch.optim.lr_scheduler.OneCycleLR's defaults, which the schedule reproduces
WARMUP_FRACTION = 0.3
DIV_FACTOR = 25.0
FINAL_DIV_FACTOR = 1e4
MOMENTUM_RANGE = (0.85, 0.95)
EVAL_BATCH = 500  # images per evaluation batch


def one_cycle(step: int, total_steps: int, max_lr: float) -> tuple[float, float]:
    """(learning rate, momentum) at `step` of torch's OneCycleLR with its defaults: a cosine
    warm-up from max_lr/25 to max_lr over 30% of the steps, a cosine decay to max_lr/25e4,
    and momentum cycled the other way between 0.95 and 0.85."""
    low, high = MOMENTUM_RANGE
    initial = max_lr / DIV_FACTOR
    phases = (
        (WARMUP_FRACTION * total_steps - 1, (initial, max_lr), (high, low)),
        (total_steps - 1, (max_lr, initial / FINAL_DIV_FACTOR), (low, high)),
    )
    start = 0.0
    for index, (end, lrs, momenta) in enumerate(phases):
        if step <= end or index == len(phases) - 1:
            fraction = (step - start) / (end - start)
            return _cosine(*lrs, fraction), _cosine(*momenta, fraction)
        start = end
    raise AssertionError("unreachable")


def _cosine(begin: float, end: float, fraction: float) -> float:
    return end + (begin - end) / 2.0 * (math.cos(math.pi * fraction) + 1)


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random HxW crops of uint8 [N,H,W,C] images zero-padded by PAD, each flipped left-right
    with p=0.5, as uint8 [N,C,H,W] (channels first, as the model takes them)."""
    n, height, width = images.shape[:3]
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    offsets = rng.integers(0, 2 * PAD + 1, size=(2, n))
    flip = rng.random(n) < 0.5
    windows = sliding_window_view(padded, (height, width), axis=(1, 2))  # [N,9,9,C,H,W], a view
    crops = windows[np.arange(n), offsets[0], offsets[1]]
    crops[flip] = crops[flip][..., ::-1]
    return crops


def jpeg_augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N,H,W,C] images, each replaced with probability JPEG_PROBABILITY by its JPEG
    copy (Pillow) at a quality drawn from JPEG_QUALITIES."""
    chosen = rng.random(len(images)) < JPEG_PROBABILITY
    qualities = rng.integers(JPEG_QUALITIES[0], JPEG_QUALITIES[1] + 1, size=len(images))
    out = images.copy()
    for index in np.flatnonzero(chosen):
        out[index] = jpeg_copy(images[index], qualities[index])
    return out


def steps_per_epoch(images: int, batch_size: int) -> int:
    return math.ceil(images / batch_size)


def epoch_batches(
    split: ImageSet, config: TrainConfig, epoch: int, contract: ImageContract
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Epoch `epoch`'s training batches: float32 images [B,C,H,W] (augmented if the recipe
    says so, preprocessed as `contract` says) and int64 labels [B], in an order drawn from
    (seed, epoch)."""
    for pixels, labels in epoch_pixels(split, config, epoch):
        yield contract.scale(pixels), labels


def epoch_pixels(
    split: ImageSet, config: TrainConfig, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`epoch_batches` before scaling: the images as uint8 [B,C,H,W]."""
    rng = np.random.default_rng((config.seed, epoch))
    order = rng.permutation(len(split))
    for start in range(0, len(order), config.batch_size):
        index = order[start : start + config.batch_size]
        images = split.images[index]
        if config.jpeg_augment:
            images = jpeg_augment(images, rng)
        if config.augment:
            yield augment(images, rng), split.labels[index]
        else:
            yield np.ascontiguousarray(images.transpose(0, 3, 1, 2)), split.labels[index]


def training_data(
    data_dir: Path | None, config: TrainConfig, contract: ImageContract
) -> tuple[ImageSet, ImageSet]:
    """The images to train on (in memory, at the contract's size), and the ones to report on:
    the holdout, or the test split."""
    if data_dir is None:
        raise SpecError("training needs --data-dir: the packaged sample holds test images only")
    if not config.holdout and not has_splits(data_dir):
        raise SpecError(
            f"{data_dir} is one set of images, with no test split to report on; keep some of "
            "them out with --holdout N"
        )
    train_split = load_dataset(data_dir, "train", contract, config.limit)
    if not config.holdout:
        return train_split, load_dataset(data_dir, "test", contract, stream=True).renamed("test")
    if config.holdout >= len(train_split):
        raise SpecError(f"holdout {config.holdout} leaves no training images")
    keep = len(train_split) - config.holdout
    return train_split.head(keep), train_split.tail(keep, "holdout")


def eval_scores(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of logits [N,classes] for labels [N], in float64."""
    log_probs = log_softmax(logits.astype(np.float64))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return float(loss), float((logits.argmax(axis=1) == labels).mean())
