"""A float64 training step that routes its gradients as another engine's fp32 forward did.

ReLU, clip (ReLU6, hardtanh) and max pooling route gradients by a decision: is the input above
the kink, which element of the window is largest. Where the float64 input lies within fp32
rounding of the kink (a pre-activation of 1e-7, two window values 1e-6 apart), an fp32 engine
can land on either side, and its gradient then differs from float64's by a whole path's
contribution: resnet18's conv1 gradient by 1.1% of its largest value, for one max-pool window
in 262,144. `run_routed` computes the exact step along the engine's own decisions, so its
gradient can be judged by what it chose rather than by which side of a near-tie it fell on.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# the ATen ops that decide a route, by kind (ONNX's ops: lossx.compare.runners.ROUTING_OPS)
DECIDING = {
    aten.relu.default: "relu",
    aten.relu_.default: "relu",
    aten.hardtanh.default: "clip",
    aten.hardtanh_.default: "clip",
    aten.max_pool2d_with_indices.default: "max_pool",
}


class Misrouted(Exception):
    """The engine's decisions do not line up with the step's, site by site."""


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


class _RoutedAs(TorchDispatchMode):
    """Every deciding op of the step (in call order) takes its decision from the engine's input
    to the same op, `inputs[i]`; the backward ops then route by those decisions."""

    def __init__(self, inputs: Sequence[tuple[str, np.ndarray]]) -> None:
        super().__init__()
        self.inputs, self.site = inputs, 0
        self.decisions: dict[tuple, torch.Tensor] = {}  # by the tensor a backward op is given
        self.values: list[tuple[torch.Tensor, torch.Tensor]] = []  # (that tensor, decision)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = DECIDING.get(func)
        if kind is not None:
            return self._decide(kind, func, args, kwargs)
        if func is aten.threshold_backward.default:  # ReLU's, given its result
            grad, result, _ = args
            return grad * self._decision(result)
        if func is aten.hardtanh_backward.default:  # given its input, or result in place
            grad, x = args[:2]
            return grad * self._decision(x)
        if func is aten.max_pool2d_with_indices_backward.default:
            return func(*args[:-1], self._decision(args[-1]), **kwargs)
        return func(*args, **kwargs)

    def _decide(self, kind: str, func: Callable, args: tuple, kwargs: dict):
        x = args[0]
        if self.site >= len(self.inputs):
            raise Misrouted(f"the step has more than {len(self.inputs)} deciding ops")
        their_kind, theirs = self.inputs[self.site]
        if their_kind != kind or theirs.shape != tuple(x.shape):
            here, there = f"{kind} {tuple(x.shape)}", f"{their_kind} {theirs.shape}"
            raise Misrouted(f"deciding op {self.site}: {here} here, {there} there")
        self.site += 1
        engine = torch.from_numpy(theirs).to(x.dtype)
        if kind == "max_pool":
            out = func(*args, **kwargs)
            self.decisions[_key(out[1])] = func(engine, *args[1:], **kwargs)[1]
            return out
        # what its backward is given: ReLU's result; hardtanh's input, copied where it works
        # in place, so known by its values
        before = x.detach().clone() if kind == "clip" else None
        out = func(*args, **kwargs)
        if kind == "relu":
            decision = engine > 0
        else:
            low, high = args[1], args[2]
            decision = (engine > low) & (engine < high)
        saved = out if before is None else x
        self.decisions[_key(saved)] = decision
        self.values.append((out.detach().clone() if before is None else before, decision))
        return out

    def _decision(self, given: torch.Tensor) -> torch.Tensor:
        decision = self.decisions.get(_key(given))
        if decision is None:
            same = [d for v, d in self.values if v.shape == given.shape and torch.equal(v, given)]
            if len(same) != 1:
                raise Misrouted("a backward op routes by a value no deciding op made")
            decision = same[0]
        return decision


def run_routed(step: Callable[[], dict], inputs: Sequence[tuple[str, np.ndarray]]) -> dict | None:
    """`step()` (a float64 run of a training graph's reference) with every ReLU, clip and max
    pool deciding as the engine whose inputs to those ops, in order, are `inputs` (kind, value)
    did; None where they do not line up with the step's own."""
    mode = _RoutedAs(inputs)
    try:
        with mode:
            outputs = step()
    except Misrouted:
        return None
    return outputs if mode.site == len(inputs) else None
