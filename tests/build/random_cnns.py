"""Small CIFAR-10 CNNs composed at random from the layers training graphs support, for the
property test of tests/build/test_backward.py (importable, so `check` can rebuild them)."""

import random

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "relu": (nn.ReLU, F.relu),
    "relu6": (nn.ReLU6, F.relu6),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), lambda x: F.leaky_relu(x, 0.1)),
    "gelu": (nn.GELU, F.gelu),
    "silu": (nn.SiLU, F.silu),
    "sigmoid": (nn.Sigmoid, torch.sigmoid),
    "tanh": (nn.Tanh, torch.tanh),
}
POOLS = {
    "max2": lambda: nn.MaxPool2d(2),
    "max3s2": lambda: nn.MaxPool2d(3, 2, padding=1),
    "avg2": lambda: nn.AvgPool2d(2),
    "avg3": lambda: nn.AvgPool2d(3, 1, padding=1, count_include_pad=False),
    "adaptive": lambda: nn.AdaptiveAvgPool2d(4),
}


class Block(nn.Module):
    """conv (random kernel, stride, padding, dilation, groups, bias) [+ BatchNorm] + an
    activation (module or functional) [+ a residual addition or a concatenation] [+ a pool]."""

    def __init__(self, rng: random.Random, inputs: int, size: int) -> None:
        super().__init__()
        kernel = rng.choice([1, 3, 5])
        dilation = rng.choice([1, 2]) if kernel > 1 else 1
        stride = rng.choice([1, 2]) if size >= 8 else 1
        outputs = rng.choice([4, 8, 12])
        groups = rng.choice([g for g in (1, 2, 4) if inputs % g == 0 and outputs % g == 0])
        if rng.random() < 0.25 and inputs > 3:  # depthwise
            groups, outputs = inputs, inputs
        padding = dilation * (kernel - 1) // 2
        self.conv = nn.Conv2d(inputs, outputs, kernel, stride, padding, dilation, groups,
                              bias=rng.random() < 0.5)  # fmt: skip
        self.bn = nn.BatchNorm2d(outputs) if rng.random() < 0.6 else None
        name = rng.choice(sorted(ACTIVATIONS))
        module, functional = ACTIVATIONS[name]
        self.act = module() if rng.random() < 0.5 else None
        self.functional = functional
        self.join = rng.choice(["none", "add", "cat"])
        self.shortcut = None
        if self.join == "add" and (stride != 1 or inputs != outputs):
            self.shortcut = nn.Conv2d(inputs, outputs, 1, stride, bias=False)
        self.outputs = outputs + (inputs if self.join == "cat" else 0)
        if self.join == "cat" and stride != 1:
            self.join, self.outputs = "none", outputs
        self.pool = None
        if size >= 16 and rng.random() < 0.6:
            self.pool = POOLS[rng.choice(sorted(POOLS))]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.bn is not None:
            out = self.bn(out)
        out = self.act(out) if self.act is not None else self.functional(out)
        if self.join == "add":
            out = out + (x if self.shortcut is None else self.shortcut(x))
        elif self.join == "cat":
            out = torch.cat([out, x], 1)
        return out if self.pool is None else self.pool(out)


class RandomCNN(nn.Module):
    """Two to four random Blocks, then average pooling or a reshape, and one or two Linears."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        blocks, channels, size = [], 3, 32
        for _ in range(rng.randint(2, 4)):
            block = Block(rng, channels, size).eval()
            blocks.append(block)
            with torch.no_grad():
                shape = block(torch.zeros(2, channels, size, size)).shape
            channels, size = shape[1], shape[2]
        self.blocks = nn.Sequential(*blocks)
        self.global_pool = rng.random() < 0.5
        features = channels if self.global_pool else channels * size * size
        hidden = rng.choice([0, 16])
        head = [nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 10)] if hidden else [
            nn.Linear(features, 10)]  # fmt: skip
        self.head = nn.Sequential(*head)
        self.seed = seed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(images)
        if self.global_pool:
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        else:
            x = x.reshape(x.shape[0], -1)
        return self.head(x)

    def __repr__(self) -> str:
        return f"RandomCNN(seed={self.seed}): {super().__repr__()}"
