"""The optimizers of the ONNX Runtime engine, in float32 numpy, updating weights in place with
torch.optim's arithmetic (so both engines take the same steps)."""

import numpy as np


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
