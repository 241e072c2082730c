"""Backbones: the CIFAR ResNets the attention papers share."""

from __future__ import annotations

from typing import Any

from attnbench import registry
from attnbench.models.resnet import CifarResNet, blocks_per_stage

__all__ = ["CifarResNet", "blocks_per_stage", "build_model"]


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
