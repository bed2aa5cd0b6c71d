"""A user's classifier of another size, class count and normalisation, for the image-contract
tests: 64x64 RGB images, any number of classes, batch norm so that training graphs carry
buffers."""

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),  # batch norm follows
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
