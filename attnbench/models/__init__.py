"""Backbones: the CIFAR ResNets the attention papers share."""

from __future__ import annotations

from typing import Any

from attnbench import registry
from attnbench.models.resnet import CifarResNet, blocks_per_stage

from torch import nn

__all__ = ["CifarResNet", "blocks_per_stage", "build_model", "count_params"]


def count_params(model: nn.Module) -> int:
    """Trainable and frozen parameters alike; shared ones once."""
    return sum(p.numel() for p in model.parameters())


def build_model(
    module: str = "none",
    depth: int = 164,
    num_classes: int = 10,
    arch: str = "resnet",
    block: str = "bottleneck",
    options: dict[str, Any] | None = None,
) -> CifarResNet:
    """A CIFAR ResNet with the named attention module in every block."""
    return CifarResNet(arch, depth, block, num_classes, registry.get(module), dict(options or {}))
