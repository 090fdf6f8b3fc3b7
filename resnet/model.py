"""The ResNet family: torchvision's models (v1.5: stride on the 3x3 convolution), and the few
helpers the product needs around them.

`build_model` checks the name and the class count and calls torchvision's builder without
pretrained weights; the model knows nothing of devices or optimizers, and of the config only
the arch names that model.arch may take.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models import ResNet, get_model

from resnet.config import ARCHS  # the names model.arch may take


def build_model(name: str, num_classes: int = 1000, *, zero_init_residual: bool = False) -> ResNet:
    """A randomly initialised torchvision ResNet.

    ``zero_init_residual`` starts each residual branch as identity (the last BatchNorm of every
    block at zero): helps large-batch training (Goyal et al.).
    """
    if name not in ARCHS:
        raise ValueError(f"unknown model.arch {name!r}; choose one of {sorted(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return get_model(name, weights=None, num_classes=num_classes,
                     zero_init_residual=zero_init_residual)


def forward_features(model: ResNet, x: Tensor) -> Tensor:
    """Stem and the four stages: [N, 3, H, W] -> [N, C, H/32, W/32] (C: 512 or 2048)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def forward_head(model: ResNet, features: Tensor, pre_logits: bool = False) -> Tensor:
    """Global pool and classifier; ``pre_logits`` returns the pooled features."""
    pooled = torch.flatten(model.avgpool(features), 1)
    return pooled if pre_logits else model.fc(pooled)
