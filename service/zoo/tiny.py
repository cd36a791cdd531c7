"""Tiny built-in architectures for tests and demos (run in milliseconds on a CPU)."""
from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + skip, with torchvision's in-place ReLU (the case full backward hooks break
    on)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class TinyCNN(nn.Module):
    """stem conv-BN-ReLU, max-pool, one residual block, conv-BN-ReLU, GAP, linear."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2)
        self.block = ResidualBlock(width)
        self.head = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width),
                                  nn.ReLU(inplace=True))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.block(self.pool(self.stem(x))))
        return self.fc(torch.flatten(self.gap(x), 1))


BUILTIN = {"tiny_cnn": TinyCNN}


def deterministic_weights(arch: str = "tiny_cnn", num_classes: int = 10,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights with non-trivial BatchNorm statistics (so BN folding is exercised by FullGrad tests).

    `python -m service.zoo.tiny models/weights/tiny_cnn.safetensors` writes the committed file.
    """
    torch.manual_seed(seed)
    model = BUILTIN[arch](num_classes=num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None  # BatchNorm2d's default: tracked
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    import sys

    from safetensors.torch import save_file

    save_file(deterministic_weights(), sys.argv[1])
