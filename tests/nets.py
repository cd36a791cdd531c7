"""Small hand-made networks with known structure, for the methods' oracles."""
from __future__ import annotations

import torch
from torch import nn

from service.methods import Explainee
from service.zoo.tiny import TinyCNN


class CamNet(nn.Module):
    """features -> GAP -> linear: the architecture on which Grad-CAM equals CAM."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class SmoothNet(nn.Module):
    """Softplus CNN: smooth, so noise -> 0 limits hold without kinks."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Softplus(), nn.Conv2d(6, 6, 3, padding=1),
                                  nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes))

    def forward(self, x):
        return self.body(x)


class LinearNet(nn.Module):
    def __init__(self, shape=(3, 8, 8), classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(int(torch.tensor(shape).prod()), classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class ReluBnNet(nn.Module):
    """Conv-BN-ReLU, max-pool, conv-BN-ReLU (in place), GAP, linear with biases everywhere."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, classes))

    def forward(self, x):
        return self.body(x)


class ClampNet(nn.Module):
    """Conv-BN-ReLU6 (in place), conv-BN-Hardtanh(-0.5, 0.5), GAP, linear: clamping activations whose clipped
    units output constants (implicit biases), at both ends for the Hardtanh."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(-0.5, 0.5),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x):
        return self.body(x)


class SiluNet(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x):
        return self.body(x)


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return module


def make(net_cls, seed: int = 0, dtype=torch.float64, **kw) -> nn.Module:
    torch.manual_seed(seed)
    net = net_cls(**kw)
    randomize_bn(net, seed)
    return net.to(dtype).eval().requires_grad_(False)


def explainee(net: nn.Module, **kw) -> Explainee:
    return Explainee(module=net, **kw)


def tiny_cnn(dtype=torch.float64) -> nn.Module:
    return make(TinyCNN, num_classes=10, dtype=dtype)


def images(batch: int = 3, size: int = 16, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)
