"""A small DenseNet-BC (Huang et al. 2017) for 32x32 images, for tests/build/test_backward.py:
bottleneck layers (BN-ReLU-1x1 conv-BN-ReLU-3x3 conv) whose outputs are concatenated,
transitions that halve the channels (compression 0.5) and the image, global average pooling."""

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, channels, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    def __init__(self, channels, out):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, out, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(nn.Module):
    def __init__(self, growth=12, layers=(4, 4, 4)):
        super().__init__()
        channels = 2 * growth
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        stages = []
        for index, count in enumerate(layers):
            for _ in range(count):
                stages.append(Bottleneck(channels, growth))
                channels += growth
            if index < len(layers) - 1:
                stages.append(Transition(channels, channels // 2))
                channels //= 2
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 10)

    def forward(self, images):
        x = F.relu(self.bn(self.features(self.conv(images))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
