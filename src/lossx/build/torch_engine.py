"""`lossx train --engine torch`: train a model on a labelled image set, reproducibly and
resumably, with eager PyTorch and autograd.

The recipe and the loop are lossx.training.trainer's, which the ONNX Runtime engine follows too.
The training split is decoded once; every batch is augmented and scaled on the fly.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lossx.build.backward import frozen_batch_norms, in_place_refusal, train_mode
from lossx.build.losses import OnLogits, reference_loss
from lossx.build.models import build_model, model_contract
from lossx.errors import CheckpointError, ModelError, SpecError, first_line
from lossx.files import regular_file, write_atomically
from lossx.runtime.feeds import iter_batches, target_form
from lossx.runtime.weights import check_finite, file_kind
from lossx.training import trainer
from lossx.training.recipe import TrainConfig, contract_recipe, frozen_parameters
from lossx.training.schedule import EVAL_BATCH, eval_scores
from lossx.training.trainer import EpochResult

CHECKPOINT_FORMAT = "lossx-train-checkpoint"
# channels-last convolutions train 1.2-1.4x faster on CPU (docs/performance.md)
MEMORY_FORMAT = torch.channels_last


def _as_input(images: np.ndarray, memory_format: torch.memory_format) -> torch.Tensor:
    return torch.from_numpy(images).contiguous(memory_format=memory_format)


def _evaluate(model: nn.Module, split, contract, memory_format) -> tuple[float, float]:
    model.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in iter_batches(split, EVAL_BATCH, contract):
            logits.append(model(_as_input(x, memory_format)).numpy())
            labels.append(y)
    return eval_scores(np.concatenate(logits), np.concatenate(labels))


def _make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=0.9,  # set by the schedule before every step
            nesterov=True,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


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
    path = regular_file(path, "checkpoint", CheckpointError)
    kind = file_kind(path)
    if kind != "torch":
        what = "an .npz, as --engine onnxruntime writes" if kind == "npz" else kind
        raise CheckpointError(f"{path}: not a lossx training checkpoint of --engine torch ({what})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CheckpointError(f"{path}: not a lossx training checkpoint (unreadable)") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a lossx training checkpoint; cannot resume from it")
    return payload


class TorchEngine:
    """The model, loss and optimizer of one run, stepped by eager PyTorch."""

    def __init__(
        self, config: TrainConfig, out: Path, memory_format: torch.memory_format = MEMORY_FORMAT
    ) -> None:
        self.config = config
        self.memory_format = memory_format
        self.out = out
        self.loss_spec = config.loss_spec()
        self.loss = OnLogits(reference_loss(self.loss_spec), self.loss_spec)
        self.model = build_model(config.model, config.seed, config.model_args)
        self.contract = model_contract(self.model, config.model, **config.contract_options)
        self.config = replace(config, **contract_recipe(self.contract))  # recorded in full
        self.model = self.model.to(memory_format=memory_format)
        if not any(True for _ in self.model.parameters()):
            raise SpecError(
                f"--model {config.model} has no parameters, so there is nothing to train"
            )
        names = [name for name, _ in self.model.named_parameters()]
        frozen = frozen_parameters(names, config.trainable, config.frozen)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name not in frozen)
        self.trained = [p for n, p in self.model.named_parameters() if n not in frozen]
        modules = dict(self.model.named_modules())
        self.eval_modules = [
            modules[name] for name in frozen_batch_norms(self.model, frozen, config.frozen_bn)
        ]
        self.optimizer = _make_optimizer(config, self.trained)
        self.pending_batches = 0  # batches whose gradients the next update takes

    def step(self, images: np.ndarray, labels: np.ndarray, lr: float, momentum: float) -> float:
        """One optimizer step on one batch; its loss."""
        loss = self.accumulate(images, labels)
        self.update(lr, momentum)
        return loss

    def accumulate(self, images: np.ndarray, labels: np.ndarray) -> float:
        train_mode(self.model, self.eval_modules)
        target = torch.from_numpy(target_form(self.loss_spec, labels, self.contract.num_classes))
        try:
            loss = self.loss(self.model(_as_input(images, self.memory_format)), target)
            loss.backward()  # adds to the gradients of the batches since the last update
        except Exception as e:  # the user's model may raise anything in a train-mode step
            context = f"--model {self.config.model}"
            raise in_place_refusal(e, self.model, self.contract.shape, context) or ModelError(
                f"--model {self.config.model}: a training step failed: {first_line(e)}"
            ) from None
        self.pending_batches += 1
        return loss.item()

    def update(self, lr: float, momentum: float) -> None:
        _schedule(self.optimizer, lr, momentum)
        if self.pending_batches > 1:  # the mean of the batches' gradients
            for param in self.trained:
                if param.grad is not None:
                    param.grad.mul_(1 / self.pending_batches)
        if self.config.clip_norm:
            nn.utils.clip_grad_norm_(self.trained, self.config.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending_batches = 0

    def evaluate(self, split) -> tuple[float, float]:
        return _evaluate(self.model, split, self.contract, self.memory_format)

    def save(self, history: list[EpochResult]) -> None:
        save_checkpoint(
            self.out,
            {
                "format": CHECKPOINT_FORMAT,
                "model_name": self.config.model,
                "model": {k: v.contiguous() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "config": self.config.to_dict(),
                "history": [e.to_dict() for e in history],
                "torch": str(torch.__version__),  # TorchVersion would not load weights_only
            },
        )

    def restore(self, checkpoint: Path, state: dict) -> list[EpochResult]:
        check_finite({k: v.numpy() for k, v in state["model"].items()}, str(checkpoint))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return [EpochResult(**e) for e in state["history"]]


def train(
    data_dir: Path | None, out: Path, config: TrainConfig | None = None, **run
) -> list[EpochResult]:
    """Train with eager PyTorch and checkpoint to `out` after every epoch; `run` (resume,
    stop_after and the callbacks) as for lossx.training.trainer.train."""
    return trainer.train(
        TorchEngine, load_training_checkpoint, is_checkpoint, data_dir, out, config, **run
    )


def is_checkpoint(path: Path) -> bool:
    """Whether `path` holds a checkpoint this engine wrote."""
    try:
        load_training_checkpoint(path)
    except CheckpointError:
        return False
    return True
