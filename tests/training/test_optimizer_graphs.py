"""The update rules' ONNX graphs take torch.optim's steps (with clip_grad_norm_ before them)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lossx.runtime.graphs import NEXT_PREFIX, gradient_name
from lossx.runtime.optimizer_graphs import optimizer_model
from lossx.runtime.update_rules import RULES, state_name
from lossx.training.optimizers import ADAMW_BETA2, ADAMW_EPS, GraphOptimizer
from lossx.training.schedule import one_cycle

SHAPES = [("conv.weight", (16, 3, 5, 5)), ("conv.bias", (16,)), ("fc.weight", (10, 64)),
          ("scale", ())]  # fmt: skip
STEPS = 100
# torch fuses some multiply-adds (lerp, add with alpha) into one rounding where the graph has
# two. Measured over these 100 steps: at most 2 ulps of the largest weight (SGD and AdamW,
# with and without clipping); the bound leaves room for other CPUs' kernels.
ULPS = 4


def _torch_optimizer(rule: str, params: list[torch.nn.Parameter], lr: float):
    if rule == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, ADAMW_BETA2), eps=ADAMW_EPS,
                             weight_decay=5e-4)  # fmt: skip


@pytest.mark.parametrize("clip_norm", [0.0, 5.0])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_update_graph_takes_torch_optims_steps(rule, clip_norm):
    rng = np.random.default_rng(0)
    start = {
        name: np.asarray(rng.standard_normal(shape) * 0.1, np.float32) for name, shape in SHAPES
    }
    params = [torch.nn.Parameter(torch.from_numpy(start[name].copy())) for name, _ in SHAPES]
    max_lr = 0.02 if rule == "sgd" else 3e-3
    reference = _torch_optimizer(rule, params, max_lr)
    session = ort.InferenceSession(optimizer_model(rule, SHAPES))
    mine = GraphOptimizer(rule, session, {k: v.copy() for k, v in start.items()}, 5e-4, clip_norm)
    norms = []
    for step in range(STEPS):
        lr, momentum = one_cycle(step, STEPS, max_lr)
        # gradients of very different sizes, so that clipping both acts and does not
        scale = rng.choice([1e-3, 1.0, 5.0])
        grads = {n: np.asarray(rng.standard_normal(s) * scale, np.float32) for n, s in SHAPES}
        for param, (name, _) in zip(params, SHAPES, strict=True):
            param.grad = torch.from_numpy(grads[name].copy())
        for group in reference.param_groups:
            group["lr"] = lr
            if rule == "sgd":
                group["momentum"] = momentum
            else:
                group["betas"] = (momentum, group["betas"][1])
        if clip_norm:
            norms.append((torch.nn.utils.clip_grad_norm_(params, clip_norm).item(), None))
        reference.step()
        norm = mine.step(grads, lr, momentum)
        if clip_norm:
            norms[-1] = (norms[-1][0], norm)
    for param, (name, _) in zip(params, SHAPES, strict=True):
        expected = param.detach().numpy()
        ulp = np.spacing(np.float32(np.abs(expected).max()))
        assert np.abs(mine.parameters[name] - expected).max() <= ULPS * ulp, name
        assert not np.array_equal(mine.parameters[name], start[name])
    if clip_norm:
        torch_norms, graph_norms = np.array(norms).T
        np.testing.assert_allclose(graph_norms, torch_norms, rtol=1e-6)
        assert (torch_norms > clip_norm).any() and (torch_norms < clip_norm).any()


def test_state_starts_at_zero_and_is_returned():
    """The graph's state outputs are the next step's state inputs; zeros are torch's first step."""
    session = ort.InferenceSession(optimizer_model("adamw", [("w", (3,))]))
    outputs = [o.name for o in session.get_outputs()]
    assert outputs == [NEXT_PREFIX + "w", NEXT_PREFIX + state_name("exp_avg", "w"),
                       NEXT_PREFIX + state_name("exp_avg_sq", "w"), "grad_norm"]  # fmt: skip
    inputs = {i.name for i in session.get_inputs()}
    assert {"w", gradient_name("w"), "lr", "step"} <= inputs
