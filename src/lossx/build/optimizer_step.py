"""torch.optim's step as the reference an optimizer graph must equal: clip_grad_norm_, then
torch.optim.SGD or torch.optim.AdamW, on a copy of the inputs."""

import torch
from torch import nn

from lossx.runtime.graphs import GraphSpec, Role, gradient_name
from lossx.runtime.update_rules import state_name


class OptimizerStep(nn.Module):
    """forward takes optimizer graph `spec`'s inputs in order and returns its outputs in order:
    every parameter and its state after one step of torch.optim, and the gradients' global
    norm before clipping (in the inputs' dtype: float64 for `lossx check`'s float64 run)."""

    def __init__(self, spec: GraphSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = dict(zip(self.spec.input_names, inputs, strict=True))
        h = {t.name: feed[t.name].item() for t in self.spec.inputs if t.role is Role.HYPERPARAMETER}
        names = self.spec.parameter_names
        params = [nn.Parameter(feed[name].detach().clone()) for name in names]
        for param, name in zip(params, names, strict=True):
            param.grad = feed[gradient_name(name)].detach().clone()
        rule = self.spec.update_rule
        if rule == "sgd":
            optimizer = torch.optim.SGD(
                params,
                lr=h["lr"],
                momentum=h["momentum"],
                nesterov=h["nesterov"],
                weight_decay=h["weight_decay"],
            )
            states = {"momentum_buffer": None}
        else:
            optimizer = torch.optim.AdamW(
                params,
                lr=h["lr"],
                betas=(h["beta1"], h["beta2"]),
                eps=h["eps"],
                weight_decay=h["weight_decay"],
            )
            states = {"exp_avg": None, "exp_avg_sq": None}
        for param, name in zip(params, names, strict=True):
            state = {s: feed[state_name(s, name)].detach().clone() for s in states}
            if rule == "adamw":  # torch counts the step before taking it
                state["step"] = torch.tensor(float(h["step"] - 1))
            optimizer.state[param] = state
        if h["clip_norm"] > 0:
            norm = nn.utils.clip_grad_norm_(params, h["clip_norm"])
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params])
        optimizer.step()
        outputs = []
        for param in params:
            outputs += [param.detach(), *(optimizer.state[param][s] for s in states)]
        return (*outputs, norm)
