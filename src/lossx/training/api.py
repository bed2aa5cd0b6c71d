"""Fine-tuning in an app, torch-free: an artifact's training and optimizer graphs (exported with
`lossx export --train`, what `lossx train --engine onnxruntime` runs) stepped on the app's own
batches, evaluated, checkpointed, and written out as an artifact with the new weights.

    from lossx.training import FineTuning

    run = FineTuning("art", optimizer="adamw", lr=1e-3)
    for images, labels in my_batches:  # uint8 [N,H,W,C] as predict takes them, class indices
        loss = run.step(images, labels)
    print(run.evaluate(test_images, test_labels))  # (mean cross-entropy, accuracy)
    run.save("run.npz")  # FineTuning.resume("art", "run.npz") goes on from here
    run.export("art-tuned")  # an artifact: lossx eval / predict / Node.js / the browser
"""

from pathlib import Path

import numpy as np

from lossx.errors import DataError
from lossx.runtime.api import model_input
from lossx.runtime.artifact import Artifact, load_artifact, sha256_of
from lossx.runtime.manifest import MANIFEST_FILE, Manifest
from lossx.runtime.options import DEFAULT_SESSION, SessionOptions
from lossx.runtime.reweighted import write_reweighted
from lossx.training.checkpoints import resume_state
from lossx.training.ort_engine import OnnxRuntimeEngine
from lossx.training.recipe import TrainConfig
from lossx.training.schedule import EVAL_BATCH

MOMENTUM = 0.9  # SGD's momentum and AdamW's beta1 where the caller gives none


class FineTuning:
    """One run of fine-tuning `artifact`'s model (an Artifact or its folder) with its training
    graph for `loss` and its `optimizer` graph ("sgd": Nesterov momentum, or "adamw"), at a
    constant `lr` unless a step gives its own; what trains is what the training graph trains
    (`lossx export --train --trainable ...`)."""

    def __init__(
        self,
        artifact: Artifact | Path | str,
        loss: str = "ce",
        optimizer: str = "sgd",
        lr: float | None = None,
        weight_decay: float = 5e-4,
        clip_norm: float = 5.0,
        options: SessionOptions = DEFAULT_SESSION,
    ) -> None:
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        config = TrainConfig(loss=loss, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                             clip_norm=clip_norm)  # fmt: skip
        config.validate()
        self.engine = OnnxRuntimeEngine(self.artifact, config, Path(), options)
        self.options = options

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far (a resumed run's included)."""
        return self.engine.optimizer.steps

    def step(
        self, images: np.ndarray, labels: np.ndarray, lr: float | None = None,
        momentum: float = MOMENTUM,
    ) -> float:  # fmt: skip
        """One optimizer step on a batch (uint8 [N,H,W,C] images as `Runtime.predict` takes
        them, or float32 [N,C,H,W] preprocessed) and its class indices; the batch's loss."""
        x, y = self._batch(images, labels)
        return self.engine.step(x, y, self.engine.config.lr if lr is None else lr, momentum)

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of the current weights on these images."""
        x, y = self._batch(images, labels)
        starts = range(0, len(x), EVAL_BATCH)
        return self.engine.scores((x[i : i + EVAL_BATCH], y[i : i + EVAL_BATCH]) for i in starts)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The model's current weights and buffers by state_dict name (copies)."""
        return {name: value.copy() for name, value in self.engine.state_dict().items()}

    def save(self, path: Path | str) -> Path:
        """Checkpoint the weights and the optimizer's state (an .npz `lossx eval --weights`,
        `lossx export --checkpoint` and `resume` read)."""
        self.engine.out = Path(path)
        self.engine.save([])
        return Path(path)

    @classmethod
    def resume(
        cls, artifact: Artifact | Path | str, checkpoint: Path | str,
        options: SessionOptions = DEFAULT_SESSION,
    ) -> "FineTuning":  # fmt: skip
        """The run `checkpoint` (saved from `artifact`) holds, ready to step on."""
        artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        state = resume_state(artifact, Path(checkpoint))
        config = TrainConfig.from_dict(state["config"])
        run = cls(artifact, config.loss, config.optimizer, config.lr, config.weight_decay,
                  config.clip_norm, options)  # fmt: skip
        run.engine.restore(Path(checkpoint), state)
        return run

    def export(self, out_dir: Path | str) -> Manifest:
        """Write the artifact with the current weights to `out_dir`: every graph, the model
        and fused graphs holding the new weights, a manifest that records the fine-tuning."""
        config = self.engine.config
        record = {
            "source": "fine_tuned",
            "base_manifest_sha256": sha256_of(self.artifact.path / MANIFEST_FILE),
            "trained": {
                "engine": "onnxruntime",
                "api": "lossx.training.FineTuning",
                "steps": self.steps,
                "loss": config.loss,
                "optimizer": config.optimizer,
                "trainable": list(self.engine.parameters),
            },
        }
        return write_reweighted(self.artifact, self.engine.state_dict(), Path(out_dir), record)

    def _batch(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = model_input(images, self.artifact.contract)
        y = np.asarray(labels)
        classes = self.artifact.contract.num_classes
        if y.shape != (len(x),) or y.dtype.kind not in "iu":
            raise DataError(f"labels: expected {len(x)} class indices, got {y.dtype} {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise DataError(f"labels: class indices must be 0..{classes - 1}")
        return x, y.astype(np.int64)
