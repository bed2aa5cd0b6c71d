"""`lossx train --write-plan`: the steps a recipe takes, written down for another runtime to
replay.

A plan is one uncompressed .npz: every step's batch as the model's pixels before scaling
(`images`, uint8 [T,C,H,W], augmentation applied; the model takes them preprocessed as its
artifact's manifest says, x / 255 then (x - mean) / std in float32), its `labels` (int64
[T]), `batch_sizes` (int64 [S]: step s takes the next batch_sizes[s] images), the `lr` and
`momentum` the schedule gives each step (float64 [S]; SGD's momentum, AdamW's beta1), and
`plan` (the JSON below as UTF-8 bytes, uint8): the recipe, the loss in the manifest's form, the
optimizer and the hyperparameters its graph takes that the schedule does not.
examples/node/train.js and the page in examples/web replay it with an artifact's training graph
and its optimizer graph (`optimizer_<rule>.onnx`), and reach the weights `lossx train --engine
onnxruntime` reaches with the same recipe: the batches come from lossx.training.schedule, as
the trainer's do.
"""

import io
import json
from pathlib import Path

import numpy as np

from lossx.errors import SpecError
from lossx.files import sole_writer, write_atomically
from lossx.runtime.cifar10 import IMAGE_SHAPE
from lossx.runtime.contract import contract_for
from lossx.runtime.datasets import dataset_class_names
from lossx.training.optimizers import fixed_hyperparameters
from lossx.training.recipe import TrainConfig
from lossx.training.schedule import epoch_pixels, one_cycle, steps_per_epoch, training_data

PLAN_FORMAT = "lossx-training-plan"
PLAN_FORMAT_VERSION = 2  # 2: the optimizer's graph updates the weights
MAX_PLAN_IMAGES = 100_000  # 300 MB of pixels: a plan is for replaying a few epochs, not a run
UPDATE = (
    "the artifact's optimizer_<optimizer>.onnx once per step, after the training graph: "
    "clip_grad_norm_, then torch.optim.SGD(nesterov) or torch.optim.AdamW; its inputs lr and "
    "momentum (AdamW: beta1) are the step's, weight_decay, clip_norm and hyperparameters the "
    "header's, step the 1-based count of steps, its state zeros before the first step"
)


def write_plan(path: Path, data_dir: Path, config: TrainConfig) -> tuple[int, int]:
    """Write the plan of every step `config` takes to `path`, one process at a time; return
    (steps, images)."""
    with sole_writer(Path(path)):
        arrays = _plan_arrays(data_dir, config)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomically(Path(path), lambda f: f.write(buffer.getvalue()))
    return len(arrays["batch_sizes"]), len(arrays["labels"])


def _plan_arrays(data_dir: Path, config: TrainConfig) -> dict[str, np.ndarray]:
    if config.accumulate > 1:
        raise SpecError("a plan records one batch per optimizer step; it takes no --accumulate")
    names = config.class_names or dataset_class_names(Path(data_dir))
    shape = config.input_shape or IMAGE_SHAPE  # the images of the artifact that replays it
    contract = contract_for(shape, names, config.mean, config.std, config.resize)
    train_split, _ = training_data(data_dir, config, contract)
    steps = steps_per_epoch(len(train_split), config.batch_size)
    total = config.epochs * len(train_split)
    if total > MAX_PLAN_IMAGES:
        raise SpecError(
            f"a plan of {config.epochs} epochs of {len(train_split):,} images holds {total:,} "
            f"images, more than {MAX_PLAN_IMAGES:,}; use fewer --epochs or a --limit"
        )
    images, labels, sizes, lrs, momenta = [], [], [], [], []
    for epoch in range(1, config.epochs + 1):
        for index, (pixels, batch_labels) in enumerate(epoch_pixels(train_split, config, epoch)):
            lr, momentum = one_cycle((epoch - 1) * steps + index, config.epochs * steps, config.lr)
            images.append(pixels)
            labels.append(batch_labels)
            sizes.append(len(batch_labels))
            lrs.append(lr)
            momenta.append(momentum)
    header = {
        "format": PLAN_FORMAT,
        "format_version": PLAN_FORMAT_VERSION,
        "recipe": config.to_dict(),
        "loss": config.loss_spec().to_dict(),
        "optimizer": config.optimizer,
        "hyperparameters": fixed_hyperparameters(config.optimizer),
        "weight_decay": config.weight_decay,
        "clip_norm": config.clip_norm,
        "update": UPDATE,
        "steps": len(sizes),
    }
    return {
        "images": np.concatenate(images),
        "labels": np.concatenate(labels).astype(np.int64),
        "batch_sizes": np.array(sizes, dtype=np.int64),
        "lr": np.array(lrs, dtype=np.float64),
        "momentum": np.array(momenta, dtype=np.float64),
        "plan": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
    }


def read_plan(path: Path) -> tuple[dict, list[tuple[np.ndarray, np.ndarray, float, float]]]:
    """A plan's header and its steps (uint8 pixels, labels, lr, momentum), for tests and
    replays in Python."""
    with np.load(path, allow_pickle=False) as npz:
        header = json.loads(npz["plan"].tobytes())
        images, labels = npz["images"], npz["labels"]
        bounds = np.concatenate([[0], np.cumsum(npz["batch_sizes"])])
        steps = [
            (images[a:b], labels[a:b], float(lr), float(m))
            for a, b, lr, m in zip(bounds[:-1], bounds[1:], npz["lr"], npz["momentum"], strict=True)
        ]
    return header, steps
