"""CIFAR-10 models as pfedsim BaseModels: a model zoo sized as in kuangliu/pytorch-cifar.

Every model maps x (B, 3, 32, 32) to logits (B, model_config.num_classes) and names its last
layer ``linear`` (the usual FedPer personal layer: ``personalization.local_layers: [linear]``).
``model_config.model_type`` picks a class by name. The large models use the CIFAR sizing (3x3
stem at stride 1, no ImageNet max-pool); their layers are in ``blocks.py``.

Normalisation: each BatchNorm architecture ``X`` has a GroupNorm twin ``XGN`` (same module names
and parameter count, ``blocks.GN_GROUPS`` = 2 groups per layer), chosen by class name. Use the
``...GN`` models with ``client_config.vectorize: true`` (vmap refuses BatchNorm) or when BatchNorm
statistics are a problem under label skew; ``personalization.method: fedbn`` needs a BatchNorm model.

Parameter counts with 10 classes (``model.num_parameters()``, trainable elements):

| model | parameters |
|---|---|
| ``LeNet5`` | 62,006 |
| ``SmallCNN`` | 188,810 |
| ``PflCNN`` | 1,626,442 |
| ``MobileNetV2`` / ``MobileNetV2GN`` | 2,236,682 |
| ``DenseNet121`` / ``DenseNet121GN`` | 6,956,298 |
| ``PreActResNet18`` / ``PreActResNet18GN`` | 11,172,170 |
| ``ResNet18`` / ``ResNet18GN`` | 11,173,962 |
| ``VGG16`` / ``VGG16GN`` | 14,728,266 |
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.model import BaseModel
from experiments.cv.blocks import (BasicBlock, PreActBlock, Transition, dense_block, inverted_residuals, norm2d,
                                   pooled, resnet_stages, vgg_features)


class _ClassifierMixin:
    """Cross-entropy loss and accuracy for models whose ``forward`` maps x (B,3,32,32) to logits (B,C)."""

    def loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def inference(self, batch: dict) -> dict:
        logits = self(batch["x"])
        correct = (logits.argmax(dim=1) == batch["y"]).float()
        return {"output": logits, "acc": correct.mean(), "batch_size": batch["y"].numel(), "correct": correct}


class ResNet18(_ClassifierMixin, BaseModel):
    """ResNet-18 (He, Zhang, Ren, Sun 2016, "Deep Residual Learning for Image Recognition",
    arXiv:1512.03385) in CIFAR sizing: 3x3 stem conv to 64 channels at stride 1, no max-pool, four
    stages of two basic blocks (64, 128, 256, 512 channels), global average pool, ``linear``.

    Input (B, 3, 32, 32) -> logits (B, num_classes); 11,173,962 parameters with 10 classes.
    """

    norm = "batch"

    def __init__(self, model_config):
        super().__init__(model_config)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = norm2d(self.norm, 64)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet_stages(BasicBlock, self.norm)
        self.linear = nn.Linear(512, model_config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(pooled(out))


class ResNet18GN(ResNet18):
    """ResNet18 with GroupNorm (2 groups) in place of every BatchNorm; 11,173,962 parameters."""

    norm = "group"


class PreActResNet18(_ClassifierMixin, BaseModel):
    """Pre-activation ResNet-18 (He, Zhang, Ren, Sun 2016, "Identity Mappings in Deep Residual
    Networks", arXiv:1603.05027) in CIFAR sizing: 3x3 stem conv to 64 channels, four stages of two
    full pre-activation units (64, 128, 256, 512 channels), a final BN-ReLU (the paper's extra
    activation after the last unit), global average pool, ``linear``.

    Input (B, 3, 32, 32) -> logits (B, num_classes); 11,172,170 parameters with 10 classes
    (kuangliu/pytorch-cifar's version omits the final BN, 1,024 parameters fewer: 11,171,146).
    """

    norm = "batch"

    def __init__(self, model_config):
        super().__init__(model_config)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet_stages(PreActBlock, self.norm)
        self.bn = norm2d(self.norm, 512)
        self.linear = nn.Linear(512, model_config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(pooled(F.relu(self.bn(out))))


class PreActResNet18GN(PreActResNet18):
    """PreActResNet18 with GroupNorm (2 groups) in place of every BatchNorm; 11,172,170 parameters."""

    norm = "group"


class DenseNet121(_ClassifierMixin, BaseModel):
    """DenseNet-BC-121 (Huang, Liu, van der Maaten, Weinberger 2017, "Densely Connected
    Convolutional Networks", arXiv:1608.06993) in CIFAR sizing: growth rate k = 32, a 3x3 stem conv to
    2k = 64 channels at stride 1 (no max-pool), dense blocks of 6, 12, 24, 16 bottleneck layers with
    compression-0.5 transitions (32x32 -> 16 -> 8 -> 4), final BN-ReLU, global average pool, ``linear``.

    Input (B, 3, 32, 32) -> logits (B, num_classes); 6,956,298 parameters with 10 classes.
    """

    norm = "batch"
    growth = 32

    def __init__(self, model_config):
        super().__init__(model_config)
        planes = 2 * self.growth
        self.conv1 = nn.Conv2d(3, planes, 3, 1, 1, bias=False)
        stages = []
        for index, layers in enumerate((6, 12, 24, 16)):
            stages.append(dense_block(planes, layers, self.growth, self.norm))
            planes += layers * self.growth
            if index < 3:
                stages.append(Transition(planes, planes // 2, self.norm))
                planes //= 2
        self.dense1, self.trans1, self.dense2, self.trans2, self.dense3, self.trans3, self.dense4 = stages
        self.bn = norm2d(self.norm, planes)
        self.linear = nn.Linear(planes, model_config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.trans1(self.dense1(self.conv1(x)))
        out = self.trans3(self.dense3(self.trans2(self.dense2(out))))
        return self.linear(pooled(F.relu(self.bn(self.dense4(out)))))


class DenseNet121GN(DenseNet121):
    """DenseNet121 with GroupNorm (2 groups) in place of every BatchNorm; 6,956,298 parameters."""

    norm = "group"


class VGG16(_ClassifierMixin, BaseModel):
    """VGG-16 (configuration D of Simonyan & Zisserman 2014, "Very Deep Convolutional Networks for
    Large-Scale Image Recognition", arXiv:1409.1556) in CIFAR sizing: the thirteen 3x3 convolutions
    (64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M), each followed by BatchNorm and ReLU,
    then one ``linear`` layer on the 512 x 1 x 1 map in place of the three ImageNet FC layers.

    Input (B, 3, 32, 32) -> logits (B, num_classes); 14,728,266 parameters with 10 classes.
    """

    norm = "batch"
    plan = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, model_config):
        super().__init__(model_config)
        self.features = vgg_features(self.plan, self.norm)
        self.linear = nn.Linear(512, model_config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled(self.features(x)))


class VGG16GN(VGG16):
    """VGG16 with GroupNorm (2 groups) in place of every BatchNorm; 14,728,266 parameters."""

    norm = "group"


class MobileNetV2(_ClassifierMixin, BaseModel):
    """MobileNetV2 (Sandler, Howard, Zhu, Zhmoginov, Chen 2018, "MobileNetV2: Inverted Residuals and
    Linear Bottlenecks", arXiv:1801.04381), width 1.0, in CIFAR sizing: the stem conv (32 channels)
    and the second bottleneck stage (24 channels) at stride 1 instead of 2, so the 32x32 input
    reaches the 1x1 conv to 1280 channels at 4x4; then global average pool and ``linear``.

    Input (B, 3, 32, 32) -> logits (B, num_classes); 2,236,682 parameters with 10 classes. (The
    paper's bottlenecks: no expansion conv when t = 1, residual only when the shape is kept.
    kuangliu/pytorch-cifar adds 1x1 projection shortcuts and a t = 1 expansion conv, 2,296,922.)
    """

    norm = "batch"
    plan = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))

    def __init__(self, model_config):
        super().__init__(model_config)
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = norm2d(self.norm, 32)
        self.layers = inverted_residuals(self.plan, 32, self.norm)
        self.conv2 = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = norm2d(self.norm, 1280)
        self.linear = nn.Linear(1280, model_config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu6(self.bn1(self.conv1(x))))
        return self.linear(pooled(F.relu6(self.bn2(self.conv2(out)))))


class MobileNetV2GN(MobileNetV2):
    """MobileNetV2 with GroupNorm (2 groups) in place of every BatchNorm; 2,236,682 parameters."""

    norm = "group"


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


class LeNet5(_ClassifierMixin, BaseModel):
    """The LeNet-style CNN of Flower's niid_bench baseline (Li, Diao, Chen, He 2021, "Federated
    Learning on Non-IID Data Silos: An Experimental Study", arXiv:2102.02079; after LeCun et al.
    1998): conv 5x5 (6) - ReLU - max-pool 2 - conv 5x5 (16) - ReLU - max-pool 2 - fc1 400->120 - ReLU
    - fc2 120->84 - ReLU - ``linear`` 84->classes. No normalisation, so it trains vectorized.

    Input (B, 3, 32, 32) -> logits (B, num_classes); 62,006 parameters with 10 classes.
    """

    def __init__(self, model_config):
        super().__init__(model_config)
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.linear = nn.Linear(84, model_config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.linear(F.relu(self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))))
