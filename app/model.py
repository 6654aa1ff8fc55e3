"""The tutorial's ConvNet, with its channel bug fixed (block i takes kernels[i-1] channels, not 16)."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """conv5x5 -> ReLU -> maxpool2 per entry of `kernels`, then one linear layer to `classes` logits."""

    def __init__(self, kernels: tuple[int, ...] | list[int] = (16, 32), classes: int = 10, image_size: int = 28):
        super().__init__()
        blocks, channels, size = [], 1, image_size
        for k in kernels:
            blocks += [nn.Conv2d(channels, k, kernel_size=5, stride=1, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2)]
            channels, size = k, size // 2
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(size * size * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class Normalized(nn.Module):
    """The exported model: takes images scaled to [0, 1] (torchvision's ToTensor), like the tutorial's."""

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)
