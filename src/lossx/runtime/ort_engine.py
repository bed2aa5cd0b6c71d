"""`lossx train --engine onnxruntime`: train with an artifact's training graph in ONNX Runtime
and numpy updates, without torch.

Each step feeds the batch, the current weights and buffers to `train_<loss>.onnx`, takes the
loss, every parameter's gradient and the buffers' next values (batch-norm statistics) back, and
applies torch.optim.SGD's Nesterov update in numpy. The recipe (data order, augmentation,
schedule, clipping) and the loop are lossx.runtime.trainer's, which the torch engine follows
too, so both engines take the same steps from the same weights and seed.

The checkpoint is one .npz: the weights and buffers by state_dict name (what `lossx export
--checkpoint`, `lossx eval --weights` and `Artifact.with_weights` read), the momentum buffers
under "momentum/<name>" and the recipe, log and artifact under "lossx/state" (JSON).
"""

import io
import json
import zipfile
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from lossx.errors import CheckpointError, SpecError, first_line
from lossx.files import write_atomically
from lossx.runtime import trainer
from lossx.runtime.artifact import (
    MANIFEST_FILE,
    Artifact,
    check_npz_sizes,
    check_weights,
    file_kind,
    read_weights,
    sha256_of,
)
from lossx.runtime.cifar10 import Cifar10Split
from lossx.runtime.feeds import graph_feed, iter_batches
from lossx.runtime.graphs import GraphKind, GraphSpec
from lossx.runtime.options import TrainConfig
from lossx.runtime.recipe import EVAL_BATCH, clip_factor, eval_scores
from lossx.runtime.trainer import EpochResult

CHECKPOINT_FORMAT = "lossx-onnxruntime-checkpoint"
STATE_KEY = "lossx/state"
MOMENTUM_PREFIX = "momentum/"


class NesterovSGD:
    """torch.optim.SGD(momentum, nesterov=True, weight_decay) in float32 numpy, in place."""

    def __init__(self, parameters: dict[str, np.ndarray], weight_decay: float) -> None:
        self.parameters = parameters
        self.weight_decay = np.float32(weight_decay)
        self.momentum_buffers: dict[str, np.ndarray] = {}

    def step(self, grads: dict[str, np.ndarray], lr: float, momentum: float) -> None:
        lr, momentum = np.float32(lr), np.float32(momentum)
        for name, weight in self.parameters.items():
            grad = grads[name]
            if self.weight_decay:
                grad = grad + self.weight_decay * weight
            buffer = self.momentum_buffers.get(name)
            if buffer is None:
                buffer = self.momentum_buffers[name] = grad.copy()
            else:
                buffer *= momentum
                buffer += grad
            weight -= lr * (grad + momentum * buffer)


