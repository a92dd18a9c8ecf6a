"""CIFAR-10 models as pfedsim BaseModels.

``ResNet18`` follows the CIFAR sizing of kuangliu/pytorch-cifar (3x3 stem, no max-pool, 11.2M
parameters; He et al. 2016, arXiv:1512.03385). ``SmallCNN`` is a fast 3-conv network for CPU runs.
The final linear layer is named ``linear`` in both, the usual FedPer personal layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.model import BaseModel


class _ClassifierMixin:
    """Cross-entropy loss and accuracy for models whose ``forward`` maps x (B,3,32,32) to logits (B,C)."""

    def loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def inference(self, batch: dict) -> dict:
        logits = self(batch["x"])
        correct = (logits.argmax(dim=1) == batch["y"]).float()
        return {"output": logits, "acc": correct.mean(), "batch_size": batch["y"].numel(), "correct": correct}


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(_ClassifierMixin, BaseModel):
    """CIFAR ResNet-18: input (B, 3, 32, 32) -> logits (B, num_classes); 11,173,962 parameters."""

    def __init__(self, model_config):
        super().__init__(model_config)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(_BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, model_config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class SmallCNN(_ClassifierMixin, BaseModel):
    """Three 3x3 conv blocks (32, 64, 64 channels, max-pool each) and two linear layers.

    Input (B, 3, 32, 32) -> logits (B, num_classes); 188,810 parameters with 10 classes. Sized to
    train federated CIFAR-10 on a 2-core CPU in minutes.
    """

    def __init__(self, model_config):
        super().__init__(model_config)
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.linear = nn.Linear(128, model_config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.relu(self.fc(torch.flatten(self.features(x), 1))))


class PflCNN(_ClassifierMixin, BaseModel):
    """A 2-conv CNN sized like pfl-research's CIFAR-10 benchmark model (1,626,442 parameters).

    conv 3x3 (32, valid) - ReLU - conv 3x3 (64, valid) - ReLU - max-pool 2 - dropout 0.25 -
    linear 12544->128 - ReLU - dropout 0.5 - linear 128->classes. No normalisation layers, so it
    can be trained vectorized across clients. Input (B, 3, 32, 32) -> logits (B, num_classes).
    """

    def __init__(self, model_config):
        super().__init__(model_config)
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc = nn.Linear(64 * 14 * 14, 128)
        self.linear = nn.Linear(128, model_config.num_classes)
        self.drop1 = nn.Dropout(0.25)
        self.drop2 = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.relu(self.fc(torch.flatten(self.drop1(x), 1)))
        return self.linear(self.drop2(x))
