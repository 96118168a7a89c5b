"""The small CNNs of ``sparsity-ext train``: a VGG-style and a ResNet-style network."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["MODELS", "BasicBlock", "SmallResNet", "SmallVGG", "build_model"]



def _conv_unit(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]


class SmallVGG(nn.Module):
    """VGG-style CNN: stages of two 3x3 conv + ReLU and a 2x2 max-pool, then two FC layers.

    Stages are added while the feature map is at least 4x4 (8x8 input: 2 stages at 8x8
    and 4x4; 32x32: 4 stages); widths ``base_width * 2**stage``, capped at 256.
    Input ``(N, in_channels, S, S)``, output logits ``(N, num_classes)``. Module names
    (``stage1.relu2``, ...) are the layer names in the monitor's records.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, base_width: int = 32):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        size, in_ch, stage = image_size, in_channels, 0
        while size >= 4:
            stage += 1
            width = min(base_width * 2 ** (stage - 1), 256)
            for unit in (1, 2):
                conv, relu = _conv_unit(in_ch, width)
                layers[f"stage{stage}_conv{unit}"], layers[f"stage{stage}_relu{unit}"] = conv, relu
                in_ch = width
            layers[f"stage{stage}_pool"] = nn.MaxPool2d(2)
            size //= 2
        self.features = nn.Sequential(layers)
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(in_ch * size * size, 128),
                fc1_relu=nn.ReLU(),
                fc2=nn.Linear(128, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm with an identity (or 1x1 strided) shortcut; own ReLUs."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_ch == out_ch
            else nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-style CNN: conv stem, one BasicBlock per stage (stride 2 after the first),
    global average pooling, one FC layer. Stages as in :class:`SmallVGG` (down to 4x4).
    Input ``(N, in_channels, S, S)``, output logits ``(N, num_classes)``.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, base_width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, base_width, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(base_width),
                relu=nn.ReLU(),
            )
        )
        blocks: OrderedDict[str, nn.Module] = OrderedDict(
            stage1=BasicBlock(base_width, base_width, 1)
        )
        size, in_ch = image_size, base_width
        while size // 2 >= 4:
            width = min(in_ch * 2, 256)
            blocks[f"stage{len(blocks) + 1}"] = BasicBlock(in_ch, width, 2)
            in_ch, size = width, size // 2
        self.stages = nn.Sequential(blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


MODELS: dict[str, type[nn.Module]] = {"vgg": SmallVGG, "resnet": SmallResNet}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](in_channels, num_classes, image_size)
