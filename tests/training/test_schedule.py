"""The shared training recipe: torch's schedule reproduced in numpy, and a
data order and augmentation that depend on (seed, epoch) only."""

import numpy as np
import pytest
import torch

from lossx.errors import SpecError
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.image_set import ImageSet
from lossx.runtime.images import jpeg_copies
from lossx.training.recipe import TrainConfig
from lossx.training.schedule import (
    augment,
    epoch_batches,
    eval_scores,
    jpeg_augment,
    one_cycle,
)


@pytest.mark.parametrize(("total_steps", "max_lr"), [(1, 0.1), (2, 0.02), (7, 0.5), (160, 0.02)])
def test_one_cycle_is_torchs_one_cycle_lr(total_steps, max_lr):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=total_steps)
    for step in range(total_steps):
        group = optimizer.param_groups[0]
        assert one_cycle(step, total_steps, max_lr) == pytest.approx(
            (group["lr"], group["momentum"]), rel=1e-12
        )
        optimizer.step()
        schedule.step()
    assert one_cycle(total_steps, total_steps, max_lr)[0] == pytest.approx(
        schedule.get_last_lr()[0], rel=1e-12
    )


def test_augment_returns_shifted_or_flipped_crops():
    images = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    out = augment(images, np.random.default_rng(0))
    assert out.shape == (16, 3, 32, 32) and out.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0))).transpose(0, 3, 1, 2)
    flipped = 0
    for original, crop in zip(padded, out, strict=True):
        windows = [original[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        plain = any(np.array_equal(crop, w) for w in windows)
        mirrored = any(np.array_equal(crop, w[..., ::-1]) for w in windows)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 0 < flipped < 16


def test_jpeg_augment_compresses_about_half_the_images_at_a_drawn_quality(test_split):
    images = test_split.images[:64]
    out = jpeg_augment(images, np.random.default_rng(0))
    assert out.shape == images.shape and out.dtype == np.uint8
    changed = [i for i in range(64) if not np.array_equal(out[i], images[i])]
    assert 16 < len(changed) < 48
    rng = np.random.default_rng(0)
    chosen = rng.random(64) < 0.5
    qualities = rng.integers(50, 96, size=64)
    assert set(changed) == set(np.flatnonzero(chosen))
    for i in changed[:4]:
        np.testing.assert_array_equal(out[i], jpeg_copies(images[i : i + 1], qualities[i])[0])


def test_jpeg_augment_is_drawn_from_seed_and_epoch_and_changes_nothing_else(test_split):
    split = test_split.head(64)
    config = TrainConfig(batch_size=64, jpeg_augment=True, seed=2)
    first = next(epoch_batches(split, config, 1, CONTRACT))
    np.testing.assert_array_equal(first[0], next(epoch_batches(split, config, 1, CONTRACT))[0])
    plain = next(epoch_batches(split, TrainConfig(batch_size=64, seed=2), 1, CONTRACT))
    np.testing.assert_array_equal(first[1], plain[1])  # the same order
    assert not np.array_equal(first[0], plain[0])


def _split(n: int) -> ImageSet:
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    return ImageSet(images, np.arange(n) % 10, tuple("abcdefghij"), "test")


def test_each_epoch_visits_every_image_once_in_an_order_of_seed_and_epoch():
    split = _split(100)
    config = TrainConfig(batch_size=32, augment=False, seed=3)

    def order(config, epoch):
        batches = list(epoch_batches(split, config, epoch, CONTRACT))
        assert [len(labels) for _, labels in batches] == [32, 32, 32, 4]
        return np.concatenate([images[:, 0, 0, 0] * 255 for images, _ in batches]).round()

    first = order(config, 1)
    assert sorted(first) == list(range(100))
    np.testing.assert_array_equal(first, order(config, 1))
    assert not np.array_equal(first, order(config, 2))
    assert not np.array_equal(first, order(TrainConfig(batch_size=32, augment=False, seed=4), 1))


def test_eval_scores():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
    loss, accuracy = eval_scores(logits, np.array([0, 0]))
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.tensor([0, 0]))
    assert loss == pytest.approx(float(expected), rel=1e-6) and accuracy == 0.5


def test_recipes_without_loss_clip_norm_or_augment_load_with_defaults():
    old = {**TrainConfig().to_dict(), "momentum": 0.9, "label_smoothing": 0.1}
    del old["loss"], old["clip_norm"], old["augment"]
    config = TrainConfig.from_dict(old)
    assert config.loss == "ce(label_smoothing=0.1)" and config.clip_norm == 5.0
    with pytest.raises(SpecError, match="unknown recipe keys colour"):
        TrainConfig.from_dict({**old, "colour": 1})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clip_norm": -1.0}, "clip norm must be at least 0"),
        ({"loss": "ce(reduction=none)"}, "has no scalar loss"),
        ({"loss": "hinge"}, "unknown loss"),
        ({"accumulate": 0}, "accumulate must be 1..1024 batches"),
        ({"trainable": ("fc.*",), "frozen": ("conv.*",)}, "give --trainable or --frozen"),
        ({"frozen_bn": "fixed"}, "frozen batch norms run in eval or train mode"),
    ],
)
def test_bad_recipes_are_refused(change, message):
    with pytest.raises(SpecError, match=message):
        TrainConfig(**change).validate()
