"""The ONNX Runtime engine's optimizer: an update rule's graph (lossx.runtime.optimizer_graphs)
run once per step over every parameter, so that this engine, Node.js and the browser take
torch.optim's steps from the same file."""

import numpy as np
import onnxruntime as ort

from lossx.runtime.graphs import GRAD_NORM, NEXT_PREFIX, gradient_name
from lossx.runtime.update_rules import RULES, state_name

# torch.optim.AdamW's defaults for what the recipe leaves out (its beta1 is the schedule's
# momentum).
ADAMW_BETA2, ADAMW_EPS = 0.999, 1e-8


def fixed_hyperparameters(rule: str) -> dict[str, float | bool]:
    """The hyperparameters of update rule `rule` that no recipe option or schedule sets."""
    return {"sgd": {"nesterov": True}, "adamw": {"beta2": ADAMW_BETA2, "eps": ADAMW_EPS}}[rule]


class GraphOptimizer:
    """One run's optimizer state, stepped by `session`, update rule `rule`'s graph, over
    `parameters` (state_dict name -> float32 array, replaced by the updated arrays after each
    step)."""

    def __init__(
        self,
        rule: str,
        session: ort.InferenceSession,
        parameters: dict[str, np.ndarray],
        weight_decay: float,
        clip_norm: float,
    ) -> None:
        self.rule = RULES[rule]
        self.session = session
        self.parameters = parameters
        self.scalars = {"weight_decay": weight_decay, "clip_norm": clip_norm}
        self.state = {
            state_name(s, name): np.zeros_like(value)
            for name, value in parameters.items()
            for s in self.rule.state
        }
        self.steps = 0
        self.outputs = [o.name for o in self.session.get_outputs()]

    def step(self, grads: dict[str, np.ndarray], lr: float, momentum: float) -> float:
        """Update every parameter by its gradient in `grads`, with this step's LR and momentum
        (AdamW's beta1); return the gradients' global norm before clipping."""
        self.steps += 1
        feed = {**self._scalars(lr, momentum), **self.parameters, **self.state}
        feed.update({gradient_name(name): grads[name] for name in self.parameters})
        results = dict(zip(self.outputs, self.session.run(self.outputs, feed), strict=True))
        for tensors in (self.parameters, self.state):
            for name in tensors:
                tensors[name] = results[NEXT_PREFIX + name]
        return float(results[GRAD_NORM])

    def _scalars(self, lr: float, momentum: float) -> dict[str, np.ndarray]:
        # the schedule's momentum is SGD's momentum and AdamW's beta1
        scalars = {"lr": lr, "momentum": momentum, "beta1": momentum, "step": self.steps}
        scalars.update(self.scalars, **fixed_hyperparameters(self.rule.name))
        return {h.name: np.array(scalars[h.name], h.dtype) for h in self.rule.hyperparameters}

    def restore(self, state: dict[str, np.ndarray], steps: int) -> None:
        """Continue from a checkpoint's state (every `<state>.<name>`, checked against the
        parameters by the caller) after `steps` steps."""
        self.state = {name: np.array(state[name], dtype=np.float32) for name in self.state}
        self.steps = steps
