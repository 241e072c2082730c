"""The CIFAR ResNets of the attention papers, post- and pre-activation, with a place for attention.

The post-activation net is the "ResNet-164" of the IEBN, DIANet and SPEM papers (bearpaw's
pytorch-classification): three stages of 16/32/64 planes, a projection shortcut (1x1 conv + BN)
on the first block of every stage, the attention gate after a block's last BN and before the
residual add. The pre-activation net (PreResNet) runs BN-ReLU-conv inside blocks, has a conv-only
shortcut and a final BN-ReLU before the pool.

Every block takes its norm factory and its gate from the attention module's spec, so no module
needs a branch here: a gate module is the `gate` of each block (nn.Identity for none), a norm
module is every `norm` of the stem and the blocks.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnbench.errors import UserError
from attnbench.registry import ModuleSpec

Norm = Callable[[int], nn.Module]


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free conv with the originals' init, N(0, sqrt(2 / (k*k*out_channels)))."""
    layer = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / (kernel * kernel * out_ch)))
    return layer


def shortcut(in_ch: int, out_ch: int, stride: int, with_bn: bool) -> nn.Module:
    """x itself, or a projection where the block changes the shape; its BN stays a plain BN
    whatever the module."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    layers = [conv(in_ch, out_ch, 1, stride)]
    if with_bn:
        layers.append(nn.BatchNorm2d(out_ch))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, norm: Norm, gate: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = conv(in_ch, planes, 3, stride), norm(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3), norm(planes)
        self.gate = gate
        self.shortcut = shortcut(in_ch, planes, stride, with_bn=True)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.gate(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, norm: Norm, gate: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = conv(in_ch, planes, 1), norm(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, stride), norm(planes)
        self.conv3, self.bn3 = conv(planes, planes * 4, 1), norm(planes * 4)
        self.gate = gate
        self.shortcut = shortcut(in_ch, planes * 4, stride, with_bn=True)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.gate(self.bn3(self.conv3(out)))
        return F.relu(out + self.shortcut(x))


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, norm: Norm, gate: nn.Module):
        super().__init__()
        self.bn1, self.conv1 = norm(in_ch), conv(in_ch, planes, 3, stride)
        self.bn2, self.conv2 = norm(planes), conv(planes, planes, 3)
        self.gate = gate
        self.shortcut = shortcut(in_ch, planes, stride, with_bn=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.gate(self.conv2(F.relu(self.bn2(out))))
        return out + self.shortcut(x)


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, norm: Norm, gate: nn.Module):
        super().__init__()
        self.bn1, self.conv1 = norm(in_ch), conv(in_ch, planes, 1)
        self.bn2, self.conv2 = norm(planes), conv(planes, planes, 3, stride)
        self.bn3, self.conv3 = norm(planes), conv(planes, planes * 4, 1)
        self.gate = gate
        self.shortcut = shortcut(in_ch, planes * 4, stride, with_bn=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.gate(self.conv3(F.relu(self.bn3(out))))
        return out + self.shortcut(x)


class Stage(nn.Sequential):
    """A stage's blocks in order. The module its gates share, where the attention module has one,
    is held here as `shared`, so that the state dict names it once; it is not run as a block, but
    reset (if it can be) as the pass enters the stage and as it leaves, so no state outlives a pass."""

    def forward(self, x: Tensor) -> Tensor:
        reset = getattr(getattr(self, "shared", None), "reset", None)
        if reset is not None:
            reset()
        for name, block in self.named_children():
            if name != "shared":
                x = block(x)
        if reset is not None:
            reset()
        return x


BLOCKS = {
    ("resnet", "bottleneck"): Bottleneck,
    ("resnet", "basic"): BasicBlock,
    ("preresnet", "bottleneck"): PreActBottleneck,
    ("preresnet", "basic"): PreActBasicBlock,
}
LAYERS_PER_BLOCK = {"bottleneck": 9, "basic": 6}


def blocks_per_stage(depth: int, block: str) -> int:
    """n in depth = 9n+2 (bottleneck) or 6n+2 (basic); anything else is a user error."""
    if block not in LAYERS_PER_BLOCK:
        raise UserError(f"unknown --block '{block}'; use {' or '.join(LAYERS_PER_BLOCK)}")
    per = LAYERS_PER_BLOCK[block]
    if depth < per + 2 or (depth - 2) % per:
        examples = ", ".join(str(per * n + 2) for n in (1, 2, 3, 6, 12, 18))
        raise UserError(
            f"depth {depth} is not valid for {block} blocks: use {per}n+2 ({examples}, ...)"
            + (" or --block basic with 6n+2" if block == "bottleneck" else " or --block bottleneck with 9n+2")
        )
    return (depth - 2) // per


class CifarResNet(nn.Module):
    def __init__(
        self,
        arch: str,
        depth: int,
        block: str,
        num_classes: int,
        attention: ModuleSpec,
        options: dict[str, Any],
    ):
        super().__init__()
        if (arch, block) not in BLOCKS:
            raise UserError(f"unknown arch/block '{arch}/{block}'; use arch resnet or preresnet, block bottleneck or basic")
        block_cls = BLOCKS[arch, block]
        n = blocks_per_stage(depth, block)
        preact = arch == "preresnet"
        attention.check_options(options)

        def norm(channels: int) -> nn.Module:
            return attention.build(channels, options) if attention.role == "norm" else nn.BatchNorm2d(channels)

        def gate(channels: int, shared: nn.Module | None) -> nn.Module:
            return attention.build(channels, options, shared) if attention.role == "gate" else nn.Identity()

        self.stem = nn.Sequential(conv(3, 16, 3)) if preact else nn.Sequential(conv(3, 16, 3), norm(16), nn.ReLU())
        in_ch, stages = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            out_ch = planes * block_cls.expansion
            shared = attention.build_shared(out_ch, options)
            blocks = []
            for i in range(n):
                blocks.append(block_cls(in_ch, planes, stride if i == 0 else 1, norm, gate(out_ch, shared)))
                in_ch = out_ch
            stage = Stage(*blocks)
            if shared is not None:
                stage.shared = shared
            stages.append(stage)
        self.stages = nn.Sequential(*stages)
        self.final = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU()) if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)  # = the originals' AvgPool2d(8) on 32x32 inputs
        self.fc = nn.Linear(in_ch, num_classes)
        # Plain list, not submodules: the terms are already registered where they live.
        self._loss_terms = [m for m in self.modules() if callable(getattr(m, "extra_loss", None)) and m is not self]

    def forward(self, x: Tensor) -> Tensor:
        x = self.final(self.stages(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    def extra_loss(self) -> Tensor | None:
        """Sum of the attention modules' own loss terms (SPE's alpha * sum(p^2)), or None."""
        if not self._loss_terms:
            return None
        return sum(m.extra_loss() for m in self._loss_terms)
