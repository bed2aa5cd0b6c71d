"""The training loop both engines run, and the one driver that starts or resumes a run.

An engine (lossx.build.torch_engine's eager PyTorch, lossx.training.ort_engine's ONNX Runtime)
steps, evaluates, saves and restores; everything else, the recipe (lossx.training.schedule)
included, is here once.
"""

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from lossx.errors import CheckpointError, SpecError, TrainingDiverged, first_line
from lossx.files import sole_writer
from lossx.runtime.contract import ImageContract
from lossx.runtime.datasets import dataset_class_names
from lossx.runtime.image_set import ImageSet
from lossx.runtime.loss_specs import LossSpec
from lossx.training.checkpoints import checkpoint_path
from lossx.training.recipe import TrainConfig
from lossx.training.schedule import (
    epoch_batches,
    one_cycle,
    steps_per_epoch,
    training_data,
)


@dataclass(frozen=True)
class EpochResult:
    """One line of the training log. `eval_split` says what was evaluated: test or holdout;
    `eval_loss` is the cross-entropy there, whatever loss trains."""

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

    def to_line(self) -> str:
        """The line `lossx train` prints after the epoch."""
        return (
            f"epoch {self.epoch:>3}/{self.epochs}  lr {self.lr:.5f}  train loss "
            f"{self.train_loss:.4f}  {self.eval_split} loss {self.eval_loss:.4f}  "
            f"{self.eval_split} accuracy {self.eval_accuracy:.2%}  "
            f"{self.images_per_second:,.0f} images/s  {self.seconds:.1f} s"
        )


def run_recipe(
    config: TrainConfig | None, state: dict | None, resume: Path | None, given: dict | None = None
) -> TrainConfig:
    """The recipe a run follows: a resumed checkpoint's own (`state`), else `config`, else the
    default. With a checkpoint, every recipe field in `given` (what the caller set explicitly)
    must equal the checkpoint's: a resumed run never silently drops an option."""
    if state is None:
        return config or TrainConfig()
    try:
        recipe = TrainConfig.from_dict(state["config"])
    except (KeyError, TypeError, SpecError) as e:
        raise CheckpointError(
            f"{resume}: its recipe is not one lossx knows ({first_line(e)})"
        ) from None
    conflicts = [
        f"{_option(name)} {value} (it has {getattr(recipe, name)})"
        for name, value in (given or {}).items()
        if value != getattr(recipe, name)
    ]
    if conflicts:
        raise SpecError(
            f"--resume continues {resume} with the recipe it was saved with, which every recipe "
            f"option would change: {', '.join(conflicts)}; leave them out, or start a new run "
            "without --resume"
        )
    history = state.get("history")
    if not isinstance(history, list):
        raise CheckpointError(f"{resume}: its log of epochs is not a list; not a lossx checkpoint")
    done = len(history)
    if done >= recipe.epochs:
        raise SpecError(
            f"{resume}: that run already finished (epoch {done} of {recipe.epochs}); nothing to "
            "resume. Export it with lossx export --checkpoint, or start a new run"
        )
    return recipe


def _option(field_name: str) -> str:
    """The command-line option that sets recipe field `field_name`."""
    return {"model_args": "--model-arg"}.get(field_name, f"--{field_name.replace('_', '-')}")