class OnnxRuntimeEngine:
    """One run's weights and optimizer, stepped by an artifact's training graph."""

    def __init__(
        self, artifact: Artifact, config: TrainConfig, out: Path, session_options: dict
    ) -> None:
        if config.optimizer != "sgd":
            raise SpecError(
                f"the onnxruntime engine implements optimizer sgd only, not {config.optimizer}"
            )
        self.artifact = artifact
        self.config = replace(config, model=artifact.manifest.model)
        self.out = out
        self.session_options = session_options
        self.graph = training_graph(artifact, config)
        self.session = artifact.session(self.graph.stem, **session_options)
        names = self.graph.parameter_names
        self.grad_names = [self.graph.gradients[name] for name in names]
        weights = {name: value.copy() for name, value in artifact.parameters().items()}
        self.parameters = {name: weights[name] for name in names}
        self.buffers = {name: weights[name] for name in self.graph.buffer_names}
        self.next_buffers = self.graph.next_buffers
        self.optimizer = NesterovSGD(self.parameters, config.weight_decay)

    def step(self, images: np.ndarray, labels: np.ndarray, lr: float, momentum: float) -> float:
        feed = graph_feed(self.graph, images, labels, None, {**self.parameters, **self.buffers})
        wanted = ["loss", *self.grad_names, *self.next_buffers.values()]
        loss, *outputs = self.session.run(wanted, feed)
        grads = outputs[: len(self.grad_names)]
        self.buffers.update(zip(self.next_buffers, outputs[len(self.grad_names) :], strict=True))
        norm = np.sqrt(sum(float(np.vdot(g, g)) for g in grads))
        factor = np.float32(clip_factor(norm, self.config.clip_norm))
        if factor != 1:
            grads = [g * factor for g in grads]
        self.optimizer.step(dict(zip(self.parameters, grads, strict=True)), lr, momentum)
        return float(loss)

    def evaluate(self, split: Cifar10Split) -> tuple[float, float]:
        model = self.artifact.with_weights(self.weights())
        logits = [model.run("model", {"images": x}, **self.session_options)["logits"]
                  for x, _ in iter_batches(split, EVAL_BATCH)]  # fmt: skip
        return eval_scores(np.concatenate(logits), split.labels)

    def save(self, history: list[EpochResult]) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "model_name": self.artifact.manifest.model,
            "artifact_manifest_sha256": sha256_of(self.artifact.path / MANIFEST_FILE),
            "config": self.config.to_dict(),
            "history": [e.to_dict() for e in history],
        }
        arrays = self.weights()
        arrays.update({MOMENTUM_PREFIX + k: v for k, v in self.optimizer.momentum_buffers.items()})
        arrays[STATE_KEY] = np.array(json.dumps(state))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomically(self.out, lambda f: f.write(buffer.getvalue()))

    def weights(self) -> dict[str, np.ndarray]:
        """The model's state by state_dict name: parameters and buffers."""
        return {**self.parameters, **self.buffers}

    def restore(self, path: Path, state: dict) -> list[EpochResult]:
        weights = read_weights(path)
        momentum = read_weights(path, MOMENTUM_PREFIX)
        check_weights(weights, self.weights())
        if momentum:
            check_weights(momentum, self.parameters)
        for name, value in weights.items():
            self.weights()[name][...] = value
        self.optimizer.momentum_buffers = {k: v.copy() for k, v in momentum.items()}
        return [EpochResult(**e) for e in state["history"]]


def training_graph(artifact: Artifact, config: TrainConfig) -> GraphSpec:
    """The artifact's training graph for the recipe's loss, or a one-line refusal."""
    wanted = config.loss_spec()
    for entry in artifact.manifest.graphs:
        spec = entry.spec
        if spec.kind is GraphKind.TRAIN and spec.loss.name == wanted.name:
            if spec.loss != wanted:
                raise SpecError(
                    f"{artifact.path}: its training graph computes {spec.loss}, not {wanted}; "
                    f"pass --loss {str(spec.loss)!r} or export {wanted} with --train"
                )
            return spec
    raise SpecError(
        f"{artifact.path}: no training graph for loss {wanted.name}; export it with "
        f"`lossx export --train --loss {wanted.name}`"
    )


def checkpoint_state(path: Path) -> dict | None:
    """The recipe and log an .npz checkpoint of this engine carries (None for plain weights)."""
    try:
        check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as npz:
            if STATE_KEY not in npz.files:
                return None
            state = json.loads(str(npz[STATE_KEY]))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not an .npz checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: {STATE_KEY} is not a lossx training state")
    return state


def resume_state(artifact: Artifact, path: Path) -> dict:
    """The state of a checkpoint this engine wrote with `artifact`, or a one-line refusal."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = checkpoint_state(path)
    if state is None:
        raise CheckpointError(
            f"{path}: weights only, not a checkpoint of lossx train --engine onnxruntime; "
            "cannot resume from it"
        )
    if state.get("artifact_manifest_sha256") != sha256_of(artifact.path / MANIFEST_FILE):
        raise CheckpointError(f"{path}: was trained with another artifact than {artifact.path}")
    return state


def train(
    artifact: Artifact,
    data_dir: Path | None,
    out: Path,
    config: TrainConfig | None = None,
    session_options: dict | None = None,
    **run,
) -> list[EpochResult]:
    """Train the artifact's model from its shipped weights (or `resume`'s) and checkpoint to
    `out` after every epoch, in sessions opened with `session_options` (provider, threads,
    ...); `run` (resume, stop_after and the callbacks) as for lossx.runtime.trainer.train."""
    engine = partial(OnnxRuntimeEngine, artifact, session_options=session_options or {})
    return trainer.train(
        engine, partial(resume_state, artifact), is_checkpoint, data_dir, out, config, **run
    )


def is_checkpoint(path: Path) -> bool:
    """Whether `path` holds a checkpoint this engine wrote (of any artifact)."""
    try:
        return file_kind(path) == "npz" and checkpoint_state(path) is not None
    except (CheckpointError, OSError):
        return False
