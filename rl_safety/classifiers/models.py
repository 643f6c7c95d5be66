"""Classifiers for `rl-safety classifier`: a small CNN for small images, ResNet-18 and WRN-28-10 for CIFAR-size data.

Every model takes images in [0, 1] and normalises inside (mean/std are constructor arguments, not state), so a saved
checkpoint is `architecture(**architecture_args)` + `model.safetensors`: exactly what the `classifier` reward loads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class _Normalise(nn.Module):
    def __init__(self, channels: int, mean: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        mean = [0.5] * channels if mean is None else list(mean)
        std = [0.5] * channels if std is None else list(std)
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values (one per channel)")
        # Not persistent: they live in architecture_args, so the state dict holds weights only.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Three conv blocks (GroupNorm, SiLU, max-pool) and a linear head: any image size, a few hundred K parameters.

    GroupNorm rather than BatchNorm: DyART runs clean and boundary points through the model, and a per-example
    normalisation keeps a batch's statistics from depending on which kind of point is in it. SiLU keeps φ smooth
    for the boundary search.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            groups = 8 if cout % 8 == 0 else 1
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(groups, cout),
                nn.SiLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            )

        self.normalise = _Normalise(in_channels, mean, std)
        self.features = nn.Sequential(block(in_channels, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalise(x)).mean(dim=(2, 3)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 with the CIFAR stem (3×3 stride-1 convolution, no max-pool)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        from torchvision.models import resnet18

        self.normalise = _Normalise(in_channels, mean, std)
        self.net = resnet18(num_classes=num_classes)
        self.net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(x))


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act = nn.SiLU()
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.act(self.bn2(self.conv1(out))))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-widen (pre-activation, Swish as in the DyART / Gowal et al. code); WRN-28-10 by default."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 28,
        widen: int = 10,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth={depth}: WideResNet depth must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalise = _Normalise(in_channels, mean, std)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers = []
        for stage in range(3):
            for i in range(n):
                cin = widths[stage] if i == 0 else widths[stage + 1]
                layers.append(_WideBlock(cin, widths[stage + 1], (1 if stage == 0 else 2) if i == 0 else 1))
        self.blocks = nn.Sequential(*layers)
        self.bn, self.act = nn.BatchNorm2d(widths[3]), nn.SiLU()
        self.head = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.blocks(self.stem(self.normalise(x)))))
        return self.head(out.mean(dim=(2, 3)))


# name -> (import path saved in config.json, builder of architecture_args)
ARCHITECTURES = ("small_cnn", "resnet18", "wrn28_10", "toyworld")
PATHS = {
    "small_cnn": "rl_safety.classifiers.models:SmallCNN",
    "resnet18": "rl_safety.classifiers.models:ResNet18",
    "wrn28_10": "rl_safety.classifiers.models:WideResNet",
    "toyworld": "rl_safety.toyworld.classifier:AttributeClassifier",
}


def architecture_args(
    name: str, num_classes: int, in_channels: int, width: int | None, mean: list[float] | None, std: list[float] | None
) -> dict:
    """The constructor arguments saved beside the weights (config.json's `architecture_args`)."""
    if name == "toyworld":
        return {"width": width or 32}  # the toy world's two-head classifier: its heads fix the classes
    args: dict = {"num_classes": num_classes, "in_channels": in_channels, "mean": mean, "std": std}
    if name == "small_cnn":
        args["width"] = width or 32
    elif name == "wrn28_10":
        args.update(depth=28, widen=width or 10)
    return args


def build_model(name: str, args: dict) -> nn.Module:
    """Instantiate an architecture by its short name with `architecture_args`."""
    if name == "toyworld":
        from rl_safety.toyworld.classifier import AttributeClassifier

        return AttributeClassifier(**args)
    return {"small_cnn": SmallCNN, "resnet18": ResNet18, "wrn28_10": WideResNet}[name](**args)


class HeadSelect(nn.Module):
    """One head of a multi-head model (a dict of logits) as a plain logits model, for attacks and margins."""

    def __init__(self, model: nn.Module, head: str | None):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out if self.head is None else out[self.head]
