"""Building blocks of the CIFAR-10 model zoo in ``model.py``, written from the papers.

Every block takes ``norm``, ``"batch"`` (BatchNorm) or ``"group"`` (GroupNorm with
:data:`GN_GROUPS` groups), so one architecture gives both the BatchNorm model and its GroupNorm
variant (``...GN`` in ``model.py``) with the same module names and parameter count. Attribute names
follow kuangliu/pytorch-cifar (``bn1`` holds a GroupNorm in a GroupNorm variant), so module-name
prefixes such as personal layers mean the same thing in both variants.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GN_GROUPS = 2
"""GroupNorm groups per layer in the ``...GN`` variants: two, as in the federated ResNet-18 of
Reddi et al. 2021 (Adaptive Federated Optimization, arXiv:2003.00295), after Hsieh et al. 2020
(arXiv:1910.00189) showed BatchNorm fails under label skew. Every normalised channel count of the
zoo is even, so two groups always divide it."""

NORMS = ("batch", "group")


def norm2d(norm: str, channels: int) -> nn.Module:
    """A normalisation layer over ``channels`` feature maps: (B, C, H, W) -> (B, C, H, W).

    Raises:
        ValueError: ``norm`` is not ``"batch"`` or ``"group"``.
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(GN_GROUPS, channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Global average pooling: (B, C, H, W) -> (B, C)."""
    return torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016, arXiv:1512.03385), post-activation:
    relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); a 1x1 projection shortcut when the shape changes.

    (B, in_planes, H, W) -> (B, planes, H / stride, W / stride).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm2d(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm2d(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), norm2d(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Full pre-activation residual unit (He et al. 2016, "Identity Mappings in Deep Residual
    Networks", arXiv:1603.05027, Fig. 4e): x + conv(relu(bn(conv(relu(bn(x)))))).

    The shortcut takes the pre-activated input relu(bn(x)) when it is a 1x1 projection (the shape
    changes) or when ``first`` is set (the network's first unit, whose activation the paper places
    "right after conv1 and before splitting into two paths"); otherwise it is the identity on x.
    (B, in_planes, H, W) -> (B, planes, H / stride, W / stride).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str = "batch", first: bool = False):
        super().__init__()
        self.bn1 = norm2d(norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm2d(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        projects = stride != 1 or in_planes != planes
        self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False)) if projects else nn.Sequential()
        self.shares_preact = projects or first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out if self.shares_preact else x)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


def resnet_stages(block, norm: str, blocks_per_stage=(2, 2, 2, 2)) -> list[nn.Sequential]:
    """The four CIFAR ResNet stages (64, 128, 256, 512 channels; strides 1, 2, 2, 2) from a 64-channel
    stem: (B, 64, 32, 32) -> (B, 512, 4, 4) through all four. ``block`` is BasicBlock or PreActBlock."""
    stages, in_planes = [], 64
    for index, (planes, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
        extra = {"first": index == 0} if block is PreActBlock else {}
        units = [block(in_planes, planes, stride, norm, **extra)]
        units += [block(planes, planes, 1, norm) for _ in range(blocks_per_stage[index] - 1)]
        stages.append(nn.Sequential(*units))
        in_planes = planes
    return stages


class DenseLayer(nn.Module):
    """DenseNet-BC bottleneck layer (Huang et al. 2017, arXiv:1608.06993): BN-ReLU-Conv1x1 (4k
    channels) - BN-ReLU-Conv3x3 (k channels), its k new maps concatenated after its input.

    (B, in_planes, H, W) -> (B, in_planes + growth, H, W).
    """

    def __init__(self, in_planes: int, growth: int, norm: str = "batch"):
        super().__init__()
        self.bn1 = norm2d(norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = norm2d(norm, 4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return torch.cat([x, new], 1)


class Transition(nn.Module):
    """DenseNet transition: BN-ReLU-Conv1x1 (compression to ``out_planes``) - 2x2 average pool.

    (B, in_planes, H, W) -> (B, out_planes, H / 2, W / 2).
    """

    def __init__(self, in_planes: int, out_planes: int, norm: str = "batch"):
        super().__init__()
        self.bn = norm2d(norm, in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


def dense_block(in_planes: int, layers: int, growth: int, norm: str) -> nn.Sequential:
    """``layers`` DenseLayers: (B, in_planes, H, W) -> (B, in_planes + layers * growth, H, W)."""
    return nn.Sequential(*[DenseLayer(in_planes + i * growth, growth, norm) for i in range(layers)])


def vgg_features(plan, norm: str) -> nn.Sequential:
    """VGG convolutions (Simonyan & Zisserman 2014, arXiv:1409.1556): for each int c of ``plan`` a
    3x3 conv to c channels (with bias, as in the paper) - norm - ReLU; for each ``"M"`` a 2x2 max-pool.
    (B, 3, H, W) -> (B, last c, H / 2**pools, W / 2**pools)."""
    layers, in_planes = [], 3
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(in_planes, item, 3, padding=1), norm2d(norm, item), nn.ReLU()]
            in_planes = item
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 bottleneck (Sandler et al. 2018, arXiv:1801.04381, Table 1): 1x1 expansion to
    ``expansion * in_planes`` channels - ReLU6 (left out when expansion is 1, as in the paper's first
    bottleneck) - 3x3 depthwise conv with ``stride`` - ReLU6 - 1x1 linear projection; the input is
    added when stride is 1 and the channel count is kept (no projection shortcuts otherwise).

    (B, in_planes, H, W) -> (B, out_planes, H / stride, W / stride).
    """

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int, norm: str = "batch"):
        super().__init__()
        hidden = expansion * in_planes
        self.expand = expansion != 1
        if self.expand:
            self.conv1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
            self.bn1 = norm2d(norm, hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = norm2d(norm, hidden)
        self.conv3 = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.bn3 = norm2d(norm, out_planes)
        self.residual = stride == 1 and in_planes == out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.bn1(self.conv1(x))) if self.expand else x
        out = self.bn3(self.conv3(F.relu6(self.bn2(self.conv2(out)))))
        return out + x if self.residual else out


def inverted_residuals(plan, in_planes: int, norm: str) -> nn.Sequential:
    """MobileNetV2 bottleneck sequence from rows (t expansion, c channels, n repeats, s first stride)."""
    layers = []
    for expansion, out_planes, repeats, stride in plan:
        for i in range(repeats):
            layers.append(InvertedResidual(in_planes, out_planes, expansion, stride if i == 0 else 1, norm))
            in_planes = out_planes
    return nn.Sequential(*layers)
