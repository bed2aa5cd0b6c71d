"""`lossx train --engine torch`: train a registered model on CIFAR-10, reproducibly and
resumably, with eager PyTorch and autograd.

The recipe (data order, augmentation, schedule, clipping) is lossx.runtime.recipe's, which the
ONNX Runtime engine follows too. The training split is decoded once; every batch is augmented
and scaled on the fly.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lossx.build.losses import reference_loss
from lossx.build.models import build_model
from lossx.errors import CheckpointError, first_line
from lossx.files import write_atomically
from lossx.runtime.evaluate import iter_batches, target_form
from lossx.runtime.recipe import (
    EVAL_BATCH,
    EpochResult,
    TrainConfig,
    checkpoint_path,
    eval_scores,
    run_epochs,
    run_recipe,
    training_data,
)

CHECKPOINT_FORMAT = "lossx-train-checkpoint"


def _evaluate(model: nn.Module, split) -> tuple[float, float]:
    model.eval()
    with torch.inference_mode():
        logits = [model(torch.from_numpy(x)).numpy() for x, _ in iter_batches(split, EVAL_BATCH)]
    return eval_scores(np.concatenate(logits), split.labels)


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=0.9,  # set by the schedule before every step
            nesterov=True,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _schedule(optimizer: torch.optim.Optimizer, lr: float, momentum: float) -> None:
    """What OneCycleLR sets before a step: the LR and SGD's momentum (AdamW's beta1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        else:
            group["momentum"] = momentum


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


class TorchEngine:
    """The model, loss and optimizer of one run, stepped by eager PyTorch."""

    def __init__(self, config: TrainConfig, out: Path) -> None:
        self.config = config
        self.out = out
        self.loss_spec = config.loss_spec()
        self.loss = reference_loss(self.loss_spec)
        self.model = build_model(config.model, config.seed)
        self.optimizer = _make_optimizer(config, self.model)

    def step(self, images: np.ndarray, labels: np.ndarray, lr: float, momentum: float) -> float:
        _schedule(self.optimizer, lr, momentum)
        self.model.train()
        target = torch.from_numpy(target_form(self.loss_spec, labels))
        loss = self.loss(self.model(torch.from_numpy(images)), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_norm)
        self.optimizer.step()
        return loss.item()

    def evaluate(self, split) -> tuple[float, float]:
        return _evaluate(self.model, split)

    def save(self, history: list[EpochResult]) -> None:
        save_checkpoint(
            self.out,
            {
                "format": CHECKPOINT_FORMAT,
                "model_name": self.config.model,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "config": self.config.to_dict(),
                "history": [e.to_dict() for e in history],
                "torch": str(torch.__version__),  # TorchVersion would not load weights_only
            },
        )

    def restore(self, state: dict) -> list[EpochResult]:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return [EpochResult(**e) for e in state["history"]]


def train(
    data_dir: Path | None,
    out: Path,
    config: TrainConfig | None = None,
    resume: Path | None = None,
    stop_after: int | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[EpochResult]:
    """Train and checkpoint to `out` after every epoch; return the log of every epoch so far.

    With `resume`, the run continues from that checkpoint with the checkpoint's own recipe.
    `stop_after` ends the run after that many epochs in all (the checkpoint can resume it).
    Callbacks as for `lossx.runtime.recipe.run_epochs`.
    """
    state = load_training_checkpoint(resume) if resume else None
    config = run_recipe(config, state, resume)
    config.validate()
    out = checkpoint_path(out)
    data = training_data(data_dir, config)
    engine = TorchEngine(config, out)
    history: list[EpochResult] = []
    if state is not None:
        try:
            history = engine.restore(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{resume}: does not fit model {config.model}: {first_line(e)}"
            ) from None
    return run_epochs(engine, config, data, history, stop_after, on_batch, on_epoch, on_step)
