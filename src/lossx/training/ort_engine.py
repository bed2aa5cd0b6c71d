"""`lossx train --engine onnxruntime`: train with an artifact's training and optimizer graphs in
ONNX Runtime, without torch.

Each step feeds the batch, the current weights and buffers to `train_<loss>.onnx`, takes the
loss, every parameter's gradient and the buffers' next values (batch-norm statistics) back, and
runs the optimizer's update graph on them (lossx.runtime.optimizer_graphs: clipping, then
torch.optim.SGD's Nesterov step or torch.optim.AdamW's). The recipe (data order, augmentation,
schedule, clipping) and the loop are lossx.training.trainer's, which the torch engine follows
too, so both engines take the same steps from the same weights and seed.

Its checkpoint is an .npz (lossx.training.checkpoints).
"""

from collections.abc import Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lossx.errors import SpecError
from lossx.runtime.artifact import Artifact, sha256_of
from lossx.runtime.feeds import graph_feed, iter_batches
from lossx.runtime.graphs import GraphKind, GraphSpec, Role, optimizer_graph
from lossx.runtime.image_set import ImageSet
from lossx.runtime.manifest import MANIFEST_FILE
from lossx.runtime.optimizer_graphs import optimizer_model
from lossx.runtime.options import DEFAULT_SESSION, SessionOptions
from lossx.runtime.session import open_session
from lossx.runtime.update_rules import state_name
from lossx.runtime.weights import check_weights, read_weights
from lossx.training import trainer
from lossx.training.checkpoints import is_checkpoint, resume_state, write_npz_checkpoint
from lossx.training.optimizers import GraphOptimizer
from lossx.training.recipe import TrainConfig, contract_recipe, frozen_parameters
from lossx.training.schedule import EVAL_BATCH, eval_scores
from lossx.training.trainer import EpochResult


