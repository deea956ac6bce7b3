"""TinyNet: a small residual convnet that trains in minutes on a laptop CPU.

An example of bringing your own architecture: warmstart builds it with
`--model examples/tinynet.py:TinyNet` and passes `num_classes`. Any nn.Module works the same way.
"""

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = conv_bn(c, c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def zero_init_last(self):
        # warmstart's --zero-init-last calls this: with bn2 at zero the block starts as identity (Goyal et al. 2017)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(self.conv1(x))))


class TinyNet(nn.Module):
    """Stem at stride 2, then three stages (conv + pool + residual block), global pool, linear head."""

    def __init__(self, num_classes: int = 1000, width: int = 32, dropout: float = 0.0):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(3, w, stride=2),
            conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w),
            conv_bn(2 * w, 4 * w), nn.MaxPool2d(2), Residual(4 * w),
            conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(8 * w, num_classes))

    def forward(self, x):
        return self.head(self.features(x))
