"""Models in plain torch, trained from scratch: a small CNN, a ResNet-18-style net, a small U-Net."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks with pooling (a fifth conv at the end), global pooling, linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        widths = [width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in widths:
            layers += [_conv_bn(cin, cout), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers, _conv_bn(cin, cin))
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, classes)."""
        return self.head(self.features(x).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convs with a residual connection."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 layout ([2, 2, 2, 2] basic blocks) with a stem for small tiles (no max pool)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, width)
        blocks: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate([width, width * 2, width * 4, width * 8]):
            for i in range(2):
                stride = 2 if (i == 0 and stage > 0) else 1
                blocks.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, classes)."""
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class UNet(nn.Module):
    """A small U-Net: three down levels, a bottleneck, three up levels; per-pixel logits."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = [width, width * 2, width * 4, width * 8]
        self.down = nn.ModuleList()
        cin = in_channels
        for cout in w[:3]:
            self.down.append(nn.Sequential(_conv_bn(cin, cout), _conv_bn(cout, cout)))
            cin = cout
        self.bottom = nn.Sequential(_conv_bn(w[2], w[3]), _conv_bn(w[3], w[3]))
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for skip, cout in zip(reversed(w[:3]), reversed(w[:3]), strict=True):
            self.up.append(nn.ConvTranspose2d(cout * 2, cout, 2, stride=2))
            self.merge.append(nn.Sequential(_conv_bn(cout + skip, cout), _conv_bn(cout, cout)))
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, classes, height, width); height and width must divide by 8."""
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


ARCHITECTURES: dict[str, type[nn.Module]] = {"small_cnn": SmallCNN, "resnet18": ResNet18, "unet": UNet}


def build_model(name: str, in_channels: int, num_classes: int, width: int) -> nn.Module:
    """Build an architecture by its params name."""
    return ARCHITECTURES[name](in_channels, num_classes, width)


class Normalized(nn.Module):
    """A model with its per-band normalisation built in: it takes tiles scaled to [0, 1].

    This is the form that is saved and logged, so evaluate, predict and MLflow serving all
    apply exactly the training split's statistics.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for tiles scaled to [0, 1]."""
        return self.net((x - self.mean) / self.std)