class Engine(Protocol):
    """What `run_epochs` drives: one engine's model, optimizer and checkpoint."""

    config: TrainConfig
    contract: ImageContract  # what the model takes (lossx.runtime.contract)

    def accumulate(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Add a batch's gradients to the pending ones (the buffers move on as a train-mode
        step moves them); return the batch's loss."""

    def update(self, lr: float, momentum: float) -> None:
        """One optimizer step with the mean of the pending gradients, this LR and momentum."""

    def evaluate(self, split: ImageSet) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of the current weights on `split`."""

    def save(self, history: list[EpochResult]) -> None:
        """Checkpoint the weights, the optimizer state and the log so far."""

    def restore(self, checkpoint: Path, state: dict) -> list[EpochResult]:
        """Load a checkpoint this engine saved (`state`: what `read_state` gave); return its
        log."""


def run_epochs(
    engine: Engine,
    config: TrainConfig,
    data: tuple[ImageSet, ImageSet],
    history: list[EpochResult],
    stop_after: int | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[EpochResult]:
    """Train from epoch len(history) + 1 to the last (or `stop_after`), evaluating and saving
    after each epoch; the optimizer steps after every `config.accumulate` batches (and after an
    epoch's last). Callbacks: `on_batch(epoch, images done this epoch, images per epoch)`,
    `on_epoch(result)`, `on_step(batch, loss)` with batches counted from 0 over the whole run."""
    train_split, eval_split = data
    batches_per_epoch = steps_per_epoch(len(train_split), config.batch_size)
    steps = math.ceil(batches_per_epoch / config.accumulate)  # optimizer steps per epoch
    total_steps = config.epochs * steps
    loss_spec = config.loss_spec()
    per_image = loss_spec["reduction"] == "mean"
    last_epoch = config.epochs if stop_after is None else min(stop_after, config.epochs)
    for epoch in range(len(history) + 1, last_epoch + 1):
        started = time.perf_counter()
        total, done = 0.0, 0
        batches = epoch_batches(train_split, config, epoch, engine.contract)
        for index, (images, labels) in enumerate(batches):
            batch = (epoch - 1) * batches_per_epoch + index
            loss = engine.accumulate(images, labels)
            _check_in_range(loss, loss_spec, batch, epoch, config.lr)
            if (index + 1) % config.accumulate == 0 or index + 1 == batches_per_epoch:
                step = (epoch - 1) * steps + index // config.accumulate
                engine.update(*one_cycle(step, total_steps, config.lr))
            total += loss * len(labels) if per_image else loss
            done += len(labels)
            if on_step:
                on_step(batch, loss)
            if on_batch:
                on_batch(epoch, done, len(train_split))
        seconds = time.perf_counter() - started
        eval_loss, eval_accuracy = engine.evaluate(eval_split)
        result = EpochResult(
            epoch=epoch,
            epochs=config.epochs,
            lr=one_cycle(epoch * steps, total_steps, config.lr)[0],
            train_loss=total / len(train_split),
            eval_split=eval_split.source,
            eval_loss=eval_loss,
            eval_accuracy=eval_accuracy,
            seconds=seconds,
            images_per_second=len(train_split) / seconds,
        )
        history.append(result)
        engine.save(history)
        if on_epoch:
            on_epoch(result)
    return history


def _check_in_range(loss: float, spec: LossSpec, step: int, epoch: int, lr: float) -> None:
    """Stop a run whose loss is NaN, infinite, or below the least value the loss can take
    (beyond float rounding): its weights no longer mean anything."""
    floor = spec.lower_bound
    if math.isfinite(loss) and (floor is None or loss >= floor - _ROUNDING * max(1.0, abs(loss))):
        return
    why = f"the loss is {loss:g}"
    if math.isfinite(loss):
        why += f", below {floor:g}, the least {spec.name} can be"
    raise TrainingDiverged(
        f"training diverged at step {step + 1} (epoch {epoch}): {why}; try a lower --lr than {lr:g}"
    )


_ROUNDING = 1e-5  # float32 rounding of a loss that is mathematically >= its floor


def train(
    open_engine: Callable[[TrainConfig, Path], Engine],
    read_state: Callable[[Path], dict],
    is_checkpoint: Callable[[Path], bool],
    data_dir: Path | None,
    out: Path,
    config: TrainConfig | None = None,
    resume: Path | None = None,
    stop_after: int | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    given: dict | None = None,
) -> list[EpochResult]:
    """Train with the engine `open_engine(recipe, checkpoint path)` makes and checkpoint to
    `out` after every epoch; return the log of every epoch so far.

    With `resume`, the run continues from that checkpoint (read by `read_state`, which refuses
    one the engine cannot resume) with the checkpoint's own recipe; a recipe field in `given`
    that differs from it, or a checkpoint whose run already finished, is refused. An existing
    `out` must be a checkpoint of the engine (`is_checkpoint`). `stop_after` ends the run
    after that many epochs in all (the checkpoint can resume it). Callbacks as for
    `run_epochs`.
    """
    state = read_state(Path(resume)) if resume else None
    config = run_recipe(config, state, resume, given)
    config.validate()
    out = checkpoint_path(out, is_checkpoint, Path(resume) if resume else None)
    if config.class_names is None and data_dir is not None:  # the model's classes: the data's
        config = replace(config, class_names=dataset_class_names(Path(data_dir)))
    with sole_writer(out, CheckpointError):
        engine = open_engine(config, out)
        config = engine.config  # the engine completes the recipe (the contract, a model name)
        data = training_data(data_dir, config, engine.contract)
        history: list[EpochResult] = []
        if state is not None:
            try:
                history = engine.restore(Path(resume), state)
            except (KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
                raise CheckpointError(
                    f"{resume}: does not fit model {config.model}: {first_line(e)}"
                ) from None
        return run_epochs(engine, config, data, history, stop_after, on_batch, on_epoch, on_step)
