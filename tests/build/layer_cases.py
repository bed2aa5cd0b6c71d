"""The layers training graphs are proven on: one small CIFAR-10 model per entry, each the line
docs/training.md lists it under (tests/build/test_layers.py trains every one against
torch.autograd and checks that the docs list is exactly these names)."""

import torch
import torch.nn.functional as F
from torch import nn


class _Net(nn.Module):
    """`features` (on [N,3,32,32] images), then global average pooling and a linear to 10."""

    def __init__(self, features: nn.Module, channels: int) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(channels, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(images), 1).flatten(1))


class _Lambda(nn.Module):
    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


def _conv(inputs: int = 3, outputs: int = 8, **options) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, 3, padding=options.pop("padding", 1), **options)


def convolutions() -> nn.Module:
    return _Net(nn.Sequential(
        _conv(3, 8, stride=2, bias=False),
        _conv(8, 8, padding=2, dilation=2),
        _conv(8, 8, groups=2),
        _conv(8, 8, groups=8, bias=False),  # depthwise
        nn.Conv2d(8, 8, 1),
    ), 8)  # fmt: skip


def batch_norm() -> nn.Module:
    return _Net(nn.Sequential(_conv(), nn.BatchNorm2d(8), nn.ReLU()), 8)


def layer_norm() -> nn.Module:
    return _Net(nn.Sequential(_conv(stride=2), nn.LayerNorm([8, 16, 16]), nn.ReLU()), 8)


def group_norm() -> nn.Module:
    return _Net(nn.Sequential(_conv(), nn.GroupNorm(4, 8), nn.ReLU()), 8)


ACTIVATIONS = (nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.GELU(), nn.SiLU(), nn.Sigmoid(),
               nn.Tanh(), nn.Hardswish(), nn.Hardsigmoid())  # fmt: skip


def activations() -> nn.Module:
    layers = []
    for module in ACTIVATIONS:
        layers += [_conv(8 if layers else 3, 8), module]
    layers += [_Lambda(F.hardswish), _Lambda(F.gelu)]  # as functions too
    return _Net(nn.Sequential(*layers), 8)


def max_pooling() -> nn.Module:
    return _Net(nn.Sequential(
        _conv(), nn.MaxPool2d(2), _conv(8, 8), nn.MaxPool2d(3, 2, padding=1),
        _conv(8, 8), nn.MaxPool2d(3, 2, ceil_mode=True),
    ), 8)  # fmt: skip


def average_pooling() -> nn.Module:
    return _Net(nn.Sequential(
        _conv(), nn.AvgPool2d(2), _conv(8, 8),
        nn.AvgPool2d(3, 1, padding=1, count_include_pad=False), nn.AdaptiveAvgPool2d(4),
    ), 8)  # fmt: skip


def upsampling() -> nn.Module:
    return _Net(nn.Sequential(
        _conv(stride=2), nn.Upsample(scale_factor=2, mode="nearest"), _conv(8, 8, stride=2),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), _conv(8, 8),
        _Lambda(lambda x: F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=True)),
    ), 8)  # fmt: skip


class SqueezeExcitation(nn.Module):
    """Hu et al. 2018's gating: each channel scaled by a sigmoid of its pooled statistics."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(scale))))


def squeeze_excitation() -> nn.Module:
    return _Net(nn.Sequential(_conv(), nn.ReLU(), SqueezeExcitation(8, 2)), 8)


def channel_shuffle() -> nn.Module:
    def shuffle(x: torch.Tensor) -> torch.Tensor:  # ShuffleNet's, as reshapes
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)

    return _Net(nn.Sequential(
        _conv(groups=1), nn.ChannelShuffle(2), _conv(8, 8, groups=2), _Lambda(shuffle),
        _conv(8, 8, groups=2),
    ), 8)  # fmt: skip


class _Residual(nn.Module):  # functional ReLU, then x + conv(x)
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = _conv(), _conv(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        return F.relu(x + self.conv(x))


class _Concatenation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = _conv(), _conv(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        return torch.cat([x, self.conv(x)], 1)


class _Flat(nn.Module):
    """Flatten, a reshape and two linears, as the seed CNN ends."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv(stride=4)
        self.hidden = nn.Linear(8 * 8 * 8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = nn.Flatten()(self.conv(images)).reshape(-1, 8, 64).reshape(images.shape[0], -1)
        return self.head(self.hidden(x))


LAYERS = {
    "Conv2d: any stride, padding, dilation and groups (depthwise too), with or without bias":
        convolutions,
    "BatchNorm2d (train-mode statistics, running buffers updated)": batch_norm,
    "LayerNorm": layer_norm,
    "GroupNorm": group_norm,
    "activations, as modules or functions: ReLU, ReLU6, LeakyReLU, GELU, SiLU, Sigmoid, Tanh, "
    "Hardswish, Hardsigmoid": activations,
    "MaxPool2d: any kernel, stride and padding, ceil mode too": max_pooling,
    "AvgPool2d (with or without padding counted), AdaptiveAvgPool2d (even windows)":
        average_pooling,
    "upsampling: nearest and bilinear (nn.Upsample, F.interpolate)": upsampling,
    "squeeze-and-excitation gating (a channel scaled by a sigmoid of its pooled statistics)":
        squeeze_excitation,
    "channel shuffle (nn.ChannelShuffle, or view and transpose)": channel_shuffle,
    "residual additions": lambda: _Net(_Residual(), 8),
    "concatenations": lambda: _Net(_Concatenation(), 12),
    "Flatten, reshapes and Linear": _Flat,
}  # fmt: skip
