"""The networks of the two papers, for 1- or 3-channel images in [0, 1].

Every model starts with a :class:`Normalize` layer holding the dataset's per-channel mean and
std as buffers, so the model itself takes pixels in [0, 1] and attacks work in pixel space.
Each constructor takes ``input_shape=(C, H, W)`` and ``num_classes``; layer sizes that depend
on the image size are computed from it, so the same model runs on 28×28 and 32×32 data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel; the statistics are buffers, not parameters."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Sequential):
    """``Normalize`` followed by the network body; what every model here returns."""

    def __init__(self, body: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}
"""The hidden layers' nonlinearity (``model.activation``). ReLU makes the network piecewise linear in
its input, so the loss's input Hessian is positive semidefinite almost everywhere (paper B's
saddle-free inner loop); the smooth ones add curvature of the network's own, which can be negative."""


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"model.activation={name!r} is not one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _flat_size(features: nn.Module, input_shape: Sequence[int]) -> int:
    with torch.no_grad():
        n = features.eval()(torch.zeros(1, *input_shape)).numel()
    features.train()
    return n


def _stats(mean, std, channels):
    mean = list(mean) if mean is not None else [0.0] * channels
    std = list(std) if std is not None else [1.0] * channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} values (one per input channel), got {mean} / {std}")
    return mean, std


def mlp(
    input_shape, num_classes, hidden=(512, 256), activation="relu", mean=None, std=None
) -> ImageClassifier:
    """Fully connected network on the flattened image (``activation`` between layers)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(torch.tensor(input_shape).prod())
    for h in hidden:
        layers += [nn.Linear(width, h), _activation(activation)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return ImageClassifier(nn.Sequential(*layers), *_stats(mean, std, input_shape[0]))


def lenet(
    input_shape, num_classes, channels=(6, 16), hidden=(120, 84), activation="relu", mean=None, std=None
):
    """LeNet-5 style: two conv5x5 → activation → maxpool(2) blocks, then two hidden fc layers."""
    c_in = input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c_in, channels[0], 5, padding=2),
        _activation(activation),
        nn.MaxPool2d(2),
        nn.Conv2d(channels[0], channels[1], 5),
        _activation(activation),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    width = _flat_size(features, input_shape)
    layers: list[nn.Module] = [features]
    for h in hidden:
        layers += [nn.Linear(width, h), _activation(activation)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return ImageClassifier(nn.Sequential(*layers), *_stats(mean, std, c_in))


def c1(
    input_shape,
    num_classes,
    channels=64,
    hidden=(384, 192),
    batch_norm=True,
    activation="relu",
    mean=None,
    std=None,
):
    """Paper B's "C1": 2 × [conv5x5(64) → ReLU → BatchNorm → maxpool(3, s2, p1)], fc 384 → fc 192 → fc
    (``activation`` in place of ReLU, if asked)."""
    c_in = input_shape[0]
    blocks: list[nn.Module] = []
    for c_prev in (c_in, channels):
        blocks += [nn.Conv2d(c_prev, channels, 5, padding=2), _activation(activation)]
        if batch_norm:
            blocks.append(nn.BatchNorm2d(channels))
        blocks.append(nn.MaxPool2d(3, stride=2, padding=1))
    features = nn.Sequential(*blocks, nn.Flatten())
    width = _flat_size(features, input_shape)
    body = nn.Sequential(
        features,
        nn.Linear(width, hidden[0]),
        _activation(activation),
        nn.Linear(hidden[0], hidden[1]),
        _activation(activation),
        nn.Linear(hidden[1], num_classes),
    )
    return ImageClassifier(body, *_stats(mean, std, c_in))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN; 1x1-conv projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem (no max-pool), stages of basic blocks, global average pool."""

    def __init__(self, c_in, num_classes, widths, blocks_per_stage):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(c_in, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, c_prev = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            for j in range(n):
                stages.append(BasicBlock(c_prev, w, stride=2 if (i > 0 and j == 0) else 1))
                c_prev = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_prev, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def resnet20(input_shape, num_classes, mean=None, std=None):
    """ResNet-20 of He et al. for CIFAR: 3 stages × 3 blocks, widths 16/32/64 (~0.27M parameters)."""
    body = ResNet(input_shape[0], num_classes, (16, 32, 64), (3, 3, 3))
    return ImageClassifier(body, *_stats(mean, std, input_shape[0]))


def resnet18(input_shape, num_classes, mean=None, std=None):
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool): 4 stages × 2 blocks, widths 64…512."""
    body = ResNet(input_shape[0], num_classes, (64, 128, 256, 512), (2, 2, 2, 2))
    return ImageClassifier(body, *_stats(mean, std, input_shape[0]))


VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def vgg(input_shape, num_classes, variant="vgg11", batch_norm=True, mean=None, std=None):
    """VGG (CIFAR variant: conv3x3 stacks with max-pools, one linear classifier)."""
    if variant not in VGG_CONFIGS:
        raise ValueError(f"model.variant={variant!r} is not one of {sorted(VGG_CONFIGS)}")
    layers: list[nn.Module] = []
    c_prev = input_shape[0]
    for v in VGG_CONFIGS[variant]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers.append(nn.Conv2d(c_prev, v, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU())
        c_prev = v
    features = nn.Sequential(*layers, nn.Flatten())
    body = nn.Sequential(features, nn.Linear(_flat_size(features, input_shape), num_classes))
    return ImageClassifier(body, *_stats(mean, std, input_shape[0]))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
