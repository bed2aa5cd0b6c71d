"""A training plan (`lossx train --write-plan`) holds the steps the recipe takes: the batches the
trainers draw, in their order, and the schedule's learning rate and momentum at each step."""

import json

import numpy as np
import pytest

from lossx.errors import SpecError
from lossx.runtime.cifar10 import CONTRACT, load_cifar10
from lossx.training.optimizers import fixed_hyperparameters
from lossx.training.plan import PLAN_FORMAT, read_plan, write_plan
from lossx.training.recipe import TrainConfig
from lossx.training.schedule import epoch_batches, one_cycle
from tests.conftest import require_shared


@pytest.mark.parametrize(
    "recipe",
    [
        {"epochs": 2, "batch_size": 48, "limit": 120},  # a short last batch each epoch
        {"epochs": 1, "batch_size": 32, "limit": 64, "augment": False, "seed": 3},
        {"epochs": 1, "batch_size": 16, "limit": 48, "jpeg_augment": True},
        {"epochs": 1, "batch_size": 32, "limit": 64, "optimizer": "adamw"},
    ],
)
def test_a_plan_holds_the_batches_and_schedule_the_trainers_take(cifar_dir, tmp_path, recipe):
    require_shared(cifar_dir)
    config = TrainConfig(**recipe)
    steps_written, images = write_plan(tmp_path / "plan.npz", cifar_dir, config)
    header, steps = read_plan(tmp_path / "plan.npz")

    split = load_cifar10(cifar_dir, "train", limit=config.limit)
    expected = [
        b for e in range(1, config.epochs + 1) for b in epoch_batches(split, config, e, CONTRACT)
    ]
    assert steps_written == len(steps) == len(expected) == header["steps"]
    assert images == config.epochs * config.limit
    pairs = zip(steps, expected, strict=True)
    for index, ((pixels, labels, lr, momentum), (x, y)) in enumerate(pairs):
        assert pixels.dtype == np.uint8
        np.testing.assert_array_equal(CONTRACT.scale(pixels), x)  # bit-identical model input
        np.testing.assert_array_equal(labels, y)
        assert (lr, momentum) == one_cycle(index, len(expected), config.lr)
    assert header["format"] == PLAN_FORMAT
    assert header["loss"] == config.loss_spec().to_dict()
    assert header["recipe"] == json.loads(json.dumps(config.to_dict()))
    assert (header["weight_decay"], header["clip_norm"]) == (config.weight_decay, config.clip_norm)
    assert header["optimizer"] == config.optimizer
    assert header["hyperparameters"] == fixed_hyperparameters(config.optimizer)


def test_a_plan_too_large_is_refused_before_anything_is_written(cifar_dir, tmp_path):
    require_shared(cifar_dir)
    with pytest.raises(SpecError, match="more than 100,000"):
        write_plan(tmp_path / "plan.npz", cifar_dir, TrainConfig(epochs=3))
    assert list(tmp_path.iterdir()) == []
