"""The CIFAR ResNets of the attention papers, post- and pre-activation, with a plug for attention.

The post-activation net is the "ResNet-164" of the IEBN, DIANet and SPEM papers (bearpaw's
pytorch-classification): three stages of 16/32/64 planes, a projection shortcut (1x1 conv + BN)
on the first block of every stage, the attention gate after a block's last BN and before the
residual add. The pre-activation net (PreResNet) runs BN-ReLU-conv inside blocks, has a conv-only
shortcut and a final BN-ReLU before the pool.

Every block asks the attention spec for its norms, for its gate and (once per stage) for shared
state, so no module needs a branch here. A conv and norm with a ReLU after them, and a block's
tail, go through attnbench.residual.finish, which lets the last layer apply the ReLU (and add the
shortcut) as it writes its output.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from attnbench.errors import UserError
from attnbench.models.conv import Conv2d
from attnbench.norm import BatchNorm2d
from attnbench.residual import finish
from attnbench.registry import ModuleSpec

Norm = Callable[[int], nn.Module]


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free conv with the originals' init, N(0, sqrt(2 / (k*k*out_channels)))."""
    layer = Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / (kernel * kernel * out_ch)))
    return layer


def projection(in_ch: int, out_ch: int, stride: int, with_bn: bool) -> nn.Module | None:
    """Shortcut of a block whose shape changes; its BN stays a plain BN whatever the module."""
    if stride == 1 and in_ch == out_ch:
        return None
    layers = [conv(in_ch, out_ch, 1, stride)]
    if with_bn:
        layers.append(BatchNorm2d(out_ch))
    return nn.Sequential(*layers)


class ReLUAfter(nn.Sequential):
    """These layers, then a ReLU, which the last of them applies as it writes its output where
    it can (a norm: see attnbench.residual.finish)."""

    def forward(self, x: Tensor) -> Tensor:
        return finish(tuple(self), x, None, relu=True)


class Block(nn.Module):
    """What every block has: a shortcut, which is x itself unless the block changes its shape."""

    shortcut: nn.Module | None

    def skip(self, x: Tensor) -> Tensor:
        return x if self.shortcut is None else self.shortcut(x)


class BasicBlock(Block):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, norm: Norm, gate: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = conv(in_ch, planes, 3, stride), norm(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3), norm(planes)
        self.gate = gate
        self.shortcut = projection(in_ch, planes, stride, with_bn=True)

    def forward(self, x: Tensor) -> Tensor:
        out = finish((self.conv1, self.bn1), x, None, relu=True)
        return finish((self.conv2, self.bn2, self.gate), out, self.skip(x), relu=True)


class Bottleneck(Block):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, norm: Norm, gate: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = conv(in_ch, planes, 1), norm(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, stride), norm(planes)
        self.conv3, self.bn3 = conv(planes, planes * 4, 1), norm(planes * 4)
        self.gate = gate
        self.shortcut = projection(in_ch, planes * 4, stride, with_bn=True)

    def forward(self, x: Tensor) -> Tensor:
        out = finish((self.conv1, self.bn1), x, None, relu=True)
        out = finish((self.conv2, self.bn2), out, None, relu=True)
        return finish((self.conv3, self.bn3, self.gate), out, self.skip(x), relu=True)


class PreActBasicBlock(Block):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, norm: Norm, gate: nn.Module):
        super().__init__()
        self.bn1, self.conv1 = norm(in_ch), conv(in_ch, planes, 3, stride)
        self.bn2, self.conv2 = norm(planes), conv(planes, planes, 3)
        self.gate = gate
        self.shortcut = projection(in_ch, planes, stride, with_bn=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(finish((self.bn1,), x, None, relu=True))
        out = finish((self.bn2,), out, None, relu=True)
        return finish((self.conv2, self.gate), out, self.skip(x), relu=False)


class PreActBottleneck(Block):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, norm: Norm, gate: nn.Module):
        super().__init__()
        self.bn1, self.conv1 = norm(in_ch), conv(in_ch, planes, 1)
        self.bn2, self.conv2 = norm(planes), conv(planes, planes, 3, stride)
        self.bn3, self.conv3 = norm(planes), conv(planes, planes * 4, 1)
        self.gate = gate
        self.shortcut = projection(in_ch, planes * 4, stride, with_bn=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(finish((self.bn1,), x, None, relu=True))
        out = self.conv2(finish((self.bn2,), out, None, relu=True))
        out = finish((self.bn3,), out, None, relu=True)
        return finish((self.conv3, self.gate), out, self.skip(x), relu=False)


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
            return attention.make_norm(channels, options)

        self.stem = nn.Sequential(conv(3, 16, 3)) if preact else ReLUAfter(conv(3, 16, 3), norm(16))
        in_ch, stages = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            out_ch = planes * block_cls.expansion
            shared = attention.make_stage(out_ch, options)
            blocks = []
            for i in range(n):
                gate = attention.make_gate(out_ch, shared, options)
                blocks.append(block_cls(in_ch, planes, stride if i == 0 else 1, norm, gate))
                in_ch = out_ch
            stage = nn.Sequential(*blocks)
            if shared is not None:
                stage.shared = shared  # owned by the stage, so state_dict names it once
            stages.append(stage)
        self.stages = nn.Sequential(*stages)
        self.final = ReLUAfter(BatchNorm2d(in_ch)) if preact else nn.Identity()
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