class OnnxRuntimeEngine:
    """One run's weights and optimizer, stepped by an artifact's training graph."""

    def __init__(
        self, artifact: Artifact, config: TrainConfig, out: Path, options: SessionOptions
    ) -> None:
        self.artifact = artifact
        self.contract = artifact.contract
        self.graph = training_graph(artifact, config)
        self.config = replace(
            config,
            model=artifact.manifest.model,
            **contract_recipe(self.contract),
            **trained_recipe(self.graph, config),
        )
        self.out = out
        self.options = options
        self.session = artifact.session(self.graph.stem, options)
        names = self.graph.parameter_names
        self.grad_names = [self.graph.gradients[name] for name in names]
        weights = {name: value.copy() for name, value in artifact.state_dict().items()}
        self.parameters = {name: weights[name] for name in names}
        self.frozen = {name: weights[name] for name in self.graph.frozen_names}
        self.buffers = {name: weights[name] for name in self.graph.buffer_names}
        self.pending: list[np.ndarray] | None = None  # gradients summed since the last update
        self.pending_batches = 0
        self.next_buffers = self.graph.next_buffers
        self.optimizer = GraphOptimizer(
            config.optimizer,
            optimizer_session(artifact, config.optimizer, self.graph, options),
            self.parameters,
            config.weight_decay,
            config.clip_norm,
        )

    def step(self, images: np.ndarray, labels: np.ndarray, lr: float, momentum: float) -> float:
        """One optimizer step on one batch; its loss."""
        loss = self.accumulate(images, labels)
        self.update(lr, momentum)
        return loss

    def accumulate(self, images: np.ndarray, labels: np.ndarray) -> float:
        feed = graph_feed(self.graph, images, labels, None, self.state_dict())
        wanted = [self.graph.named(Role.LOSS), *self.grad_names, *self.next_buffers.values()]
        loss, *outputs = self.session.run(wanted, feed)
        grads = outputs[: len(self.grad_names)]
        self.buffers.update(zip(self.next_buffers, outputs[len(self.grad_names) :], strict=True))
        if self.pending is None:
            self.pending = grads
        else:  # in float32, as torch's autograd adds a backward's gradients to .grad
            for total, grad in zip(self.pending, grads, strict=True):
                total += grad
        self.pending_batches += 1
        return float(loss)

    def update(self, lr: float, momentum: float) -> None:
        grads = self.pending
        if self.pending_batches > 1:
            grads = [g * np.float32(1 / self.pending_batches) for g in grads]
        self.optimizer.step(dict(zip(self.parameters, grads, strict=True)), lr, momentum)
        self.pending, self.pending_batches = None, 0

    def evaluate(self, split: ImageSet) -> tuple[float, float]:
        return self.scores(iter_batches(split, EVAL_BATCH, self.contract))

    def scores(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of the current weights on model-ready batches."""
        model = self.artifact.with_weights(self.state_dict())
        spec = model.graph("model").spec
        name, output = spec.named(Role.IMAGES), spec.named(Role.LOGITS)
        logits, labels = [], []
        for x, y in batches:
            logits.append(model.run("model", {name: x}, self.options)[output])
            labels.append(y)
        return eval_scores(np.concatenate(logits), np.concatenate(labels))

    def save(self, history: list[EpochResult]) -> None:
        state = {
            "model_name": self.artifact.manifest.model,
            "artifact_manifest_sha256": sha256_of(self.artifact.path / MANIFEST_FILE),
            "config": self.config.to_dict(),
            "history": [e.to_dict() for e in history],
            "optimizer_steps": self.optimizer.steps,
        }
        write_npz_checkpoint(self.out, self.state_dict(), self._optimizer_state(), state)

    def _optimizer_state(self) -> dict[str, dict[str, np.ndarray]]:
        """Each optimizer state (e.g. exp_avg) by parameter."""
        return {
            s: {name: self.optimizer.state[state_name(s, name)] for name in self.parameters}
            for s in self.optimizer.rule.state
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """The model's parameters and buffers by state_dict name."""
        return {**self.parameters, **self.frozen, **self.buffers}

    def restore(self, path: Path, state: dict) -> list[EpochResult]:
        weights = read_weights(path)
        check_weights(weights, self.state_dict())
        optimizer_state = {}
        for s in self.optimizer.rule.state:
            values = read_weights(path, f"{s}/")
            check_weights(values, self.parameters)
            optimizer_state.update({state_name(s, k): v for k, v in values.items()})
        for name, value in weights.items():
            self.state_dict()[name][...] = value
        self.optimizer.restore(optimizer_state, int(state["optimizer_steps"]))
        return [EpochResult(**e) for e in state["history"]]


def optimizer_session(
    artifact: Artifact, rule: str, graph: GraphSpec, options: SessionOptions
) -> ort.InferenceSession:
    """A session of the artifact's graph of update rule `rule` for the parameters training
    graph `graph` trains, or (an artifact exported without it) of that graph built now."""
    parameters = [(t.name, t.shape) for t in graph.inputs if t.role is Role.PARAMETER]
    wanted = optimizer_graph(rule, parameters)
    if any(entry.spec == wanted for entry in artifact.manifest.graphs):
        return artifact.session(wanted.stem, options)
    return open_session(optimizer_model(rule, parameters), options)


def trained_recipe(graph: GraphSpec, config: TrainConfig) -> dict:
    """The recipe's record of what training graph `graph` trains (its frozen parameters by
    name), refusing a --trainable or --frozen choice that differs from it: what trains is
    fixed when the graph is exported."""
    frozen = set(graph.frozen_names)
    if config.trainable is not None or config.frozen is not None:
        names = [*graph.parameter_names, *graph.frozen_names]
        chosen = frozen_parameters(names, config.trainable, config.frozen)
        if chosen != frozen:
            trains = ", ".join(graph.parameter_names[:4])
            more = ", ..." if len(graph.parameter_names) > 4 else ""
            raise SpecError(
                f"{graph.file} trains {trains}{more}, not what --trainable/--frozen choose; "
                "export the artifact with that choice"
            )
    recipe = {"trainable": None, "frozen": tuple(graph.frozen_names) or None}
    # a batch norm whose weight is frozen: eval mode where its statistics stay as they are
    # (a step in train mode updates some buffer of it, num_batches_tracked at least)
    layers = [n.removesuffix(".running_mean") for n in graph.buffer_names
              if n.endswith(".running_mean")]  # fmt: skip
    frozen_layers = [layer for layer in layers if f"{layer}.weight" in frozen]
    if frozen_layers:
        updated = any(b.startswith(f"{frozen_layers[0]}.") for b in graph.next_buffers)
        recipe["frozen_bn"] = "train" if updated else "eval"
    return recipe


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


def train(
    artifact: Artifact,
    data_dir: Path | None,
    out: Path,
    config: TrainConfig | None = None,
    options: SessionOptions = DEFAULT_SESSION,
    **run,
) -> list[EpochResult]:
    """Train the artifact's model from its shipped weights (or `resume`'s) and checkpoint to
    `out` after every epoch, in sessions opened with `options`; `run` (resume, stop_after and
    the callbacks) as for lossx.training.trainer.train."""
    engine = partial(OnnxRuntimeEngine, artifact, options=options)
    return trainer.train(
        engine, partial(resume_state, artifact), is_checkpoint, data_dir, out, config, **run
    )
