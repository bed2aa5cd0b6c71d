"""Train a registered model on CIFAR-10 with CrossEntropyLoss, reproducibly and resumably.

The training split is decoded once into a uint8 tensor; each batch is scaled, randomly cropped
(4-pixel zero padding) and flipped in one vectorised step. All randomness (initial weights,
shuffling, augmentation) comes from the seed, and the generator's state is checkpointed, so a
resumed run continues exactly where it stopped.
"""

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lossx.build.models import DEFAULT_MODEL, build_model
from lossx.errors import CheckpointError, LossxError, SpecError, first_line
from lossx.files import write_atomically
from lossx.runtime.cifar10 import Cifar10Split, load_cifar10
from lossx.runtime.preprocessing import to_model_input

CHECKPOINT_FORMAT = "lossx-train-checkpoint"
OPTIMIZERS = ("sgd", "adamw")
_PAD = 4


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe. `holdout` keeps the last N training images out, for choosing recipes."""

    model: str = DEFAULT_MODEL
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.02  # peak of the one-cycle schedule
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    clip_norm: float = 5.0
    augment: bool = True
    seed: int = 0
    limit: int | None = None  # train on the first N training images only
    holdout: int = 0

    def validate(self) -> None:
        checks = [
            (1 <= self.epochs <= 10_000, f"epochs must be 1..10000, got {self.epochs}"),
            (1 <= self.batch_size <= 4096, f"batch size must be 1..4096, got {self.batch_size}"),
            (0 < self.lr <= 10 and math.isfinite(self.lr), f"lr must be in (0, 10], got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (
                0 <= self.weight_decay < 1,
                f"weight decay must be in [0, 1), got {self.weight_decay}",
            ),
            (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
            (self.limit is None or self.limit >= 1, f"limit must be at least 1, got {self.limit}"),
            (self.holdout >= 0, f"holdout must be at least 0, got {self.holdout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SpecError(message)


@dataclass(frozen=True)
class EpochResult:
    """One line of the training log. `eval_split` says what was evaluated: test or holdout."""

    epoch: int
    epochs: int
    lr: float
    train_loss: float
    eval_split: str
    eval_loss: float
    eval_accuracy: float
    seconds: float
    images_per_second: float  # training images per second of this epoch, augmentation included

    def to_dict(self) -> dict:
        return asdict(self)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of the images zero-padded by 4, each flipped left-right with p=0.5."""
    n = images.shape[0]
    padded = nn.functional.pad(images, (_PAD, _PAD, _PAD, _PAD))
    offsets = torch.randint(0, 2 * _PAD + 1, (2, n), generator=generator)
    span = torch.arange(32)
    rows = (offsets[0][:, None] + span)[:, None, :, None]
    cols = (offsets[1][:, None] + span)[:, None, None, :]
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channel, rows, cols]


def _as_tensors(split: Cifar10Split) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(to_model_input(split.images))  # decoded and scaled once
    return images, torch.from_numpy(split.labels)


def _evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(labels), 500):
            logits = model(images[start : start + 500])
            target = labels[start : start + 500]
            total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == target).sum())
    return total_loss / len(labels), correct / len(labels)


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a crash never leaves a corrupt checkpoint."""
    write_atomically(path, lambda f: torch.save(payload, f))


def load_training_checkpoint(path: Path) -> dict:
    """A checkpoint written by `train`, loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CheckpointError(f"{path}: not a lossx training checkpoint (unreadable)") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a lossx training checkpoint; cannot resume from it")
    return payload


def _training_data(data_dir: Path | None, config: TrainConfig) -> tuple[Cifar10Split, Cifar10Split]:
    """The images to train on, and the ones to report on: the holdout, or the test split."""
    train_split = load_cifar10(data_dir, "train", config.limit)
    if not config.holdout:
        test = load_cifar10(data_dir, "test")
        return train_split, Cifar10Split(test.images, test.labels, test.class_names, "test")
    if config.holdout >= len(train_split):
        raise SpecError(f"holdout {config.holdout} leaves no training images")
    keep = len(train_split) - config.holdout
    holdout = Cifar10Split(
        train_split.images[keep:], train_split.labels[keep:], train_split.class_names, "holdout"
    )
    return train_split.head(keep), holdout


def train(
    data_dir: Path | None,
    out: Path,
    config: TrainConfig | None = None,
    resume: Path | None = None,
    stop_after: int | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> list[EpochResult]:
    """Train and checkpoint to `out` after every epoch; return the log of every epoch so far.

    With `resume`, the run continues from that checkpoint with the checkpoint's own recipe.
    `stop_after` ends the run after that many epochs in all (the checkpoint can resume it).
    `on_batch(epoch, images done this epoch, images per epoch)` drives a progress bar.
    """
    state = load_training_checkpoint(resume) if resume else None
    if state is not None:
        try:
            config = TrainConfig(**state["config"])
        except TypeError as e:
            raise CheckpointError(f"{resume}: its recipe is not one lossx knows ({e})") from None
    config = config or TrainConfig()
    config.validate()
    out = Path(out)
    if not out.parent.is_dir():
        raise LossxError(f"cannot write checkpoint {out}: {out.parent} is not a directory")

    train_split, eval_split = _training_data(data_dir, config)
    images, labels = _as_tensors(train_split)
    eval_images, eval_labels = _as_tensors(eval_split)

    model = build_model(config.model, config.seed)
    optimizer = _make_optimizer(config, model)
    steps = math.ceil(len(labels) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps
    )
    generator = torch.Generator().manual_seed(config.seed + 1)
    history: list[EpochResult] = []
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            history = [EpochResult(**e) for e in state["history"]]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{resume}: does not fit model {config.model}: {first_line(e)}"
            ) from None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    last_epoch = config.epochs if stop_after is None else min(stop_after, config.epochs)
    for epoch in range(len(history) + 1, last_epoch + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        done = 0
        for step in range(steps):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = images[index]
            if config.augment:
                batch = augment(batch, generator)
            loss = loss_fn(model(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_norm:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
            done += len(index)
            if on_batch:
                on_batch(epoch, done, len(labels))
        seconds = time.perf_counter() - started
        eval_loss, eval_accuracy = _evaluate(model, eval_images, eval_labels)
        result = EpochResult(
            epoch=epoch,
            epochs=config.epochs,
            lr=schedule.get_last_lr()[0],
            train_loss=total / len(labels),
            eval_split=eval_split.source,
            eval_loss=eval_loss,
            eval_accuracy=eval_accuracy,
            seconds=seconds,
            images_per_second=len(labels) / seconds,
        )
        history.append(result)
        save_checkpoint(
            out,
            {
                "format": CHECKPOINT_FORMAT,
                "model_name": config.model,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": schedule.state_dict(),
                "generator": generator.get_state(),
                "config": asdict(config),
                "history": [e.to_dict() for e in history],
                "torch": str(torch.__version__),  # TorchVersion would not load weights_only
            },
        )
        if on_epoch:
            on_epoch(result)
    return history
