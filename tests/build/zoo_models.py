"""Models that once broke an export: a small ViT built on nn.TransformerEncoder (attention's
backward; also in bench/zoo.py's matrix), weights torch.onnx would fold into constants, batch
norm over 1x1 maps, a buffer whose name the exporter uses too."""

import torch
from torch import nn


class SmallViT(nn.Module):
    """Patches of 8x8 pixels, a class token, learned positions, a 2-layer pre-norm
    TransformerEncoder of width 64 and a linear head."""

    def __init__(self, num_classes: int = 10, image_size: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        patches = (image_size // 8) ** 2
        self.embed = nn.Conv2d(3, 64, 8, stride=8)
        self.cls = nn.Parameter(torch.zeros(1, 1, 64))
        self.position = nn.Parameter(torch.randn(1, patches + 1, 64) * 0.02)
        layer = nn.TransformerEncoderLayer(
            64, 4, 128, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.position
        return self.head(self.norm(self.encoder(tokens)[:, 0]))


class FoldNet(nn.Module):
    """A zero conv bias, GroupNorm's ones and zeros, a Linear applied to a 3-D tensor: weights
    torch.onnx's optimizer folds into anonymous constants when they are initializers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        nn.init.zeros_(self.conv.bias)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(900, 10)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).flatten(2)).mean(1)


class OneByOneBN(nn.Module):
    """Batch norm over `side`x`side` maps: on 1x1, torch refuses to train it on a batch of one
    image; on 2x2, one image gives it 4 values per channel, too few to judge fp32 by."""

    def __init__(self, side: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.AdaptiveAvgPool2d(side))
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * side * side, 10)

    def forward(self, x):
        return self.fc(self.bn(self.features(x)).flatten(1))


class MeanBuffer(nn.Module):
    """Its own normalisation as buffers named `mean` and `std`, and a mean in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        return self.fc(((x - self.mean) / self.std).mean((2, 3)))


def dashed_sequential() -> nn.Sequential:
    """A top-level nn.Sequential (state_dict names start with a digit) holding an nn.ModuleDict
    keyed with a dash, as regnet names its blocks ("block1-0")."""

    class Blocks(nn.ModuleDict):
        def forward(self, x):
            for block in self.values():
                x = block(x)
            return x

    return nn.Sequential(
        Blocks({"block1-0": nn.Conv2d(3, 4, 3, stride=2), "block1-1": nn.BatchNorm2d(4)}),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )


class RoutingNet(nn.Module):
    """Every op whose input decides where a gradient goes: ReLU in place, a 3x3 max pool of
    stride 2, ReLU6 in place and hardtanh."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu6 = nn.ReLU6(inplace=True)
        self.clip = nn.Hardtanh(-0.5, 0.5)
        self.head = nn.Linear(6, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.conv(x)))
        x = self.clip(self.relu6(self.conv2(x)))
        return self.head(x.mean((2, 3)))


class NormFirst(nn.Module):
    """Batch norm straight on the images, whose channel means (near 0.5, over 64x32x32 values
    at batch 64) a float32 sum rounds visibly."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.head(self.norm(x).mean((2, 3)))
